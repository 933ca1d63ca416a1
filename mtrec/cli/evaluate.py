"""`mtrec evaluate`: a checkpoint's metrics on a day (default: the newest checkpoint before it)."""

from __future__ import annotations

import argparse

from mtrec.cli.common import add_common, day, load, log, print_json


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "evaluate", help="metrics of a checkpoint on a day (default: the newest one before it)", allow_abbrev=abbrev
    )
    add_common(p)
    p.add_argument("--checkpoint", help="checkpoint URL (default: the newest published one before --date)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout (the table goes to stderr)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.evaluate import evaluate_checkpoint

    cfg = load(args)
    d = day(args, cfg)
    metrics, url, manifest = evaluate_checkpoint(cfg, d, args.checkpoint)
    log.info(
        f"{cfg.name} checkpoint {url} (trained on {manifest['days'][0]} .. {manifest['days'][-1]}, "
        f"{manifest['rows_trained']:,} rows, {manifest['world_size']} worker(s)) on {d}:"
    )
    for k in sorted(metrics):
        log.info(f"  {k:<32} {metrics[k]:.4f}")
    if args.json:
        print_json({"checkpoint": url, "date": d.isoformat(), "metrics": metrics})
    return 0
