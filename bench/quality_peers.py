"""mtrec's models and the public libraries a user would pick instead, on the same rows, features and
truth metrics: DeepCTR-Torch (ESMM, MMOE) and torch-rechub (ESMM).

    .venv/bin/python bench/quality_peers.py --seeds 0,1,2 --presets default,item_quality --out /tmp/peers

Per preset and seed: one synthetic world (days 1..N-1 train, day N is scored against the truth),
mtrec's models trained as bench/compare_models.py trains them (one pass, single process through
DistributedModelParallel), and each peer trained by bench/peers_train.py in a bench-only venv
(built here from bench/peers-lock.txt on first use: torch==2.13.0, then the peers with --no-deps,
so nothing pulls a CUDA torch). The peers read the same good rows (mtrec's validated stream),
with the same features, ids encoded exactly (vocabulary of the training days, one out-of-vocabulary
row), and are scored by mtrec's own `report` (mtrec.eval.evaluate), truth included.

Prints a table per preset (means over seeds) and
`quality <preset> mtrec-best_peer ctr: X es_cvr: Y`: the best mtrec model's mean unbiased CTR AUC
(against the true click probability) minus the best peer's, and the same for the entire-space CVR
AUC. docs/benchmarks.md holds the figures with this command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from compare_models import run_seed, variant_config  # noqa: E402

from mtrec.data.kinds import dense_input  # noqa: E402
from mtrec.data.synth import read_world  # noqa: E402
from mtrec.errors import MtrecError  # noqa: E402
from mtrec.eval.evaluate import Predictions, read_truth, report  # noqa: E402
from mtrec.train.stream import StreamCounts, day_batches  # noqa: E402

HERE = Path(__file__).parent
LOCK = HERE / "peers-lock.txt"
PEERS = ("deepctr_esmm", "deepctr_mmoe", "rechub_esmm")
MTREC = ("esmm", "mmoe")
BUCKETS = 10  # dense features as quantile buckets, for torch-rechub's ESMM (categorical inputs only)
RECHUB_DIM = 16  # torch-rechub's ESMM takes one embedding size for every feature
USER_FEATURES = ("user_id", "user_segment", "age_bucket", "user_activity__bucket")
COLUMNS = [
    ("ctr/auc", "CTR AUC"),
    ("ctr/auc_unbiased", "unbiased CTR AUC"),
    ("cvr/auc", "CVR AUC (clicked)"),
    ("cvr/auc_entire_space", "entire-space CVR AUC"),
    ("ctcvr/auc", "CTCVR AUC"),
    ("ctr/calibration", "CTR calibration"),
]


def ensure_venv(venv: Path) -> Path:
    """The bench-only venv with the peers (built once; rebuilt when peers-lock.txt changes)."""
    python = venv / "bin" / "python"
    stamp = venv / f".lock-{hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]}"
    if stamp.exists():
        return python
    print(f"building the peers' venv at {venv} (torch==2.13.0, then {LOCK.name} with --no-deps)", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "--no-deps", "-r", str(LOCK)], check=True)
    subprocess.run([str(python), "-m", "pip", "check"], check=True)
    stamp.touch()
    return python


def good_rows(cfg, days: list[dt.date]) -> pa.Table:
    """The good rows of `days`, as mtrec's stream yields them (validated, file order)."""
    batches = list(day_batches(cfg.spec, cfg.job.logs, days, 65536, StreamCounts()))
    return pa.Table.from_batches(batches)


