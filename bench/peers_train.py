"""Train one peer library's model on rows exported by bench/quality_peers.py and write its
next-day predictions. Runs inside the bench-only venv (DeepCTR-Torch, torch-rechub), not mtrec's:

    bench/.peers-venv/bin/python bench/peers_train.py --data DIR --model deepctr_esmm --seed 0 --out P.npz

Each model is trained the way its library's own examples train it: its own model class, its own
training loop, one Adam over every parameter (lr 0.001), the whole training set shuffled, one pass.
Inputs (DIR/train.npz, DIR/test.npz, DIR/meta.json) are the same rows and features as mtrec's models
read, ids encoded exactly (a vocabulary of the training days, one out-of-vocabulary row). Writes
pCTR, pCVR and pCTCVR of every test row, in the test file's row order.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ("deepctr_esmm", "deepctr_mmoe", "rechub_esmm")


def load(data: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    meta = json.loads((data / "meta.json").read_text())
    train = dict(np.load(data / "train.npz"))
    test = dict(np.load(data / "test.npz"))
    return meta, train, test


def deepctr_columns(meta: dict) -> list:
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    cols = []
    for f in meta["sparse"]:
        feat = SparseFeat(f["name"], vocabulary_size=f["rows"], embedding_dim=f["dim"])
        cols.append(VarLenSparseFeat(feat, maxlen=f["maxlen"], combiner="mean") if f["maxlen"] else feat)
    cols += [DenseFeat(name, 1) for name in meta["dense"]]
    return cols


def train_deepctr(arch: str, meta: dict, train: dict, test: dict, args) -> np.ndarray:
    """DeepCTR-Torch's ESMM or MMOE, its `compile` / `fit` / `predict`: tasks ctr (click) and
    ctcvr (click and conversion) on every impression, binary cross-entropy each."""
    from deepctr_torch.models.multitask import ESMM, MMOE

    cols = deepctr_columns(meta)
    names = [f["name"] for f in meta["sparse"]] + meta["dense"]
    x = {n: train[n] for n in names}
    y = np.stack([train["click"], train["click"] * train["conversion"]], axis=1).astype(np.float32)
    common = {"task_types": ("binary", "binary"), "task_names": ("ctr", "ctcvr"), "seed": args.seed}
    if args.bn != "default":
        common["dnn_use_bn"] = args.bn == "on"  # an ablation: the library's default is off
    if arch == "esmm":
        model = ESMM(cols, tower_dnn_hidden_units=tuple(meta["tower"]), **common)
    else:
        model = MMOE(
            cols,
            num_experts=meta["num_experts"],
            expert_dnn_hidden_units=tuple(meta["expert"]),
            tower_dnn_hidden_units=tuple(meta["mmoe_tower"]),
            **common,
        )
    model.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"])
    model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, shuffle=True)
    return model.predict({n: test[n] for n in names}, batch_size=8192)  # N x 2: pctr, pctcvr


def train_rechub_esmm(meta: dict, train: dict, test: dict, args) -> np.ndarray:
    """torch-rechub's ESMM and MTLTrainer's epoch loop. Its ESMM reads categorical features of one
    embedding size only (no dense inputs): every table at `rechub_dim` and each dense feature as
    its training-day quantile bucket, as its Ali-CCP example does."""
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import ESMM
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import TorchDataset

    dim = meta["rechub_dim"]
    feats = [
        SequenceFeature(f["name"], f["rows"], embed_dim=dim, pooling="mean", padding_idx=0)
        if f["maxlen"]
        else SparseFeature(f["name"], f["rows"], embed_dim=dim)
        for f in meta["sparse"]
    ]
    feats += [SparseFeature(f"{n}__bucket", meta["buckets"] + 1, embed_dim=dim) for n in meta["dense"]]
    user = [f for f in feats if f.name in meta["user_features"]]
    item = [f for f in feats if f.name not in meta["user_features"]]
    tower = {"dims": list(meta["tower"]), "activation": "relu", "dropout": 0}
    model = ESMM(user, item, cvr_params=dict(tower), ctr_params=dict(tower))
    if args.bn == "off":  # an ablation: the library's MLP has batch norm after every hidden layer
        for mlp in (model.tower_cvr.mlp, model.tower_ctr.mlp):
            for i, layer in enumerate(mlp):
                if isinstance(layer, torch.nn.BatchNorm1d):
                    mlp[i] = torch.nn.Identity()
    names = [f.name for f in feats]
    # MTLTrainer's ESMM trains outputs 1 (ctr) and 2 (ctcvr); output 0 (cvr) has no loss
    y = np.stack([train["conversion"], train["click"], train["click"] * train["conversion"]], axis=1)
    loader = DataLoader(
        TorchDataset({n: train[n] for n in names}, y.astype(np.float32)), batch_size=args.batch_size, shuffle=True
    )
    trainer = MTLTrainer(model, task_types=["classification"] * 3, n_epoch=1, model_path=str(args.out.parent))
    trainer.train_one_epoch(loader)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(test["click"]), 8192):
            batch = {n: torch.from_numpy(test[n][start : start + 8192]) for n in names}
            out.append(model(batch).numpy())
    p = np.concatenate(out)  # cvr, ctr, ctcvr
    return p[:, [1, 2]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", choices=MODELS, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--bn", choices=("default", "on", "off"), default="default", help="towers' batch norm (an ablation)"
    )
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    meta, train, test = load(args.data)
    t0 = time.perf_counter()
    if args.model == "rechub_esmm":
        p = train_rechub_esmm(meta, train, test, args)
    else:
        p = train_deepctr(args.model.split("_")[1], meta, train, test, args)
    secs = time.perf_counter() - t0
    pctr = np.clip(p[:, 0].astype(np.float64), 1e-7, 1 - 1e-7)
    pctcvr = p[:, 1].astype(np.float64)
    # ESMM's pCVR is pCTCVR / pCTR exactly; for MMOE (two independent heads) it is the ratio, capped at 1
    pcvr = np.clip(pctcvr / pctr, 0.0, 1.0)
    np.savez(args.out, ctr=pctr, cvr=pcvr, ctcvr=pctcvr, seconds=np.array(secs))
    print(json.dumps({"model": args.model, "seconds": round(secs, 1), "rows": int(len(train["click"]))}))


if __name__ == "__main__":
    main()
