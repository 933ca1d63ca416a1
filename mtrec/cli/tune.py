"""`mtrec tune`: a hyperparameter search on Ray Tune, each trial real training jobs (docs/tuning.md)."""

from __future__ import annotations

import argparse

from mtrec.cli.common import add_common, day, load, print_json


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "tune",
        help="search a YAML space of config keys on Ray Tune; writes the best config (resumable)",
        allow_abbrev=abbrev,
    )
    add_common(p, date=False)
    p.add_argument(
        "--space", required=True, help="search space YAML path/URL, or the shipped example tune_esmm (docs/tuning.md)"
    )
    p.add_argument("--from", dest="start", required=True, help="first training day, YYYY-MM-DD (a trial's day 1)")
    p.add_argument("--to", dest="end", required=True, help="last training day (inclusive), YYYY-MM-DD")
    p.add_argument(
        "--eval-days",
        type=int,
        default=1,
        help="days after --to, pooled, every trial is scored on after each day it trains (default 1)",
    )
    p.add_argument("--out", help="also write the best config (YAML) here; it is always in <workdir>/tune/NAME/")
    p.add_argument(
        "--name",
        help="the search's name and folder <workdir>/tune/NAME (default <model>-<from>-<to>); rerun with the same "
        "name to resume it",
    )
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local cluster)")
    p.add_argument(
        "--ray-logs", action="store_true", help="forward the Ray workers' output to this console (default: log files)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (the table goes to stderr)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from mtrec.jobs.tune import TuneOptions, load_space, run_tune

    cfg = load(args)
    space = load_space(args.space)
    opts = TuneOptions(
        name=args.name, eval_days=args.eval_days, out=args.out, address=args.address, ray_logs=args.ray_logs
    )
    summary = run_tune(
        cfg, space, day(args, cfg, "--from", args.start), day(args, cfg, "--to", args.end), opts, args.config
    )
    if args.json:
        print_json(asdict(summary))
    return 0
