"""Representation transfer (DUPN, section 3.3): a task DUPN was not trained on, learned from scratch
or from a trained DUPN's weights, AUC against training steps.

    .venv/bin/python bench/transfer.py --days 6 --rows 100000 --seeds 0,1,2

On a world of the sequences preset: the dupn example's model (CTR and CVR) trains on days 1..N-2.
The new task, add-to-cart (`daction` on every impression), then trains on day N-1, one pass, as

* RS: a fresh DUPN with that task alone;
* RT: the same, its tensors read from the trained DUPN (`train.init_from`) and its user part frozen
  (`train.freeze: [user]`: encoder, attention, user tower, the tables the user side reads);
* FT: read from the trained DUPN, everything trained (fine-tuning);
* RA: a fresh DUPN with all the tasks (ctr, cvr and add-to-cart) trained on days 1..N-2 like the
  source DUPN, then on day N-1 (step 0 is the end of days 1..N-2);

and is scored on day N (AUC of add-to-cart) after the steps given by --steps. Prints one table per
seed, the means and spreads, and `transfer FT-RS at step S: X (min .. max)`; with --plot, draws
the mean AUC against steps per arm, the seeds' range shaded. Single process
(DistributedModelParallel at world size 1), batch 512.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from mtrec.config import example_path, parse_config
from mtrec.data.synth import read_world, world_params, write_world
from mtrec.eval.evaluate import evaluate_day
from mtrec.train import checkpoint as ck
from mtrec.train.local import build_sharded, train_days
from mtrec.train.loop import LoopOptions, train_stream
from mtrec.train.sharding import device_for_backend
from mtrec.train.stream import day_batches

ARMS = ("RS", "RT", "FT", "RA")
CART = [{"name": "cart", "label": "daction"}]


def config(logs: str, seed: int, batch: int, arm: str | None = None, init: str | None = None):
    """The dupn example (arm None), or the add-to-cart model of an arm (RA: with the example's tasks)."""
    d = yaml.safe_load(example_path("dupn").read_text())
    d["job"].update(logs=logs, workdir=tempfile.mkdtemp(prefix="transfer-"))
    d["tracking"] = {"enabled": False}
    d["train"].update(batch_size=batch, seed=seed)
    if arm is not None:
        d.update(name="cart", tasks=(d["tasks"] if arm == "RA" else []) + copy.deepcopy(CART))
        if arm in ("RT", "FT"):
            d["train"]["init_from"] = init
        if arm == "RT":
            d["train"]["freeze"] = ["user"]
    return parse_config(d)


def run_arm(arm: str, logs: str, days: list[dt.date], seed: int, args, init: str) -> dict[int, float]:
    """AUC of add-to-cart on the last day after each of `args.steps` steps on the day before."""
    cfg = config(logs, seed, args.batch_size, arm, init)
    dmp, opt = build_sharded(cfg)
    if cfg.train.init_from:
        ck.load_matching(dmp, cfg.train.init_from)
    if arm == "RA":  # every task, from scratch, on the source DUPN's days first
        train_days(cfg, days[:-2], dmp=dmp, optimizer=opt)
    steps = sorted(int(s) for s in args.steps.split(","))
    curve: dict[int, float] = {}

    def on_step(step: int) -> None:
        if step in steps:
            curve[step] = evaluate_day(dmp.module.model, cfg.spec, logs, days[-1])["cart/auc"]

    if 0 in steps:
        on_step(0)
    device, _ = device_for_backend()
    batches = day_batches(cfg.spec, logs, [days[-2]], cfg.train.batch_size)
    stats = train_stream(dmp, opt, batches, cfg, device, LoopOptions(on_step=on_step, rng_key=days[-2].toordinal()))
    if stats.steps not in curve:  # the last step, wherever it falls
        curve[stats.steps] = evaluate_day(dmp.module.model, cfg.spec, logs, days[-1])["cart/auc"]
    return curve


def run_seed(args, seed: int, out: str) -> dict[str, dict[int, float]]:
    params = world_params(args.world, "sequences", flag="--world")
    if not Path(out, "_world.json").exists():
        write_world(out, args.days, args.rows, seed=seed, params=params)
    world = read_world(out)
    if len(world["days"]) != args.days or world["rows"][0] != args.rows or world["seed"] != seed:
        raise SystemExit(f"{out} holds another world; pass another --out or delete it")
    days = [dt.date.fromisoformat(d) for d in world["days"]]
    t0 = time.perf_counter()
    src = config(out, seed, args.batch_size)
    res = train_days(src, days[:-2])
    init = tempfile.mkdtemp(prefix="dupn-ck-")
    ck.save(res.dmp, res.optimizer, init, ck.spec_manifest(src))
    print(
        f"seed {seed}: DUPN (ctr, cvr) trained on {days[0]}..{days[-3]} in {time.perf_counter() - t0:.0f} s; "
        f"add-to-cart trains on {days[-2]}, scored on {days[-1]}"
    )
    curves = {}
    for arm in ARMS:
        t0 = time.perf_counter()
        curves[arm] = run_arm(arm, out, days, seed, args, init)
        line = "  ".join(f"{s}: {a:.4f}" for s, a in sorted(curves[arm].items()))
        print(f"  {arm}  {line}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", default="0,25,50,100,195", help="steps after which the new task is scored")
    ap.add_argument("--out", help="world dir, reused when it exists (a folder per seed under it)")
    ap.add_argument("--world", action="append", default=[], metavar="NAME=VALUE", help="a WorldParams override")
    ap.add_argument("--plot", help="write the curves as a PNG here")
    args = ap.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="transfer-world-")
    seeds = [int(s) for s in args.seeds.split(",")]
    by_seed = [run_seed(args, s, str(Path(root, f"seed{s}"))) for s in seeds]
    steps = sorted(set.intersection(*(set(c) for r in by_seed for c in r.values())))
    print(f"\nadd-to-cart AUC on the last day, mean over seeds {args.seeds} (min .. max):")
    print("| arm | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for arm in ARMS:
        cells = []
        for s in steps:
            v = np.array([r[arm][s] for r in by_seed])
            cells.append(f"{v.mean():.4f} ({v.min():.4f} .. {v.max():.4f})")
        print(f"| {arm} | " + " | ".join(cells) + " |")
    for s in steps:
        d = np.array([r["FT"][s] - r["RS"][s] for r in by_seed])
        print(f"transfer FT-RS at step {s}: {d.mean():+.4f} ({d.min():+.4f} .. {d.max():+.4f})")
    if args.plot:
        plot(by_seed, steps, args)


def plot(by_seed: list[dict[str, dict[int, float]]], steps: list[int], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        v = np.array([[r[arm][s] for s in steps] for r in by_seed])
        ax.plot(steps, v.mean(axis=0), marker="o", label=arm)
        ax.fill_between(steps, v.min(axis=0), v.max(axis=0), alpha=0.2)
    ax.set_xlabel(f"training steps on the new task's day (batch {args.batch_size})")
    ax.set_ylabel("add-to-cart AUC, next day")
    ax.set_title(f"representation transfer, seeds {args.seeds} (range shaded)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
