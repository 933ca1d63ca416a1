"""`mtrec synth`: write a synthetic multi-day world (logs + truth)."""

from __future__ import annotations

import argparse

from mtrec.cli.common import log


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser("synth", help="write a synthetic multi-day world (logs + truth)", allow_abbrev=abbrev)
    p.add_argument("--out", required=True, help="logs root to write (path or fsspec URL)")
    p.add_argument("--days", type=int, default=7, help="number of days (default 7)")
    p.add_argument("--rows-per-day", type=int, default=100_000, help="impressions per day (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--start", default="2026-01-01", help="first day, YYYY-MM-DD (default 2026-01-01)")
    p.add_argument(
        "--files-per-day",
        type=int,
        help="Parquet files per day (default 4; 24, hour by hour, for a world with an intra-day cycle)",
    )
    p.add_argument(
        "--sort-by",
        metavar="COLUMN",
        help="write each day sorted by this logs column across its files (e.g. click), as some exports are",
    )
    p.add_argument(
        "--candidates",
        metavar="URL",
        help="also write every candidate each request scored (features, no labels) under this root, as serving-time "
        "feature logging records them: the serving population for `mtrec bn-check --serving-logs`",
    )
    p.add_argument("--preset", help="a named variant of the default world, e.g. item_quality (docs/synthetic-world.md)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a parameter of the generative model (repeatable; docs/synthetic-world.md lists them)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.data.io import parse_date
    from mtrec.data.synth import Export, world_params, write_world

    start = parse_date(args.start, "--start")
    params = world_params(args.param, args.preset)
    s = write_world(
        args.out,
        args.days,
        args.rows_per_day,
        seed=args.seed,
        start=start,
        files_per_day=args.files_per_day,
        params=params,
        export=Export(sort_by=args.sort_by, candidates=args.candidates),
    )
    what = (
        f"seed {args.seed}"
        + (f", preset {args.preset}" if args.preset else "")
        + "".join(f", {kv}" for kv in args.param)
        + (f", sorted by {args.sort_by}" if args.sort_by else "")
    )
    log.info(
        f"done: {sum(s.rows):,} rows in {sum(s.seconds):.1f}s; days {s.days[0]} .. {s.days[-1]} ({what}) "
        f"under {args.out}; truth under {args.out.rstrip('/')}/_truth/"
        + (f"; candidates under {args.candidates}" if args.candidates else "")
    )
    return 0
