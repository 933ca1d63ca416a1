"""Hash collisions of the id -> embedding row mapping at a config's table sizes.

    .venv/bin/python bench/collisions.py                                 # esmm config, synthetic-world id counts
    .venv/bin/python bench/collisions.py --ids user_id=10000000 item_id=2000000

Ids are mapped to rows by splitmix64(id) mod hash_size (mtrec.data.kinds.hash_ids): any id works on
any day, and two ids that land on one row share its embedding. For n distinct ids in m rows the
expected share of ids that share their row with another id is 1 - (1 - 1/m)^(n - 1) ~ 1 - e^(-n/m);
this prints that and the share measured by hashing n random sparse int64 ids (as real logs have).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from mtrec.config import load_config
from mtrec.data.kinds import hash_ids

# distinct ids the synthetic world has seen by day 7 (20,000 users +3%/day, 5,000 items +5%/day)
WORLD_IDS = {"user_id": round(20_000 * 1.03**7), "item_id": round(5_000 * 1.05**7)}


def measured(n: int, m: int, seed: int = 0) -> tuple[float, float]:
    """(share of ids sharing their row, share of rows used) for n random distinct int64 ids."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(1, 2**62, size=int(n * 1.01) + 10, dtype=np.int64))[:n]
    rows = hash_ids(ids, m)
    counts = np.bincount(rows, minlength=m)
    return float((counts[rows] > 1).mean()), float((counts > 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="esmm")
    ap.add_argument(
        "--ids",
        nargs="*",
        default=[],
        help="feature=distinct_ids (default: the synthetic world's users and items by day 7)",
    )
    args = ap.parse_args()
    cfg = load_config(args.config)
    sizes = {f.name: f.hash_size for f in cfg.features.sparse}
    want = list(WORLD_IDS.items()) if not args.ids else [(k, int(v)) for k, v in (a.split("=") for a in args.ids)]
    print(
        f"{'feature':<10} {'hash_size':>10} {'distinct ids':>13} {'expected shared':>16} {'measured shared':>16} "
        f"{'rows used':>10}"
    )
    for name, n in want:
        m = sizes[name]
        expected = 1 - math.exp((n - 1) * math.log1p(-1 / m))
        shared, used = measured(n, m)
        print(f"{name:<10} {m:>10,} {n:>13,} {expected:>15.2%} {shared:>15.2%} {used:>10.1%}")


if __name__ == "__main__":
    main()