def encode(cfg, train: pa.Table, test: pa.Table) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Exact index encoding fitted on the training rows: id -> 1 + its rank in the training
    vocabulary, 0 for an id the training days never saw; a multi-hot list padded with 0 (1 = unseen);
    dense features as mtrec reads them (signed log1p where the config says), min-max scaled on the
    training rows, and as quantile buckets."""
    meta = {"sparse": [], "dense": [], "buckets": BUCKETS, "rechub_dim": RECHUB_DIM, "user_features": USER_FEATURES}
    out_tr: dict[str, np.ndarray] = {}
    out_te: dict[str, np.ndarray] = {}
    for f in cfg.spec.features.sparse:
        if f.multi_hot:
            lists_tr = train.column(f.name).to_pylist()
            lists_te = test.column(f.name).to_pylist()
            vocab = np.unique(np.concatenate([np.asarray(v or [], np.int64) for v in lists_tr]))
            maxlen = max(len(v or []) for v in lists_tr)
            for lists, out in ((lists_tr, out_tr), (lists_te, out_te)):
                arr = np.zeros((len(lists), maxlen), np.int64)
                for i, v in enumerate(lists):
                    ids = np.asarray((v or [])[:maxlen], np.int64)
                    pos = np.searchsorted(vocab, ids)
                    seen = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == ids)
                    arr[i, : len(ids)] = np.where(seen, pos + 2, 1)
                out[f.name] = arr
            meta["sparse"].append({"name": f.name, "rows": len(vocab) + 2, "dim": f.dim, "maxlen": maxlen})
            continue
        tr = train.column(f.name).to_numpy()
        vocab = np.unique(tr)
        for col, out in ((tr, out_tr), (test.column(f.name).to_numpy(), out_te)):
            pos = np.searchsorted(vocab, col)
            seen = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == col)
            out[f.name] = np.where(seen, pos + 1, 0).astype(np.int64)
        meta["sparse"].append({"name": f.name, "rows": len(vocab) + 1, "dim": f.dim, "maxlen": 0})
    for f in cfg.spec.features.dense:
        tr, te = (dense_input(f, t.column(f.name)).astype(np.float64) for t in (train, test))
        lo, hi = tr.min(), tr.max()
        edges = np.unique(np.quantile(tr, np.linspace(0, 1, BUCKETS + 1)[1:-1]))
        for x, out in ((tr, out_tr), (te, out_te)):
            out[f.name] = ((x - lo) / max(hi - lo, 1e-12)).astype(np.float32)
            out[f"{f.name}__bucket"] = np.searchsorted(edges, x, side="right").astype(np.int64)
        meta["dense"].append(f.name)
    for t, out in ((train, out_tr), (test, out_te)):
        for c in ("click", "conversion"):
            out[c] = t.column(c).to_numpy().astype(np.float32)
    # what scoring needs beside the predictions: the raw user ids (GAUC) and row ids (the truth)
    out_te["__user_id"] = test.column("user_id").to_numpy()
    out_te["__row_id"] = test.column("row_id").to_numpy()
    return meta, out_tr, out_te


def export(world: str, batch_size: int, seed: int, data: Path) -> None:
    """The world's training days and test day, encoded for the peers, in `data`."""
    if (data / "meta.json").exists():
        return
    days = [dt.date.fromisoformat(d) for d in read_world(world)["days"]]
    esmm, mmoe = (variant_config(v, world, batch_size, seed) for v in MTREC)
    meta, tr, te = encode(esmm, good_rows(esmm, days[:-1]), good_rows(esmm, days[-1:]))
    meta.update(
        tower=esmm.spec.model.tower,
        num_experts=mmoe.spec.model.num_experts,
        expert=mmoe.spec.model.expert,
        mmoe_tower=mmoe.spec.model.tower,
    )
    data.mkdir(parents=True, exist_ok=True)
    np.savez(data / "train.npz", **tr)
    np.savez(data / "test.npz", **te)
    (data / "meta.json").write_text(json.dumps(meta, indent=1))


def score_peer(world: str, batch_size: int, seed: int, preds: Path) -> dict[str, float]:
    """mtrec's report (truth metrics included) of a peer's predictions of the test day, whose rows,
    labels and ids the export beside them holds (`encode`)."""
    cfg = variant_config("esmm", world, batch_size, seed)
    test_day = dt.date.fromisoformat(read_world(world)["days"][-1])
    test = np.load(preds.parent / "test.npz")
    p = np.load(preds)
    pred = Predictions(
        {k: p[k] for k in ("ctr", "cvr", "ctcvr")},
        {c: test[c] for c in ("click", "conversion")},
        test["__user_id"],
        test["__row_id"],
    )
    return {**report(cfg.spec, pred, read_truth(world, test_day)), "secs": float(p["seconds"])}


