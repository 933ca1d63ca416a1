"""`mtrec train`: a full retrain (cold start) over a date range on Ray."""

from __future__ import annotations

import argparse

from mtrec.cli.common import add_common, add_train_flags, day, run_options, train_cfg


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser("train", help="full retrain over a date range on Ray (cold start)", allow_abbrev=abbrev)
    add_common(p, date=False)
    p.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, help="last day (inclusive), YYYY-MM-DD")
    p.add_argument(
        "--init-from",
        help="start from another model's weights: a published checkpoint URL or models:/NAME@alias (or /N); "
        "every tensor of the same name and shape is copied (overrides train.init_from)",
    )
    p.add_argument(
        "--freeze",
        help="comma-separated parts whose weights do not train, e.g. user (DUPN's user representation; "
        "overrides train.freeze)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="full passes over the range's good rows, each in another order (overrides train.epochs)",
    )
    add_train_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.retrain import run_train

    cfg = train_cfg(args)
    start = {
        "init_from": args.init_from,
        "freeze": args.freeze.split(",") if args.freeze else None,
        "epochs": args.epochs,
    }
    start = {k: v for k, v in start.items() if v is not None}
    cfg = cfg.with_train(**start) if start else cfg
    run_train(cfg, day(args, cfg, "--from", args.start), day(args, cfg, "--to", args.end), run_options(args))
    return 0
