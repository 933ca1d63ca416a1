"""Train every model on the same synthetic world and score it on the next day against the truth.

    .venv/bin/python bench/compare_models.py --days 6 --rows 200000

Days 1..N-1 train (one pass, in order, single process through DistributedModelParallel at world
size 1), day N evaluates, as served (no bias features). Prints one table; docs/models.md holds
the figures with this command.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import spearmanr

from mtrec.config import example_path, parse_config
from mtrec.data.synth import read_world, write_world
from mtrec.eval.evaluate import evaluate_day
from mtrec.train.local import train_days

CVR2 = [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"}]
ESM2_TASKS = [{"name": "ctr", "label": "click"}, {"name": "dar", "label": "daction", "given": "ctr", "joint": "ctavr"},
              {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"}]
THREE = [{"name": "ctr", "label": "click"}, {"name": "watch_time", "label": "watch_time", "log1p": True, "weight": 0.5},
         {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"}]
SHALLOW = {"hidden": [16], "feature_dropout": 0.1}
VARIANTS = {  # name: (tasks, model)
    "naive_cvr": (CVR2, {"arch": "naive_cvr"}),
    "esmm": (CVR2, {"arch": "esmm"}),
    "esm2": (ESM2_TASKS, {"arch": "esm2", "daction_task": "dar"}),
    "esmm+shallow": (CVR2, {"arch": "esmm", "shallow_tower": SHALLOW}),
    "shared_bottom": (THREE, {"arch": "shared_bottom", "bottom": [256, 128], "tower": [64]}),
    "mmoe": (THREE, {"arch": "mmoe", "num_experts": 4, "expert": [256, 128], "tower": [64]}),
    "mmoe+shallow": (THREE, {"arch": "mmoe", "num_experts": 4, "expert": [256, 128], "tower": [64],
                             "shallow_tower": {**SHALLOW, "apply_to": ["ctr"]}}),  # the shipped mmoe example's model
    "ple": (THREE, {"arch": "ple", "levels": 2, "shared_experts": 2, "task_experts": 1, "expert": [128], "tower": [64]}),
}


def variant_config(name: str, logs: str, batch_size: int, seed: int):
    base = yaml.safe_load(example_path("esm2").read_text())
    tasks, model = VARIANTS[name]
    base.update(name=name.replace("+", "_"), tasks=copy.deepcopy(tasks), model=copy.deepcopy(model))
    base["train"].update(batch_size=batch_size, seed=seed)
    base["job"].update(logs=logs)
    return parse_config(base)


def position_logits(model) -> np.ndarray:
    """The shallow tower's logit per position (device 0), eval mode."""
    st = model.shallow_tower
    st.eval()
    with torch.no_grad():
        pos = torch.arange(st.embeddings[0].num_embeddings)
        return st(torch.stack([pos, torch.zeros_like(pos)], dim=1)).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--models", default=",".join(VARIANTS))
    ap.add_argument("--out", help="world dir (reused when it exists)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mtrec-compare-")
    if not Path(out, "_world.json").exists():
        write_world(out, args.days, args.rows, seed=args.seed)
    world = read_world(out)
    days = [dt.date.fromisoformat(d) for d in world["days"]]
    train, test = days[:-1], days[-1]
    exam = np.array(world["params"]["examination"])
    print(f"world {out}: train {train[0]}..{train[-1]} ({len(train)} x {args.rows:,} rows), evaluate {test}; batch {args.batch_size}")
    rows = []
    for name in args.models.split(","):
        cfg = variant_config(name, out, args.batch_size, args.seed)
        t0 = time.perf_counter()
        res = train_days(cfg, train)
        m = evaluate_day(res.model, cfg, test)
        row = {"model": name, "rows/s": res.counts.good / res.seconds, "secs": time.perf_counter() - t0, **m}
        if res.model.shallow_tower is not None:
            logits = position_logits(res.model)
            row["pos_spearman"] = spearmanr(logits, exam).statistic
            row["pos_logits"] = np.round(logits - logits[0], 3).tolist()
        rows.append(row)
        print(f"{name:<14} ctr auc {m['ctr/auc']:.4f} unbiased {m['ctr/auc_unbiased']:.4f} | cvr auc(clicked) {m['cvr/auc']:.4f} "
              f"entire-space {m['cvr/auc_entire_space']:.4f} | ctcvr auc {m['ctcvr/auc']:.4f}"
              + (f" | watch pearson {m['watch_time/pearson']:.4f}" if "watch_time/pearson" in m else "")
              + (f" | pos spearman {row['pos_spearman']:.3f} {row['pos_logits']}" if "pos_spearman" in row else "")
              + f" | {row['rows/s']:,.0f} rows/s", flush=True)
    r0 = rows[0]
    print(f"oracle ceilings: ctr unbiased {r0['ctr/auc_unbiased_oracle']:.4f}, cvr entire-space {r0['cvr/auc_entire_space_oracle']:.4f}")
    by = {r["model"]: r for r in rows}
    if {"esmm", "naive_cvr"} <= by.keys():
        print(f"esmm - naive_cvr entire-space CVR AUC: {by['esmm']['cvr/auc_entire_space'] - by['naive_cvr']['cvr/auc_entire_space']:+.4f} (target >= +0.01)")
    if {"esmm", "esm2"} <= by.keys():
        print(f"esm2 - esmm entire-space CVR AUC: {by['esm2']['cvr/auc_entire_space'] - by['esmm']['cvr/auc_entire_space']:+.4f} (target >= -0.002)")
    if {"esmm", "esmm+shallow"} <= by.keys():
        print(f"shallow - plain unbiased CTR AUC: {by['esmm+shallow']['ctr/auc_unbiased'] - by['esmm']['ctr/auc_unbiased']:+.4f} (target > 0)")
    avg = lambda r: np.mean([r["ctr/auc"], r["cvr/auc"], r["ctcvr/auc"]])  # noqa: E731
    for name in ("shared_bottom", "mmoe", "ple"):
        if name in by:
            print(f"{name:<14} mean AUC (ctr, cvr, ctcvr) {avg(by[name]):.4f}, watch pearson {by[name]['watch_time/pearson']:.4f}")


if __name__ == "__main__":
    main()
