"""`mtrec nightly`: one incremental day, warm-started from the day before (and, with --promote, the gate)."""

from __future__ import annotations

import argparse

from mtrec.cli.common import add_common, add_train_flags, day, relative_day, run_options, train_cfg


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "nightly", help="one incremental day, warm-started from the day before's checkpoint", allow_abbrev=abbrev
    )
    add_common(p)
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="train the day from a fresh model (required when no earlier checkpoint exists)",
    )
    p.add_argument(
        "--catch-up",
        action="store_true",
        help="train missing days before --date first, in order (default: refuse a gap)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="warm-start although learning rates, batch size or seed changed",
    )
    p.add_argument(
        "--promote",
        action="store_true",
        help="also run the promotion gate: on the challenger an earlier night registered, then on the new version",
    )
    add_train_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.nightly import run_nightly

    cfg = train_cfg(args)
    opts = run_options(
        args,
        cold_start=args.cold_start,
        catch_up=args.catch_up,
        allow_config_change=args.allow_config_change,
        promote=args.promote,
    )
    relative_day(args, cfg, lambda: run_nightly(cfg, day(args, cfg), opts))
    return 0
