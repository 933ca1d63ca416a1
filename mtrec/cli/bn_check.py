"""`mtrec bn-check`: a model's BatchNorm statistics against a day as served; --recalibrate fixes them."""

from __future__ import annotations

import argparse
import json

from mtrec.cli.common import add_common, add_scoring_flags, day, load, print_json, tracking_env


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "bn-check",
        help="BatchNorm statistics of a model vs a day as served; --recalibrate fixes them",
        allow_abbrev=abbrev,
    )
    add_common(p)
    p.add_argument(
        "--model",
        help="MLflow model URI, e.g. models:/esmm_synth@challenger (default: the newest checkpoint before --date)",
    )
    p.add_argument("--checkpoint", help="checkpoint URL instead of --model")
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="recompute the BN statistics on --date and register the result as a new version",
    )
    p.add_argument(
        "--serving-logs",
        metavar="URL",
        help="check (and recalibrate) against the candidates serving scored on --date under this root, not the "
        "day's impressions (overrides job.serving_logs)",
    )
    add_scoring_flags(
        p,
        "check (and recalibrate) on this many Ray Train workers, the checkpoint loaded sharded (default: "
        "train.num_workers; 1 checks the served model in this process, a version without a pyfunc on 1 worker)",
    )
    p.add_argument("--json", action="store_true", help="print the reports as JSON on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.errors import BNCheckFailed
    from mtrec.jobs.bn_check import run_bn_check

    cfg = load(args).with_overrides(serving_logs=args.serving_logs)
    d = day(args, cfg)
    if args.model:
        tracking_env(cfg)
    if args.workers is not None:
        cfg = cfg.with_train(num_workers=args.workers)
    out = run_bn_check(cfg, d, args.model, args.checkpoint, args.recalibrate, args.address)
    if args.json:
        print_json(
            {
                "before": json.loads(out.before.to_json()),
                "after": json.loads(out.after.to_json()) if out.after else None,
                "version": out.version,
            }
        )
    if not out.final.passed:
        raise BNCheckFailed(out.final.summary())
    return 0
