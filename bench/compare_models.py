"""Train every model on the same synthetic world and score it on the next day against the truth.

    .venv/bin/python bench/compare_models.py --days 6 --rows 200000 --preset item_quality

Days 1..N-1 train (one pass, in order, single process through DistributedModelParallel at world
size 1), day N evaluates, as served (no bias features). Prints one table; docs/models.md holds
the figures with this command.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import spearmanr

from mtrec.config import apply_override, example_path, parse_config
from mtrec.data.synth import WorldParams, read_world, world_params, write_world
from mtrec.errors import MtrecError
from mtrec.eval.evaluate import evaluate_day
from mtrec.train.local import train_days

CVR2 = [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"}]
ESM2_TASKS = [
    {"name": "ctr", "label": "click"},
    {"name": "dar", "label": "daction", "given": "ctr", "joint": "ctavr"},
    {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"},
]
THREE = [
    {"name": "ctr", "label": "click"},
    {"name": "watch_time", "label": "watch_time", "log1p": True, "weight": 0.5},
    {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"},
]
SHALLOW = {"hidden": [16], "feature_dropout": 0.1}
DUPN = {
    "arch": "dupn",
    "user_features": ["user_id", "user_segment", "age_bucket", "user_activity"],
    "tower": [128, 64],
}
VARIANTS = {  # name: (tasks, model)
    "naive_cvr": (CVR2, {"arch": "naive_cvr"}),
    "esmm": (CVR2, {"arch": "esmm"}),
    "esm2": (ESM2_TASKS, {"arch": "esm2", "daction_task": "dar"}),
    "esmm+shallow": (CVR2, {"arch": "esmm", "shallow_tower": SHALLOW}),
    "shared_bottom": (THREE, {"arch": "shared_bottom", "bottom": [256, 128], "tower": [64]}),
    "mmoe": (THREE, {"arch": "mmoe", "num_experts": 4, "expert": [256, 128], "tower": [64]}),
    "mmoe+shallow": (
        THREE,
        {
            "arch": "mmoe",
            "num_experts": 4,
            "expert": [256, 128],
            "tower": [64],
            "shallow_tower": {**SHALLOW, "apply_to": ["ctr"]},
        },
    ),  # the shipped mmoe example's model
    "ple": (
        THREE,
        {"arch": "ple", "levels": 2, "shared_experts": 2, "task_experts": 1, "expert": [128], "tower": [64]},
    ),
    # the behaviour sequence mean-pooled into ESMM's towers (the esmm_seq example's features); needs a
    # world with histories: --preset sequences
    "esmm+seq": (CVR2, {"arch": "esmm"}),
    # DUPN (the dupn example's model) and its ablations: the attention replaced by the mean of the
    # LSTM's states or by its last state, the transformer layer for the LSTM, the paper's readout
    # (the states only, without the behaviours' own embeddings)
    "dupn": (CVR2, DUPN),
    "dupn-mean": (CVR2, {**DUPN, "readout": "mean"}),
    "dupn-last": (CVR2, {**DUPN, "readout": "last"}),
    "dupn-transformer": (CVR2, {**DUPN, "encoder": "transformer", "hidden": 64}),
    "dupn-states": (CVR2, {**DUPN, "with_behaviours": False}),  # the paper's readout: the states only
}
# variants that read the esmm_seq example's features (sequences included); the others read esm2's,
# the same features without the sequence
WITH_SEQUENCES = {"esmm+seq", *(v for v in VARIANTS if v.startswith("dupn"))}


def variant_config(name: str, logs: str, batch_size: int, seed: int, overrides: list[str] | None = None):
    base = yaml.safe_load(example_path("esmm_seq" if name in WITH_SEQUENCES else "esm2").read_text())
    tasks, model = VARIANTS[name]
    # the example's towers' batch norm carries over: the variants differ in architecture only
    model = {"batch_norm": base["model"].get("batch_norm", False), **copy.deepcopy(model)}
    base.update(name=name.replace("+", "_"), tasks=copy.deepcopy(tasks), model=model)
    base["train"].update(batch_size=batch_size, seed=seed)
    base["job"].update(logs=logs)
    for item in overrides or []:
        apply_override(base, item)
    return parse_config(base)


def base_rate_start(cfg, day: dt.date, given: bool = False) -> dict:
    """A fresh model whose binary root towers start at the log-odds of their label's rate on `day`
    instead of p = 0.5 (with `given`, a `given` task's too, at its rate among the parent's
    positives): the `dmp` / `optimizer` arguments of `train_days`."""
    import pyarrow.dataset as pads

    from mtrec.spec import LabelKind
    from mtrec.train.local import build_sharded

    dmp, optimizer = build_sharded(cfg)
    t = pads.dataset(f"{cfg.job.logs}/dt={day}").to_table()
    towers = getattr(dmp.module.model, "towers", {})
    with torch.no_grad():
        for task in cfg.spec.tasks:
            if cfg.spec.label_kind(task) != LabelKind.BINARY or task.name not in towers:
                continue
            if task.given is not None and not given:
                continue
            y = t.column(task.label).to_numpy().astype(np.float64)
            if task.given is not None:
                y = y[t.column(cfg.spec.task(task.given).label).to_numpy() > 0]
            rate = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
            towers[task.name].out.bias.fill_(float(np.log(rate / (1 - rate))))
    return {"dmp": dmp, "optimizer": optimizer}


def position_logits(model) -> np.ndarray:
    """The shallow tower's logit per position (device 0), eval mode."""
    st = model.shallow_tower
    st.eval()
    with torch.no_grad():
        pos = torch.arange(st.embeddings[0].num_embeddings)
        return st(torch.stack([pos, torch.zeros_like(pos)], dim=1)).numpy()


