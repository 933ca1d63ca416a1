"""`mtrec backfill`: nightly for each day of a range, in order, skipping published days."""

from __future__ import annotations

import argparse

from mtrec.cli.common import add_common, add_train_flags, day, run_options, train_cfg


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "backfill", help="nightly for each day of a range, in order, skipping published days", allow_abbrev=abbrev
    )
    add_common(p, date=False)
    p.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, help="last day (inclusive), YYYY-MM-DD")
    p.add_argument("--cold-start", action="store_true", help="train the first day from a fresh model")
    p.add_argument(
        "--allow-config-change", action="store_true", help="warm-start the first day although training settings changed"
    )
    p.add_argument("--promote", action="store_true", help="then run the promotion gate on the last day's version")
    add_train_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.nightly import run_backfill

    cfg = train_cfg(args)
    opts = run_options(
        args, cold_start=args.cold_start, allow_config_change=args.allow_config_change, promote=args.promote
    )
    run_backfill(cfg, day(args, cfg, "--from", args.start), day(args, cfg, "--to", args.end), opts)
    return 0
