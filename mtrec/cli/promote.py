"""`mtrec promote`: the promotion gate, challenger vs champion on a day neither has seen."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from mtrec.cli.common import add_common, add_scoring_flags, day, load, print_json


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "promote",
        help="promotion gate: challenger vs champion on an unseen day; moves `champion` if it passes",
        allow_abbrev=abbrev,
    )
    add_common(p, date=False)
    p.add_argument("--name", help="registered model name (default: the config's `name`)")
    p.add_argument("--version", help="version to judge (default: the `challenger` alias)")
    p.add_argument(
        "--date",
        help="day to compare on (default: the newest day with logs neither model trained on); with gate.days N, "
        "the last of the N days pooled",
    )
    add_scoring_flags(
        p,
        "score both versions on this many Ray Train workers from their checkpoints, sharded (default: "
        "train.num_workers; 1 scores the served models in this process)",
    )
    p.add_argument("--json", action="store_true", help="print the decision as JSON on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.tracking import promote

    cfg = load(args)
    if args.name and args.name != cfg.name:
        cfg = cfg.model_copy(update={"name": args.name})
    if args.workers is not None:
        cfg = cfg.with_train(num_workers=args.workers)
    decision = promote(cfg, version=args.version, day=day(args, cfg) if args.date else None, address=args.address)
    if args.json:
        print_json(asdict(decision))
    return 0
