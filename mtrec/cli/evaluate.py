"""`mtrec evaluate`: a checkpoint's metrics on a day, or pooled over a range of days (default: the
newest checkpoint before the first day)."""

from __future__ import annotations

import argparse

from mtrec.cli.common import add_common, add_scoring_flags, day, load, log, print_json


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a day or a range of days (default: the newest checkpoint before it)",
        allow_abbrev=abbrev,
    )
    add_common(p, date=False)
    p.add_argument("--date", help="day to score: YYYY-MM-DD, or today / yesterday (resolved in job.timezone)")
    p.add_argument("--from", dest="start", help="first day of a range scored as one slice (with --to)")
    p.add_argument("--to", dest="end", help="last day (inclusive) of the range; days without logs are skipped")
    p.add_argument("--checkpoint", help="checkpoint URL (default: the newest published one before the first day)")
    add_scoring_flags(
        p,
        "score on this many Ray Train workers, the checkpoint loaded sharded (default: train.num_workers; "
        "1 scores in this process)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout (the table goes to stderr)")
    p.set_defaults(run=run)


def days_asked(args: argparse.Namespace, cfg):
    """(first, last) day: `--date D` is the range D .. D."""
    from mtrec.errors import ConfigError

    if args.date is not None and (args.start or args.end):
        raise ConfigError("pass either --date D or --from D1 --to D2, not both")
    if args.date is not None:
        return (day(args, cfg),) * 2
    if not (args.start and args.end):
        raise ConfigError("pass --date D for a day, or both --from D1 and --to D2 for a range")
    return day(args, cfg, "--from", args.start), day(args, cfg, "--to", args.end)


def run(args: argparse.Namespace) -> int:
    from mtrec.jobs.evaluate import evaluate_checkpoint, logged_days

    cfg = load(args)
    if args.workers is not None:
        cfg = cfg.with_train(num_workers=args.workers)
    first, last = days_asked(args, cfg)
    days = logged_days(cfg, first, last)
    metrics, url, manifest = evaluate_checkpoint(cfg, days, args.checkpoint, args.address)
    span = (last - first).days + 1
    scored = f"{first}" if first == last else f"{first} .. {last} pooled ({len(days)} of {span} days have logs)"
    log.info(
        f"{cfg.name} checkpoint {url} (trained on {manifest['days'][0]} .. {manifest['days'][-1]}, "
        f"{manifest['rows_trained']:,} rows, {manifest['world_size']} worker(s)) on {scored}:"
    )
    for k in sorted(metrics):
        log.info(f"  {k:<32} {metrics[k]:.4f}")
    if args.json:
        print_json(
            {
                "checkpoint": url,
                "date": first.isoformat() if first == last else None,  # the day of --date D
                "from": first.isoformat(),
                "to": last.isoformat(),
                "days": [d.isoformat() for d in days],  # the days of the range with logs, pooled
                "metrics": metrics,
            }
        )
    return 0
