"""Speed of the synthetic world and of validation: prints rows/s and peak RSS.

    .venv/bin/python bench/synth_validate.py --rows 1000000 --days 2

Figures go to docs/benchmarks.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import tempfile
import time

from mtrec.config import load_config
from mtrec.data.synth import write_world
from mtrec.jobs.protocol import validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per day")
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--out", help="logs root (default: a temp dir)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mtrec-bench-")
    t0 = time.perf_counter()
    s = write_world(out, args.days, args.rows, seed=0)
    total = time.perf_counter() - t0
    for day, secs in zip(s.days, s.seconds, strict=True):
        print(f"synth {day}: {args.rows:,} rows in {secs:.2f}s = {args.rows / secs:,.0f} rows/s")
    print(f"synth total: {args.days * args.rows:,} rows in {total:.2f}s")
    cfg = load_config("esmm", logs=out, workdir=tempfile.mkdtemp(prefix="mtrec-bench-work-"))
    for day in s.days:
        r = validate(cfg, dt.date.fromisoformat(day))
        print(
            f"validate {day}: {r.input_rows:,} rows in {r.seconds:.2f}s = {r.input_rows / r.seconds:,.0f} rows/s, "
            f"{r.bad_rows} bad"
        )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
