"""DUPN's purchasing-power task (PPP): a 7-level user label learnt beside CTR and CVR.

    .venv/bin/python bench/ppp.py --days 5 --rows 100000 --seeds 0,1,2

On the `purchasing_power` world (the sequences world whose users also differ in a purchasing
power that tilts their clicks and buys towards dearer items; `docs/synthetic-world.md`), days
1..N-1 train and day N is scored. Models: DUPN with the item's price bucket among the behaviour's
features, ESMM with the same history mean-pooled, and MMoE without the history (the esm2 example's
features). Each has the tasks ctr, cvr (given ctr) and power (multiclass, 7 levels). Prints, per
model and seed, the power task's macro AUC against the truth (the level's true distribution given
the user's latent), its accuracy and macro AUC against the logged level, and the unbiased CTR AUC;
then the means over seeds.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from compare_models import CVR2, DUPN, variant_config  # noqa: E402

from mtrec.config import parse_config  # noqa: E402
from mtrec.data.synth import read_world, world_params, write_world  # noqa: E402
from mtrec.eval.evaluate import evaluate_day  # noqa: E402
from mtrec.train.local import train_days  # noqa: E402

POWER = {"name": "power", "label": "power_level", "classes": 7}
PRICE = {"name": "hist_price_bucket", "table": "price_bucket"}
MODELS = {  # name: (compare_models variant whose features it reads, model)
    "dupn": ("dupn", DUPN),
    "esmm+seq": ("esmm+seq", {"arch": "esmm"}),
    "mmoe (no history)": ("mmoe", {"arch": "mmoe", "num_experts": 4, "expert": [256, 128], "tower": [64]}),
}
KEYS = [
    ("power/macro_auc_truth", "power macro AUC vs truth"),
    ("power/accuracy", "power accuracy"),
    ("power/macro_auc", "power macro AUC"),
    ("ctr/auc_unbiased", "unbiased CTR AUC"),
]


def config(name: str, logs: str, batch_size: int, seed: int):
    variant, model = MODELS[name]
    d = variant_config(variant, logs, batch_size, seed).model_dump(mode="json")
    d.update(name="ppp", tasks=[*copy.deepcopy(CVR2), POWER], model=copy.deepcopy(model))
    d["labels"]["power_level"] = "multiclass"
    for g in d["features"].get("sequences") or []:
        g["features"].append(PRICE)
    return parse_config(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--out", default="/tmp/mtrec-ppp", help="worlds are written (and reused) under OUT/seedN")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {m: [] for m in MODELS}
    for seed in (int(s) for s in args.seeds.split(",")):
        out = f"{args.out}/seed{seed}"
        if not Path(out, "_world.json").exists():
            write_world(out, args.days, args.rows, seed=seed, params=world_params([], "purchasing_power"))
        days = [dt.date.fromisoformat(d) for d in read_world(out)["days"]]
        for name in MODELS:
            cfg = config(name, out, args.batch_size, seed)
            res = train_days(cfg, days[:-1])
            m = evaluate_day(res.model, cfg.spec, out, days[-1])
            results[name].append(m)
            print(
                f"seed {seed} {name:<18} "
                + " | ".join(f"{label} {m[k]:.4f}" for k, label in KEYS)
                + f" | oracle {m['power/macro_auc_truth_oracle']:.4f} | {res.counts.good / res.seconds:,.0f} rows/s",
                flush=True,
            )
    print(f"\nmeans over {len(results['dupn'])} seed(s):")
    print("| model | " + " | ".join(label for _, label in KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for name, ms in results.items():
        print(f"| {name} | " + " | ".join(f"{np.mean([m[k] for m in ms]):.4f}" for k, _ in KEYS) + " |")
    gap = [
        d["power/macro_auc_truth"] - o["power/macro_auc_truth"]
        for d, o in zip(results["dupn"], results["mmoe (no history)"], strict=True)
    ]
    print(f"ppp dupn-mmoe macro_auc_truth: mean {np.mean(gap):+.4f} per seed {', '.join(f'{g:+.4f}' for g in gap)}")


if __name__ == "__main__":
    main()
