"""BN statistics consistency on the synthetic world: what negative down-sampling does to BatchNorm's
running statistics, what the check says, and what recalibration does to next-day calibration.

For each sampling setting, ESMM with BatchNorm in its towers is trained single-process (the same
DMP model and loop the Ray workers run) on days 1-3; then, as served:
  check on day 4 -> recalibrate on day 4 -> check on day 4 again,
and the next-day metrics (day 5) before and after recalibration: calibration (sum p / sum y) and
AUC per task. Also the cost of one check and one recalibration.

    .venv/bin/python bench/bn_consistency.py --rows-per-day 100000 --rates 1.0,0.1 --repeat 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtrec import bn  # noqa: E402
from mtrec.config import load_config  # noqa: E402
from mtrec.data.synth import world_params, write_world  # noqa: E402
from mtrec.eval.evaluate import evaluate_day  # noqa: E402
from mtrec.serving import ServedModel  # noqa: E402
from mtrec.train import checkpoint  # noqa: E402
from mtrec.train.local import train_days  # noqa: E402

DAY1 = dt.date(2026, 1, 1)
DAYS = [DAY1 + dt.timedelta(days=i) for i in range(5)]


def config(logs: str, rate: float, repeat: int):
    d = load_config("esmm", logs=logs).model_dump(mode="json")
    d["model"]["batch_norm"] = True
    d["train"]["batch_size"] = 512
    d["train"]["sampling"] = {"negative_rate": rate, "positive_repeat": repeat}
    return type(load_config("esmm")).model_validate(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-day", type=int, default=100_000)
    ap.add_argument("--rates", default="1.0,0.1", help="negative_rate values to compare")
    ap.add_argument("--repeat", type=int, default=1, help="positive_repeat")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--preset", help="a named world variant (mtrec.data.synth.PRESETS), e.g. item_quality")
    ap.add_argument("--world", action="append", default=[], metavar="PARAM=VALUE", help="a WorldParams field (repeatable)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mtrec-bn-")
    logs = os.path.join(tmp, "world")
    write_world(logs, 5, args.rows_per_day, seed=args.seed, params=world_params(args.world, args.preset))
    print(f"world: 5 days x {args.rows_per_day:,} rows (synthetic, Zipf-like ids), seed {args.seed}; ESMM + BN, batch 512")
    rows = []
    for rate in (float(x) for x in args.rates.split(",")):
        cfg = config(logs, rate, args.repeat)
        t0 = time.perf_counter()
        res = train_days(cfg, DAYS[:3])
        train_s = time.perf_counter() - t0
        url = os.path.join(tmp, f"ck-{rate}")
        checkpoint.save(res.dmp, res.optimizer, url, {"model": cfg.name})
        served = ServedModel.from_checkpoint(cfg, url)
        before = bn.check(served.model, served.cfg, DAYS[3])
        m0 = evaluate_day(served.model, served.cfg, DAYS[4])
        t1 = time.perf_counter()
        bn.recalibrate(served.model, served.cfg, DAYS[3])
        recal_s = time.perf_counter() - t1
        after = bn.check(served.model, served.cfg, DAYS[3])
        m1 = evaluate_day(served.model, served.cfg, DAYS[4])
        print(f"\nnegative_rate {rate}, positive_repeat {args.repeat}: trained {res.counts.good:,} rows in {train_s:.0f}s")
        print("\n".join("  " + line for line in before.table()))
        print("  " + before.summary() + f"  [check {before.seconds:.2f}s]")
        print("  after recalibration on day 4: " + after.summary() + f"  [recalibration {recal_s:.2f}s]")
        for k in ("ctr/calibration", "ctcvr/calibration", "cvr/calibration", "ctr/auc", "cvr/auc", "ctcvr/auc"):
            print(f"  day 5 {k:<18} before {m0[k]:.4f}  after {m1[k]:.4f}")
        w = before.worst
        rows.append((rate, w.layer, w.smd_mean, w.kl_mean, before.passed, after.passed, m0["ctr/calibration"], m1["ctr/calibration"],
                     before.seconds))
    print("\n| negative_rate | worst layer | smd mean | kl mean | check | after recal. | day-5 ctr calibration before -> after | check s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.4f} | {'pass' if r[4] else 'FAIL'} | {'pass' if r[5] else 'FAIL'} | "
              f"{r[6]:.3f} -> {r[7]:.3f} | {r[8]:.2f} |")


if __name__ == "__main__":
    main()
