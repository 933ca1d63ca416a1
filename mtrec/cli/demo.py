"""`mtrec demo`: the whole story on a small synthetic world, on one machine."""

from __future__ import annotations

import argparse


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser("demo", help="the whole story on a small synthetic world, on one machine", allow_abbrev=abbrev)
    p.add_argument("--workdir", default="./mtrec-demo", help="where the demo writes everything (default ./mtrec-demo)")
    p.add_argument("--days", type=int, default=7, help="days in the synthetic world (default 7)")
    p.add_argument("--rows-per-day", type=int, default=100_000, help="impressions per day (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--models", default="esmm,mmoe", help="models to train, comma-separated: esmm, mmoe (default both)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per job (default 2)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.demo import run_demo

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    run_demo(
        workdir=args.workdir,
        days=args.days,
        rows_per_day=args.rows_per_day,
        seed=args.seed,
        models=models,
        workers=args.workers,
    )
    return 0
