"""`mtrec validate`: check one day's logs against the data contract; quarantine bad rows."""

from __future__ import annotations

import argparse
import json
import logging

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
    per_file = logging.getLogger("mtrec.data.validate")  # its per-file lines: what this command is for
    level = per_file.level
    per_file.setLevel(logging.DEBUG)
    try:
        report = validate(cfg, d)
    finally:
        per_file.setLevel(level)
    log.info(report.summary())
    if args.json:
        print_json(json.loads(report.to_json()))
    return 0
