"""How well a shallow tower learns the position curve on a small log, per training recipe.

A synthetic world whose logging policy shows items in a random order (`policy_noise` huge, no
promotion: the position effect is not confounded with relevance), one day of `--rows` rows;
the MMoE example with its shallow tower is trained in-process for each recipe (dense lr, epochs,
batch) and seed, and the learned logit per position is compared with position (Spearman). The
same figure for the day's own click rate per position is the ceiling: on 5,000 rows the deep
slots' rates are a handful of clicks each.

    .venv/bin/python bench/position_curve.py --rows 5000 --seeds 0,1,2,3,4 \
        --recipes "0.001:1:2048,0.01:5:256,0.01:10:256"

Prints one line per recipe and seed, then per recipe the mean and worst Spearman.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from mtrec.config import apply_override, load_config  # noqa: E402
from mtrec.data.synth import world_params, write_world  # noqa: E402
from mtrec.eval.plots import SHALLOW_TOWER, bias_curve, position_feature, shallow_tower, spearman  # noqa: E402
from mtrec.train.local import train_days  # noqa: E402

DAY = dt.date(2026, 1, 1)
RANDOM_ORDER = ["policy_noise=1000", "policy_boost=0"]  # the policy's ranking: noise only


def learned_curve(cfg, res) -> list[float]:
    full = {f"model.{k}": v for k, v in res.dmp.state_dict().items() if f"model.{k}".startswith(SHALLOW_TOWER)}
    tower = shallow_tower(cfg.spec, full)
    bias = cfg.spec.features.bias
    return bias_curve(tower, bias, position_feature(bias))


def tower_config(cfg, args):
    """The example config with the shallow tower's options of the command line."""
    d = cfg.model_dump(mode="json")
    if args.position_only:
        d["features"]["bias"] = [f for f in d["features"]["bias"] if f["name"] == "position"]
    if args.feature_dropout is not None:
        d["model"]["shallow_tower"]["feature_dropout"] = args.feature_dropout
    for item in args.set:
        apply_override(d, item)
    return type(cfg).model_validate(d)


def empirical(logs: str) -> list[float]:
    t = pq.read_table(f"{logs}/dt={DAY}")
    pos, click = t.column("position").to_numpy(), t.column("click").to_numpy()
    return [float(click[pos == k].mean()) for k in range(int(pos.max()) + 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--recipes", default="0.001:1:2048,0.01:5:256", help="dense_lr:epochs:batch, comma-separated")
    ap.add_argument("--world", default="", help="extra world params k=v,k=v")
    ap.add_argument("--position-only", action="store_true", help="the shallow tower reads position only (no device)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config key, e.g. model.batch_norm=false"
    )
    ap.add_argument("--feature-dropout", type=float, help="the shallow tower's feature_dropout (default the example's)")
    args = ap.parse_args()
    logging.disable(logging.INFO)
    recipes = [tuple(r.split(":")) for r in args.recipes.split(",")]
    out: dict[tuple, list[float]] = {r: [] for r in recipes}
    ceiling = []
    for seed in map(int, args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            params = world_params([*RANDOM_ORDER, *filter(None, args.world.split(","))], None)
            write_world(tmp, days=1, rows_per_day=args.rows, seed=seed, params=params)
            rates = empirical(tmp)
            ceiling.append(spearman([-r for r in rates]) * -1)
            print(
                f"seed {seed}: clicks per position {[round(r * args.rows / len(rates)) for r in rates]}, "
                f"Spearman of the day's own rates {ceiling[-1]:+.3f}"
            )
            for lr, epochs, batch in recipes:
                cfg = tower_config(load_config("mmoe", logs=tmp), args)
                cfg = cfg.with_train(batch_size=int(batch), dense_optimizer={"name": "adam", "lr": float(lr)})
                res = train_days(cfg, [DAY], epochs=int(epochs))
                rho = spearman(learned_curve(cfg, res))
                out[(lr, epochs, batch)].append(rho)
                print(f"  lr {lr} epochs {epochs} batch {batch}: Spearman {rho:+.3f}")
    print(f"day's own rates: mean {np.mean(ceiling):+.3f}, worst {max(ceiling):+.3f}")
    for r, v in out.items():
        print(f"recipe lr {r[0]} epochs {r[1]} batch {r[2]}: mean {np.mean(v):+.3f}, worst {max(v):+.3f}")


if __name__ == "__main__":
    main()