METRICS = [
    ("ctr/auc", "CTR AUC"),
    ("ctr/auc_unbiased", "unbiased CTR AUC"),
    ("cvr/auc", "CVR AUC (clicked rows)"),
    ("cvr/auc_entire_space", "**entire-space CVR AUC**"),
    ("ctcvr/auc", "CTCVR AUC"),
    ("watch_time/pearson", "watch-time pearson"),
]


def run_seed(args, seed: int, out: str) -> dict[str, dict]:
    """Write (or reuse) the world of `seed` at `out`, train and evaluate every model on it."""
    params = world_params(args.world, args.preset, flag="--world")
    if not Path(out, "_world.json").exists():
        write_world(out, args.days, args.rows, seed=seed, params=params)
    world = read_world(out)
    # a reused world must be the one asked for
    want = {"seed": seed, "days": args.days, "rows": args.rows, "params": asdict(params)}
    have = {
        "seed": world["seed"],
        "days": len(world["days"]),
        "rows": world["rows"][0],
        "params": {k: tuple(v) if isinstance(v, list) else v for k, v in world["params"].items() if k != "examination"},
    }
    if have != want:
        raise MtrecError(
            f"{out} holds another world ({', '.join(k for k in want if want[k] != have[k])} differ); "
            "pass another --out or delete it"
        )
    days = [dt.date.fromisoformat(d) for d in world["days"]]
    train, test = days[:-1], days[-1]
    exam = np.array(world["params"]["examination"])
    default = asdict(WorldParams())
    changed = {k: v for k, v in want["params"].items() if v != default[k]}
    print(
        f"world {out}: train {train[0]}..{train[-1]} ({len(train)} x {args.rows:,} rows), evaluate {test}; "
        f"batch {args.batch_size}; seed {world['seed']}; parameters {changed or 'default'}"
    )
    by = {}
    fits = [v for v in VARIANTS if v not in WITH_SEQUENCES or params.history]  # histories are in the logs
    names = args.models.split(",") if args.models else fits
    for name in names:
        cfg = variant_config(name, out, args.batch_size, seed, args.set)
        t0 = time.perf_counter()
        start = base_rate_start(cfg, train[0], args.init == "base_rate_all") if args.init != "default" else {}
        res = train_days(cfg, train, **start)
        m = evaluate_day(res.model, cfg.spec, cfg.job.logs, test)
        row = {"model": name, "rows/s": res.counts.good / res.seconds, "secs": time.perf_counter() - t0, **m}
        if res.model.shallow_tower is not None:
            logits = position_logits(res.model)
            row["pos_spearman"] = spearmanr(logits, exam).statistic
            row["pos_logits"] = [round(float(x), 2) for x in logits - logits[0]]
        by[name] = row
        print(
            f"{name:<14} ctr auc {m['ctr/auc']:.4f} unbiased {m['ctr/auc_unbiased']:.4f} | cvr auc(clicked) "
            f"{m['cvr/auc']:.4f} entire-space {m['cvr/auc_entire_space']:.4f} | ctcvr auc {m['ctcvr/auc']:.4f}"
            + (f" | watch pearson {m['watch_time/pearson']:.4f}" if "watch_time/pearson" in m else "")
            + (f" | pos spearman {row['pos_spearman']:.3f} {row['pos_logits']}" if "pos_spearman" in row else "")
            + f" | ctr calibration {m['ctr/calibration']:.3f}"
            + f" | {row['rows/s']:,.0f} rows/s",
            flush=True,
        )
    r0 = next(iter(by.values()))
    print(
        f"oracle ceilings: ctr unbiased {r0['ctr/auc_unbiased_oracle']:.4f}, "
        f"cvr entire-space {r0['cvr/auc_entire_space_oracle']:.4f}"
    )
    return by