def run_world(args, python: Path, preset: str, seed: int) -> dict[str, dict]:
    world = str(Path(args.out, preset, f"seed{seed}"))
    ns = argparse.Namespace(
        world=[],
        preset=None if preset == "default" else preset,
        days=args.days,
        rows=args.rows,
        batch_size=args.batch_size,
        models=",".join(args.mtrec) or "esmm",
        set=args.set,
        init="default",
    )
    if args.mtrec or not Path(world, "_world.json").exists():  # run_seed writes the world
        by = {f"mtrec {k}": v for k, v in run_seed(ns, seed, world).items() if k in args.mtrec}
    else:
        by = {}
    data = Path(world, "_peers")
    export(world, args.batch_size, seed, data)
    extra = args.peer_args.split()
    for peer in args.peers:
        preds = data / f"{peer}-seed{seed}{''.join(extra)}.npz"
        t0 = time.perf_counter()
        cmd = [str(python), str(HERE / "peers_train.py"), "--data", str(data), "--model", peer]
        cmd += ["--seed", str(seed), "--batch-size", str(args.batch_size), "--out", str(preds), *extra]
        if not preds.exists():  # a peer's run is a function of the rows, its flags and the seed: reused
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        m = score_peer(world, args.batch_size, seed, preds)
        name = " ".join([peer, *extra])
        by[name] = m
        print(
            f"{name:<14} ctr auc {m['ctr/auc']:.4f} unbiased {m['ctr/auc_unbiased']:.4f} | cvr auc(clicked) "
            f"{m['cvr/auc']:.4f} entire-space {m['cvr/auc_entire_space']:.4f} | ctcvr auc {m['ctcvr/auc']:.4f} | "
            f"ctr calibration {m['ctr/calibration']:.3f} | {m['secs']:.0f} s train ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return by


def summarize(preset: str, by_seed: list[dict[str, dict]]) -> list[str]:
    names = list(by_seed[0])
    mean = {n: {k: float(np.mean([b[n][k] for b in by_seed])) for k, _ in COLUMNS} for n in names}
    lines = [f"\n{preset} world, mean over {len(by_seed)} seed(s):"]
    lines.append("| model | " + " | ".join(label for _, label in COLUMNS) + " |")
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    lines += [f"| {n} | " + " | ".join(f"{mean[n][k]:.4f}" for k, _ in COLUMNS) + " |" for n in names]
    ours = [n for n in names if n.startswith("mtrec ")]
    peers = [n for n in names if not n.startswith("mtrec ")]
    if ours and peers:

        def gap(key: str) -> float:
            return max(mean[n][key] for n in ours) - max(mean[n][key] for n in peers)

        lines.append(
            f"quality {preset} mtrec-best_peer ctr: {gap('ctr/auc_unbiased'):+.4f} "
            f"es_cvr: {gap('cvr/auc_entire_space'):+.4f}"
        )
        lines.append(
            f"  (also: label CTR AUC {gap('ctr/auc'):+.4f}, CVR AUC on clicks {gap('cvr/auc'):+.4f}, "
            f"CTCVR AUC {gap('ctcvr/auc'):+.4f})"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=6, help="days in each world: all but the last train")
    ap.add_argument("--rows", type=int, default=200_000, help="rows per day")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (world and training)")
    ap.add_argument("--presets", default="default,item_quality", help="world presets; `default` is the plain world")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--mtrec", default=",".join(MTREC), help=f"mtrec's models (of compare_models), default {MTREC}")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"peer models, default {PEERS}")
    ap.add_argument("--out", required=True, help="worlds and exports, reused when they exist")
    ap.add_argument("--peer-args", default="", help="extra flags for every peer (ablations), e.g. '--bn off'")
    ap.add_argument("--venv", type=Path, default=HERE / ".peers-venv", help="the peers' venv (built when missing)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for mtrec's models"
    )
    args = ap.parse_args()
    args.mtrec = [m for m in args.mtrec.split(",") if m]
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        sys.exit(f"quality_peers: error: unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    python = ensure_venv(args.venv) if args.peers else Path(sys.executable)
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = []
    try:
        for preset in args.presets.split(","):
            lines += summarize(preset, [run_world(args, python, preset, s) for s in seeds])
    except MtrecError as e:
        sys.exit(f"quality_peers: error: {e}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
