"""`python -m mtrec.cli ...`: the `mtrec` command (what `mtrec submit` runs on a cluster)."""

import sys

from mtrec.cli import main

sys.exit(main())
