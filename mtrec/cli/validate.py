"""`mtrec validate`: check one day's logs against the data contract; quarantine bad rows."""

from __future__ import annotations

import argparse
import json

from mtrec.cli.common import add_common, day, load, log, print_json


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser("validate", help="check one day's logs; print counts; write quarantine", allow_abbrev=abbrev)
    add_common(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout (progress stays on stderr)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.protocol import validate

    cfg = load(args)
    d = day(args, cfg)
    report = validate(cfg, d)
    log.info(report.summary())
    if args.json:
        print_json(json.loads(report.to_json()))
    return 0
