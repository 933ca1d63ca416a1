"""Split scoring of DUPN at serving: one request (a user and their history) with N candidates,
the user part computed once vs once per candidate.

    .venv/bin/python bench/dupn_split.py --candidates 10,100,1000

Builds the dupn example's model (random weights: speed does not depend on them) as the MLflow
pyfunc serves it (`ServedModel`), takes one user row with a full history from a sequences world
and N candidate items from the same day, and times `ServedModel.predict` on the N rows with the
user part shared (the default) and computed per row. Prints the medians and
`split speed-up at N=...: X` and the largest score difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtrec.config import load_config
from mtrec.data.synth import read_world, world_params, write_world
from mtrec.serving import ServedModel


def request(logs: str, day: str, n: int) -> pa.Table:
    """One user's row (the longest history of the day) repeated n times, each with another item."""
    t = pq.read_table(f"{logs}/dt={day}")
    user = int(np.argmax(pa.compute.list_value_length(t.column("hist_item_id")).to_numpy()))
    items = t.take(np.unique(t.column("item_id").to_numpy(), return_index=True)[1][:n])
    if items.num_rows < n:
        raise SystemExit(f"the day has {items.num_rows} distinct items, fewer than {n}: pass more --rows")
    cols = {}
    for name in t.column_names:
        item_side = name.startswith("item_") or name in ("brand", "shop", "price_bucket")
        cols[name] = items.column(name) if item_side else pa.repeat(t.column(name)[user], n)
    return pa.table(cols)


def timed(served: ServedModel, table: pa.Table, repeat: int) -> tuple[float, dict[str, np.ndarray]]:
    out = served.predict(table)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        served.predict(table)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default="10,100,1000")
    ap.add_argument("--rows", type=int, default=20_000, help="rows of the one-day world the request is taken from")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (serving usually pins one per request)")
    ap.add_argument("--out", help="world dir, reused when it exists")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logs = args.out or tempfile.mkdtemp(prefix="dupn-split-")
    if not Path(logs, "_world.json").exists():
        write_world(logs, days=1, rows_per_day=args.rows, seed=0, params=world_params([], "sequences"))
    day = read_world(logs)["days"][0]
    cfg = load_config("dupn", logs=logs)
    torch.manual_seed(0)
    from mtrec.models import build_model

    served = ServedModel(cfg.spec, build_model(cfg.spec.serving(), "cpu").state_dict(), {})
    print(
        f"dupn example (LSTM {cfg.model.hidden}, history max_len {cfg.features.sequences[0].max_len}), "
        f"{args.threads} torch thread(s), median of {args.repeat}"
    )
    for n in (int(x) for x in args.candidates.split(",")):
        table = request(logs, day, n)
        served.model.share_user_work = True
        split_s, split = timed(served, table, args.repeat)
        served.model.share_user_work = False
        row_s, per_row = timed(served, table, args.repeat)
        served.model.share_user_work = True
        diff = max(float(np.abs(split[k] - per_row[k]).max()) for k in split)
        print(
            f"N={n:>5}: split {split_s * 1e3:8.2f} ms, per row {row_s * 1e3:8.2f} ms "
            f"({n / split_s:,.0f} vs {n / row_s:,.0f} candidates/s), max |diff| {diff:.1e}"
        )
        print(f"split speed-up at N={n}: {row_s / split_s:.1f}")


if __name__ == "__main__":
    main()
