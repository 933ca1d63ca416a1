"""Is the `sequences` world's history learnable by a model that mean-pools it? A stand-in probe
until mtrec reads sequence features: plain PyTorch, one CTR tower.

    .venv/bin/python bench/sequence_probe.py --days 6 --rows 100000 --seeds 0,1,2

Per seed: writes the preset world; trains on days 1..N-1 (one pass, in order) an ESMM-like CTR
tower (the esmm example's sparse features, hash sizes and dims, its three dense features, tower
256-128-64, batch 2048, Adagrad 0.05 on embeddings, Adam on the rest) twice, without and with the
mean of the newest `--max-len` entries of hist_item_id and hist_item_category (tables of their own,
as a new sparse feature would get), and scores day N as served: truth CTR AUC, the prediction
against p_click_unbiased as a soft label. Prints both and the gain, for each dense learning rate.
It says what the world allows, not what mtrec's models will reach.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow.dataset as ds
import torch

from mtrec.data.synth import world_params, write_world
from mtrec.eval.metrics import auc

SPARSE = [
    ("user_id", 200_000, 16),
    ("item_id", 50_000, 16),
    ("user_segment", 64, 8),
    ("age_bucket", 16, 4),
    ("item_category", 128, 8),
    ("brand", 2048, 8),
    ("shop", 4096, 8),
    ("price_bucket", 16, 4),
]
HIST = [("hist_item_id", 50_000, 16), ("hist_item_category", 128, 8)]
TAGS = ("item_tags", 512, 8)


def _hash(x: np.ndarray, n: int) -> np.ndarray:
    x = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((x >> np.uint64(20)) % np.uint64(n)).astype(np.int64)


def _bag(column, n: int, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed values and row offsets of a list column, keeping each row's newest `max_len`."""
    a = column.combine_chunks()
    off, values = a.offsets.to_numpy().astype(np.int64), _hash(a.values.to_numpy(), n)
    start = off[:-1] if max_len is None else np.maximum(off[:-1], off[1:] - max_len)
    length = off[1:] - start
    ends = np.cumsum(length)
    idx = np.repeat(start - (ends - length), length) + np.arange(ends[-1] if ends.size else 0)
    return torch.from_numpy(values[idx]), torch.from_numpy(np.concatenate([[0], ends]))


def load(root: str, day: str, max_len: int) -> dict:
    t = ds.dataset(f"{root}/dt={day}").to_table()
    d: dict = {name: torch.from_numpy(_hash(t[name].to_numpy(), n)) for name, n, _ in SPARSE}
    d[TAGS[0]] = _bag(t[TAGS[0]], TAGS[1])
    for name, n, _ in HIST:
        d[name] = _bag(t[name], n, max_len)
    dense = [np.log1p(t["user_activity"].to_numpy()), np.log1p(t["item_price"].to_numpy())]
    dense.append(t["item_popularity"].to_numpy())
    d["dense"] = torch.from_numpy(np.stack(dense, axis=1).astype(np.float32))
    d["click"] = torch.from_numpy(t["click"].to_numpy().astype(np.float32))
    d["truth"] = ds.dataset(f"{root}/_truth/dt={day}").to_table()["p_click_unbiased"].to_numpy()
    d["rows"] = t.num_rows
    return d


class Tower(torch.nn.Module):
    def __init__(self, history: bool):
        super().__init__()
        self.history = history
        self.emb = torch.nn.ModuleDict({name: torch.nn.Embedding(n, dim) for name, n, dim in SPARSE})
        bags = [TAGS, *HIST] if history else [TAGS]
        self.bags = torch.nn.ModuleDict({name: torch.nn.EmbeddingBag(n, dim, mode="mean") for name, n, dim in bags})
        for table in [*self.emb.values(), *self.bags.values()]:  # TorchRec's default init
            torch.nn.init.uniform_(table.weight, -(table.weight.shape[0] ** -0.5), table.weight.shape[0] ** -0.5)
        width = sum(dim for *_, dim in SPARSE) + sum(dim for *_, dim in bags) + 3
        layers: list[torch.nn.Module] = []
        for w in (256, 128, 64):
            layers += [torch.nn.Linear(width, w), torch.nn.ReLU()]
            width = w
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def forward(self, d: dict, a: int, b: int) -> torch.Tensor:
        x = [self.emb[name](d[name][a:b]) for name, *_ in SPARSE]
        for name, bag in self.bags.items():
            values, off = d[name]
            x.append(bag(values[off[a] : off[b]], off[a:b] - off[a]))
        x.append(d["dense"][a:b])
        return self.mlp(torch.cat(x, dim=1)).squeeze(1)


def probe(data: list[dict], history: bool, dense_lr: float, batch: int = 2048) -> float:
    torch.manual_seed(0)
    model = Tower(history)
    sparse = [p for n, p in model.named_parameters() if not n.startswith("mlp")]
    opts = [torch.optim.Adagrad(sparse, lr=0.05), torch.optim.Adam(model.mlp.parameters(), lr=dense_lr)]
    for d in data[:-1]:
        for a in range(0, d["rows"], batch):
            b = min(a + batch, d["rows"])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(d, a, b), d["click"][a:b])
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
    d = data[-1]
    with torch.no_grad():
        pred = torch.cat([model(d, a, min(a + 8192, d["rows"])) for a in range(0, d["rows"], 8192)]).sigmoid()
    return auc(pred.numpy(), d["truth"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=6, help="days written: all but the last train, the last scores")
    ap.add_argument("--rows", type=int, default=100_000, help="rows per day")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--preset", default="sequences")
    ap.add_argument("--world", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    ap.add_argument("--max-len", type=int, default=50, help="history entries kept per row, newest")
    ap.add_argument("--dense-lr", default="0.001,0.003", help="comma-separated Adam learning rates of the tower")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = world_params(args.world, args.preset, flag="--world")
    for seed in (int(s) for s in args.seeds.split(",")):
        root = tempfile.mkdtemp(prefix="mtrec-probe-")
        s = write_world(root, days=args.days, rows_per_day=args.rows, seed=seed, params=params)
        data = [load(root, day, args.max_len) for day in s.days]
        for lr in (float(x) for x in args.dense_lr.split(",")):
            t0 = time.perf_counter()
            without, with_ = probe(data, False, lr), probe(data, True, lr)
            print(
                f"seed {seed} dense lr {lr:g}: truth CTR AUC without history {without:.4f}, mean-pooled history "
                f"{with_:.4f}, gain {with_ - without:+.4f} ({time.perf_counter() - t0:.0f}s)"
            )


if __name__ == "__main__":
    main()