def claims(by_seed: list[dict[str, dict]]) -> list[str]:
    """Issue 3's comparisons, per seed and as the mean over seeds."""

    def line(label, target, f, needs):
        if not all(set(needs) <= by.keys() for by in by_seed):
            return None
        vals = [f(by) for by in by_seed]
        per = ", ".join(f"{v:+.4f}" for v in vals)
        return f"{label}: {np.mean(vals):+.4f}" + (f" (mean of {per})" if len(vals) > 1 else "") + f" (target {target})"

    es = "cvr/auc_entire_space"
    avg = lambda r: np.mean([r["ctr/auc"], r["cvr/auc"], r["ctcvr/auc"]])  # noqa: E731
    out = [
        line(
            "esmm - naive_cvr entire-space CVR AUC",
            ">= +0.01",
            lambda b: b["esmm"][es] - b["naive_cvr"][es],
            ["esmm", "naive_cvr"],
        ),
        line(
            "esm2 - esmm entire-space CVR AUC", ">= -0.002", lambda b: b["esm2"][es] - b["esmm"][es], ["esmm", "esm2"]
        ),
        line(
            "shallow - plain unbiased CTR AUC",
            "> 0",
            lambda b: b["esmm+shallow"]["ctr/auc_unbiased"] - b["esmm"]["ctr/auc_unbiased"],
            ["esmm", "esmm+shallow"],
        ),
        line(
            "esmm+shallow position-logit Spearman",
            ">= 0.9",
            lambda b: b["esmm+shallow"]["pos_spearman"],
            ["esmm+shallow"],
        ),
    ]
    out.append(
        line(
            "esmm+seq - esmm unbiased CTR AUC",
            ">= +0.01 on every seed",
            lambda b: b["esmm+seq"]["ctr/auc_unbiased"] - b["esmm"]["ctr/auc_unbiased"],
            ["esmm", "esmm+seq"],
        )
    )
    unbiased = lambda r: r["ctr/auc_unbiased"]  # noqa: E731
    out.append(
        line(
            "dupn - best of mmoe, shared_bottom unbiased CTR AUC",
            ">= +0.01 on every seed",
            lambda b: unbiased(b["dupn"]) - max(unbiased(b["mmoe"]), unbiased(b["shared_bottom"])),
            ["dupn", "mmoe", "shared_bottom"],
        )
    )
    for other in ("esmm+seq", "dupn-states", "dupn-mean", "dupn-last", "dupn-transformer"):
        out.append(
            line(
                f"dupn - {other} unbiased CTR AUC",
                "measured",
                lambda b, o=other: unbiased(b["dupn"]) - unbiased(b[o]),
                ["dupn", other],
            )
        )
    for name in ("mmoe", "ple"):
        out.append(
            line(
                f"{name} - shared_bottom mean AUC (ctr, cvr, ctcvr)",
                "> 0",
                lambda b, n=name: avg(b[n]) - avg(b["shared_bottom"]),
                [name, "shared_bottom"],
            )
        )
    return [x for x in out if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--rows", type=int, default=200_000)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--seeds", help="comma-separated seeds (world and training), e.g. 0,1,2: every figure per seed and their mean"
    )
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument(
        "--models", help="comma-separated variants (default: every one that fits the world: esmm+seq needs histories)"
    )
    ap.add_argument("--out", help="world dir, reused when it exists (with --seeds: a folder per seed under it)")
    ap.add_argument(
        "--init",
        choices=("default", "base_rate", "base_rate_all"),
        default="default",
        help="base_rate: binary root towers start at their label's log-odds on the first day (not p = 0.5); "
        "base_rate_all: `given` tasks too, at their rate among the parent's positives",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every model (repeatable), e.g. train.embedding_optimizer.lr=0.1, "
        "features.sparse.*.dim=16, features.sparse.*.hash_size=x8, train.shuffle.buffer_rows=0",
    )
    ap.add_argument("--preset", help="a named world variant (mtrec.data.synth.PRESETS), e.g. item_quality")
    ap.add_argument(
        "--world", action="append", default=[], metavar="PARAM=VALUE", help="a WorldParams field (repeatable)"
    )
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    root = args.out or tempfile.mkdtemp(prefix="mtrec-compare-")
    try:
        by_seed = [run_seed(args, seed, str(Path(root, f"seed{seed}")) if args.seeds else root) for seed in seeds]
    except MtrecError as e:
        sys.exit(f"compare_models: error: {e}")
    names = list(by_seed[0])
    print(f"\nmean over seeds {','.join(map(str, seeds))}:" if len(seeds) > 1 else "")
    print("| model | " + " | ".join(label for _, label in METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for name in names:
        cells = [f"{np.mean([by[name][k] for by in by_seed]):.4f}" if k in by_seed[0][name] else "" for k, _ in METRICS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    oracle = [
        np.mean([by[names[0]][k] for by in by_seed]) for k in ("ctr/auc_unbiased_oracle", "cvr/auc_entire_space_oracle")
    ]
    print(f"| oracle (truth) | | {oracle[0]:.4f} | | {oracle[1]:.4f} | | |")
    for text in claims(by_seed):
        print(text)


if __name__ == "__main__":
    main()
