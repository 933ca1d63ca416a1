"""`mtrec inspect position-bias`: what a trained shallow tower learned, value by value.

The served model leaves the shallow tower out, so its curve is read from a checkpoint: --checkpoint,
the checkpoint a registered version (--model models:/NAME@alias) was published from, or the newest
published one. Only the tower's tensors are read, not the embedding tables.
"""

from __future__ import annotations

import argparse
import math

from mtrec.cli.common import add_common, load, log, print_json, tracking_env


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser("inspect", help="what a trained model learned: inspect position-bias", allow_abbrev=abbrev)
    what = p.add_subparsers(dest="what", metavar="WHAT")
    what.required = True
    pb = what.add_parser(
        "position-bias",
        help="the shallow tower's bias logit per value of each bias feature, and the position curve's Spearman",
        allow_abbrev=abbrev,
    )
    add_common(pb, date=False)
    pb.add_argument("--checkpoint", help="checkpoint URL (default: the newest published one)")
    pb.add_argument(
        "--model",
        help="a registered version instead, e.g. models:/mmoe_synth@champion or models:/mmoe_synth/3 "
        "(its checkpoint is read: the served model has no shallow tower)",
    )
    pb.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="FEATURE=VALUE",
        help="hold that bias feature at that value instead of averaging over its values, e.g. --by device=1 "
        "(repeatable)",
    )
    pb.add_argument("--json", action="store_true", help="print the curves as JSON on stdout (the table goes to stderr)")
    # after WHAT too (`mtrec` adds --verbose to `inspect`); unset unless given, so `inspect -v WHAT` keeps it
    pb.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    pb.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.errors import ConfigError
    from mtrec.eval import plots
    from mtrec.train import checkpoint

    cfg = load(args)
    url = _checkpoint_url(args, cfg)
    manifest = checkpoint.read_manifest(url)
    spec, _ = checkpoint.trained_spec(manifest, url)
    if spec.model.shallow_tower is None:
        raise ConfigError(
            f"{spec.name} ({url}) has no shallow tower, so it learned no position bias; "
            "add `model.shallow_tower` to the config and retrain to learn one"
        )
    bias = spec.features.bias
    fixed = _fixed(args.by, bias)
    tower = plots.shallow_tower(spec, checkpoint.read_full(url, prefix=plots.SHALLOW_TOWER))
    pos = plots.position_feature(bias)
    curves = {f.name: plots.bias_curve(tower, bias, i, fixed) for i, f in enumerate(bias) if i not in fixed}
    rho = plots.spearman(curves[bias[pos].name]) if pos not in fixed else float("nan")
    roots = [t.name for t in spec.tasks if t.given is None]
    tasks = spec.model.shallow_tower.apply_to or roots[:1]
    log.info(
        f"{spec.name} checkpoint {url} (trained to {manifest.get('date', '?')}): the shallow tower's bias logit, "
        f"added to {', '.join(tasks)} in training and left out at serving (the served model scores as if it were 0)"
    )
    for i, f in enumerate(bias):
        if i in fixed:
            continue
        rest = [
            f"{g.name} = {fixed[j]}" if j in fixed else f"{g.name} averaged over its {g.num_values} values"
            for j, g in enumerate(bias)
            if j != i
        ]
        log.info(f"{f.name}" + (f" ({', '.join(rest)})" if rest else "") + ":")
        log.info(f"  {'value':>6} {'logit':>8} {'vs 0':>8} {'served/here':>12}")
        for v, logit in enumerate(curves[f.name]):
            log.info(f"  {v:>6} {logit:>+8.3f} {logit - curves[f.name][0]:>+8.3f} {math.exp(-logit):>11.2f}x")
        if i == pos:
            log.info(f"  Spearman of the logit vs {f.name}: {rho:+.3f}")
    log.info(
        "served/here = exp(-logit): the served odds over the odds at that value, about the ratio of the served "
        "pCTR to the pCTR there when CTR is low (docs/models.md#the-shallow-tower-and-served-calibration)"
    )
    if args.json:
        print_json(
            {
                "checkpoint": url,
                "date": manifest.get("date"),
                "tasks": tasks,
                "by": {bias[j].name: v for j, v in fixed.items()},
                "logits": curves,
                "position_feature": bias[pos].name,
                "spearman": rho,
            }
        )
    return 0


def _checkpoint_url(args: argparse.Namespace, cfg) -> str:
    """--checkpoint, the checkpoint of the registered version --model names, or the newest published one."""
    from mtrec.errors import CheckpointError, ConfigError
    from mtrec.train import checkpoint

    if args.checkpoint and args.model:
        raise ConfigError("pass --model or --checkpoint, not both")
    if args.checkpoint:
        return args.checkpoint
    if args.model:
        from mtrec.tracking.client import REGISTERED, registered_version

        tracking_env(cfg)
        v = registered_version(cfg, args.model)
        if v is None or not v.checkpoint:
            what = (
                "names no version (the alias is not set)" if REGISTERED.fullmatch(args.model) else "is not registered"
            )
            raise ConfigError(
                f"--model {args.model} {what}; the served model has no shallow tower, so the curve is read from the "
                "checkpoint of a registered version: pass models:/NAME/N or models:/NAME@alias, or --checkpoint"
            )
        return v.checkpoint
    days = checkpoint.published_days(cfg)
    if not days:
        raise CheckpointError(
            f"no published checkpoint of {cfg.name} under {checkpoint.checkpoint_root(cfg)}; "
            "train one first or pass --checkpoint / --model"
        )
    return checkpoint.checkpoint_url(cfg, days[-1])


def _fixed(by: list[str], bias) -> dict[int, int]:
    """--by FEATURE=VALUE flags -> {bias feature index: value}."""
    from mtrec.errors import ConfigError

    index = {f.name: i for i, f in enumerate(bias)}
    fixed = {}
    for item in by:
        name, _, value = item.partition("=")
        if name not in index or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--by {item!r}: expected FEATURE=VALUE with FEATURE one of {', '.join(index)}")
        f = bias[index[name]]
        if not 0 <= int(value) < f.num_values:
            raise ConfigError(f"--by {item}: {name} takes values 0..{f.num_values - 1} (num_values: {f.num_values})")
        fixed[index[name]] = int(value)
    if len(fixed) == len(bias):
        raise ConfigError(f"--by holds every bias feature ({', '.join(index)}); leave one free to see its curve")
    return fixed
