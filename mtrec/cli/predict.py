"""`mtrec predict`: a logged model scores a day's logs into a Parquet file."""

from __future__ import annotations

import argparse

from mtrec.cli.common import add_common, add_scoring_flags, day, load, log, tracking_env


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "predict",
        help="batch-score a day's logs with a logged model -> Parquet of per-task probabilities",
        allow_abbrev=abbrev,
    )
    add_common(p)
    p.add_argument(
        "--model",
        required=True,
        help="MLflow model URI, e.g. models:/esmm_synth@champion, models:/esmm_synth/3, runs:/<id>/model",
    )
    p.add_argument(
        "--out",
        required=True,
        help="Parquet file to write (path or fsspec URL); with --workers, a folder of Parquet parts and _SUCCESS",
    )
    add_scoring_flags(
        p,
        "score on this many Ray Train workers, the version's checkpoint loaded sharded (a model of any size); "
        "--model is then models:/NAME/N, models:/NAME@alias or a checkpoint URL",
    )
    p.add_argument(
        "--user-representations",
        metavar="PATH",
        help="also write each user's representation at their last row of the day, one row per user "
        "(user_id, as_of, representation), to this Parquet file (models with a user part: dupn)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.predict import predict_to_parquet

    cfg = load(args)
    d = day(args, cfg)
    tracking_env(cfg)
    log.info(f"mtrec predict: {args.model} on {cfg.job.logs} dt={d} -> {args.out}")
    if args.workers is not None:
        from mtrec.errors import ConfigError
        from mtrec.jobs.predict import predict_on_workers

        if args.user_representations:
            raise ConfigError("--user-representations is written by one process: leave out --workers")
        out = predict_on_workers(cfg.with_train(num_workers=args.workers), args.model, d, args.out, args.address)
    else:
        out = predict_to_parquet(args.model, cfg.job.logs, d, args.out, args.user_representations, cfg.spec.columns)
    log.info(
        f"wrote {out['rows']:,} rows from {out['files']} file(s) to {out['out']} in {out['seconds']:.1f}s "
        f"(columns: {', '.join(out['columns'])})"
        + (f"; {out['users']:,} users' representations to {args.user_representations}" if "users" in out else "")
    )
    return 0
