"""Row order within a day and BatchNorm: logs in time order with an intra-day cycle, or a day sorted
by click, trained with the shuffle off (rows in file order) and on (the default).

For each world (seed x case) ESMM with BatchNorm in its towers is trained single-process (the same
DMP model, loop, shuffle and per-step seeds the Ray workers run) on days 1-3, once per shuffle
setting; then, as served: the BN check on day 4, the gate's floors on day 4 (gate.floors, with
the loss of the job's first and last tenth of batches), the next-day truth metrics on day 5, and
the same after recalibrating the BN statistics on day 4.

Cases:
  cycle   preset day_cycle: the mix of users, devices and categories moves with the hour, and each
          day is written hour by hour (24 files)
  sorted  the default world with every day written sorted by click (4 files, clicks last; the
          check and the next-day metrics read rows as a set, so only training sees the order)
  plain   the default world as written (the control)

    .venv/bin/python bench/bn_row_order.py --cases cycle,plain --seeds 0,1,2
    .venv/bin/python bench/bn_row_order.py --cases sorted,plain --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtrec import bn  # noqa: E402
from mtrec.config import load_config  # noqa: E402
from mtrec.data.io import day_url  # noqa: E402
from mtrec.data.synth import Export, world_params, write_world  # noqa: E402
from mtrec.eval.evaluate import predict_day, read_truth, report  # noqa: E402
from mtrec.serving import ServedModel  # noqa: E402
from mtrec.tracking.gate import floors  # noqa: E402
from mtrec.train import checkpoint  # noqa: E402
from mtrec.train.local import train_days  # noqa: E402

DAY1 = dt.date(2026, 1, 1)
DAYS = [DAY1 + dt.timedelta(days=i) for i in range(5)]
SHOWN = ("ctr/auc", "ctr/auc_unbiased", "cvr/auc_entire_space", "ctr/calibration")


def config(logs: str, shuffle: bool, batch: int, buffer_rows: int, user_runs: bool = True):
    d = load_config("esmm", logs=logs).model_dump(mode="json")
    d["model"]["batch_norm"] = True
    d["train"]["batch_size"] = batch
    d["train"]["shuffle"] = {"buffer_rows": buffer_rows if shuffle else 0, "files": shuffle, "user_runs": user_runs}
    return type(load_config("esmm")).model_validate(d)


def hour_mix(served: ServedModel, logs: str, day: dt.date, tmp: str) -> tuple[float, float]:
    """How far the hour mix can move a BN layer's input: per hour file of `day` (24 in a day_cycle
    world), the layer's input moments as served against the whole day's, as the check's smd (mean
    over channels); (the last hour's, the largest over hours), each for its worst layer. Running
    statistics that held exactly the last hour would read the first figure."""
    day_ref, _ = bn.reference(served.model, served.spec, logs, day)
    folder = day_url(logs, day)
    last = top = 0.0
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    for h, f in enumerate(files):
        root = os.path.join(tmp, f"hour-{h}")
        os.makedirs(day_url(root, day), exist_ok=True)
        link = os.path.join(day_url(root, day), f)
        if not os.path.exists(link):
            os.link(os.path.join(folder, f), link)  # a hard link: the reader lists files, not symlinks
        ref, _ = bn.reference(served.model, served.spec, root, day)
        smd = max(float(bn.figures(*ref[k], *day_ref[k])["smd"].mean()) for k in ref)
        top = max(top, smd)
        last = smd if h == len(files) - 1 else last
    return last, top


def score(served: ServedModel, logs: str, day: dt.date) -> dict[str, float]:
    return report(served.spec, predict_day(served.model, served.spec, logs, day), read_truth(logs, day))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-day", type=int, default=100_000)
    ap.add_argument("--cases", default="cycle,plain", help="comma-separated: cycle, sorted, plain")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument(
        "--single-rows",
        action="store_true",
        help="the shuffled arm moves single rows, not a user's consecutive rows (train.shuffle.user_runs: false)",
    )
    ap.add_argument("--files-per-day", type=int, help="Parquet files per day (default: the world's, 4 or 24)")
    ap.add_argument("--buffer-rows", type=int, default=32768, help="train.shuffle.buffer_rows of the shuffled arm")
    ap.add_argument(
        "--world", action="append", default=[], metavar="PARAM=VALUE", help="a WorldParams field (repeatable)"
    )
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mtrec-order-")
    print(
        f"worlds: 5 days x {args.rows_per_day:,} rows (synthetic, Zipf-like ids); ESMM + BN, batch {args.batch}, "
        f"trained on days 1-3 single-process (shuffle on: buffer {args.buffer_rows:,} rows); BN check and floors on "
        "day 4, truth metrics on day 5" + "".join(f"; {kv}" for kv in args.world)
    )
    rows = []
    for case in args.cases.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            logs = os.path.join(tmp, f"{case}-{seed}")
            params = world_params(args.world, "day_cycle" if case == "cycle" else None, flag="--world")
            sort_by = "click" if case == "sorted" else None
            write_world(
                logs,
                5,
                args.rows_per_day,
                seed=seed,
                files_per_day=args.files_per_day,
                params=params,
                export=Export(sort_by=sort_by),
            )
            for shuffle in (False, True):
                cfg = config(logs, shuffle, args.batch, args.buffer_rows, not args.single_rows)
                torch.manual_seed(0)
                t0 = time.perf_counter()
                res = train_days(cfg, DAYS[:3])
                secs = time.perf_counter() - t0
                url = os.path.join(tmp, f"ck-{case}-{seed}-{shuffle}")
                checkpoint.save(res.dmp, res.optimizer, url, checkpoint.spec_manifest(cfg))
                served = ServedModel.from_checkpoint(url)
                check = bn.check(served.model, served.spec, logs, DAYS[3], cfg.bn)
                slice_ = score(served, logs, DAYS[3])
                loss = {
                    "train_loss_first_tenth": res.loss_first_tenth,
                    "train_loss_last_tenth": res.loss_last_tenth,
                }
                below = floors(cfg, served.spec, slice_, loss)
                mix = hour_mix(served, logs, DAYS[3], os.path.join(tmp, f"hours-{case}-{seed}-{shuffle}"))
                m0 = score(served, logs, DAYS[4])
                bn.recalibrate(served.model, served.spec, logs, DAYS[3], cfg.bn.batch_rows)
                m1 = score(served, logs, DAYS[4])
                w = max(check.layers, key=lambda lc: lc.smd_mean)
                on = "on" if shuffle else "off"
                print(f"\n{case} seed {seed} shuffle {on}: {res.counts.good:,} rows in {secs:.0f}s")
                print("\n".join("  " + line for line in check.table()))
                print("  " + check.summary())
                print(f"  the hour mix on day 4: smd of the last hour vs the day {mix[0]:.3f}, largest {mix[1]:.3f}")
                print(f"  loss, first tenth {res.loss_first_tenth:.4f} -> last tenth {res.loss_last_tenth:.4f}")
                print("  floors on day 4: " + ("; ".join(below) if below else "met"))
                for k in SHOWN:
                    print(f"  day 5 {k:<22} {m0[k]:.4f}   after recalibration {m1[k]:.4f}")
                rows.append(
                    (
                        case,
                        seed,
                        shuffle,
                        check.passed,
                        w.smd_mean,
                        max(lc.kl_mean for lc in check.layers),
                        not below,
                        mix,
                        m0,
                        m1,
                    )
                )
    print(
        "\n| world | seed | shuffle | BN check | max smd mean | max kl mean | hour mix: last hour, largest | floors "
        "| day-5 truth CTR AUC | es-CVR AUC | CTR calibration | truth CTR AUC after recal. | calibration after recal. |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, seed, shuffle, passed, smd, kl, ok, mix, m0, m1 in rows:
        on, verdict = ("on" if shuffle else "off"), ("pass" if passed else "FAIL")
        print(
            f"| {case} | {seed} | {on} | {verdict} | {smd:.3f} | {kl:.3f} | {mix[0]:.3f}, {mix[1]:.3f} | "
            f"{'met' if ok else 'refused'} | {m0['ctr/auc_unbiased']:.4f} | {m0['cvr/auc_entire_space']:.4f} | "
            f"{m0['ctr/calibration']:.3f} | {m1['ctr/auc_unbiased']:.4f} | {m1['ctr/calibration']:.3f} |"
        )
    for case in dict.fromkeys(r[0] for r in rows):
        for k in ("ctr/auc_unbiased", "cvr/auc_entire_space"):
            on = [r[8][k] for r in rows if r[0] == case and r[2]]
            off = [r[8][k] for r in rows if r[0] == case and not r[2]]
            print(f"{case}: {k} shuffle on - off, mean over seeds: {np.mean(on) - np.mean(off):+.4f}")


if __name__ == "__main__":
    main()
