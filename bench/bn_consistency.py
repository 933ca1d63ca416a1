"""BN statistics consistency on the synthetic world: what negative down-sampling does to BatchNorm's
running statistics, what the check says, and what recalibration does to next-day calibration.

For each sampling setting, ESMM with BatchNorm in its towers is trained single-process (the same
DMP model and loop the Ray workers run) on days 1-3; then, as served:
  check on day 4 -> recalibrate on day 4 -> check on day 4 again,
and the next-day metrics (day 5) before and after recalibration: calibration (sum p / sum y) and
AUC per task. Also the cost of one check and one recalibration. For a sampled model it also prints,
per BN layer, how well the layer's input tells clicks from non-clicks (Cohen's d, mean over
channels) and the smd that sampling should cause from it (docs/bn-consistency.md).

    .venv/bin/python bench/bn_consistency.py --rows-per-day 100000 --rates 1.0,0.1 --repeat 1
    .venv/bin/python bench/bn_consistency.py --rows-per-day 100000 --rates 1.0,0.1 --preset item_quality
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
from mtrec.data.batch import BatchConverter  # noqa: E402
from mtrec.data.synth import world_params, write_world  # noqa: E402
from mtrec.errors import MtrecError  # noqa: E402
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


@torch.no_grad()
def separation(model, cfg, day) -> dict[str, tuple[float, float]]:
    """Per BN layer: (mean over channels of |mu_click - mu_noclick| / sd, share of clicks) of the
    layer's input on `day` as served. Down-sampling negatives moves a channel's mean by
    (share after sampling - share served) x (mu_click - mu_noclick), so the smd it can cause is
    that shift over sd: this says how large the check's figure can get on this world."""
    layers = bn.bn_layers(model)
    acc = {name: [bn.Moments(m.num_features), bn.Moments(m.num_features)] for name, m in layers.items()}
    mask = {}

    def hook(name):
        def add(_m, args):  # a pre-hook that returns None leaves the input as it is
            for side, rows in ((0, mask["c"]), (1, ~mask["c"])):
                if rows.any():  # a batch (the day's last, short one) may hold no click, or only clicks
                    acc[name][side].add(args[0][rows])

        return add

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    conv = BatchConverter(cfg.spec)
    clicks = rows = 0
    try:
        for rb in bn.serving_batches(cfg.spec, cfg.job.logs, day, cfg.bn.batch_rows):
            mask["c"] = torch.from_numpy(rb.column(cfg.train.sampling.label).to_numpy(zero_copy_only=False) == 1)
            clicks += int(mask["c"].sum())
            rows += rb.num_rows
            model(conv(rb, with_bias=False, with_labels=False))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    share = clicks / rows
    for name, (pos, neg) in acc.items():
        (m1, v1), (m0, v0) = pos.mean_var(), neg.mean_var()
        var = share * v1 + (1 - share) * v0 + share * (1 - share) * (m1 - m0) ** 2
        out[name] = (float(np.mean(np.abs(m1 - m0) / np.sqrt(np.maximum(var, 1e-12)))), share)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-day", type=int, default=100_000)
    ap.add_argument("--rates", default="1.0,0.1", help="negative_rate values to compare")
    ap.add_argument("--repeat", type=int, default=1, help="positive_repeat")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--preset", help="a named world variant (mtrec.data.synth.PRESETS), e.g. item_quality")
    ap.add_argument(
        "--world", action="append", default=[], metavar="PARAM=VALUE", help="a WorldParams field (repeatable)"
    )
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mtrec-bn-")
    logs = os.path.join(tmp, "world")
    try:
        params = world_params(args.world, args.preset, flag="--world")
    except MtrecError as e:
        sys.exit(f"bn_consistency: error: {e}")
    write_world(logs, 5, args.rows_per_day, seed=args.seed, params=params)
    print(
        f"world: 5 days x {args.rows_per_day:,} rows (synthetic, Zipf-like ids), seed {args.seed}, "
        f"{'preset ' + args.preset if args.preset else 'default parameters'}{''.join(' ' + kv for kv in args.world)}; "
        "ESMM + BN, batch 512"
    )
    rows = []
    for rate in (float(x) for x in args.rates.split(",")):
        cfg = config(logs, rate, args.repeat)
        t0 = time.perf_counter()
        res = train_days(cfg, DAYS[:3])
        train_s = time.perf_counter() - t0
        url = os.path.join(tmp, f"ck-{rate}")
        checkpoint.save(res.dmp, res.optimizer, url, checkpoint.spec_manifest(cfg))
        served = ServedModel.from_checkpoint(url)
        before = bn.check(served.model, served.spec, logs, DAYS[3], cfg.bn)
        sep = separation(served.model, cfg, DAYS[3]) if rate < 1.0 or args.repeat > 1 else None
        m0 = evaluate_day(served.model, served.spec, logs, DAYS[4])
        t1 = time.perf_counter()
        bn.recalibrate(served.model, served.spec, logs, DAYS[3], cfg.bn.batch_rows)
        recal_s = time.perf_counter() - t1
        after = bn.check(served.model, served.spec, logs, DAYS[3], cfg.bn)
        m1 = evaluate_day(served.model, served.spec, logs, DAYS[4])
        print(
            f"\nnegative_rate {rate}, positive_repeat {args.repeat}: trained {res.counts.good:,} rows in {train_s:.0f}s"
        )
        print("\n".join("  " + line for line in before.table()))
        print("  " + before.summary() + f"  [check {before.seconds:.2f}s]")
        if sep:
            share = next(iter(sep.values()))[1]
            trained = share * args.repeat / (share * args.repeat + (1 - share) * rate)
            print(
                f"  clicks are {share:.1%} of day 4 as served and {trained:.1%} after sampling: "
                f"a channel's mean moves by {trained - share:.3f} x (mean over clicks - mean over non-clicks)"
            )
            for name, (d, _) in sep.items():
                print(
                    f"    {name:<38} mean |d| {d:.3f} -> expected smd mean {(trained - share) * d:.3f}, measured "
                    f"{next(x.smd_mean for x in before.layers if x.layer == name):.3f}"
                )
        print("  after recalibration on day 4: " + after.summary() + f"  [recalibration {recal_s:.2f}s]")
        for k in ("ctr/calibration", "ctcvr/calibration", "cvr/calibration", "ctr/auc", "cvr/auc", "ctcvr/auc"):
            print(f"  day 5 {k:<18} before {m0[k]:.4f}  after {m1[k]:.4f}")
        w = before.worst
        rows.append(
            (
                rate,
                w.layer,
                w.smd_mean,
                w.kl_mean,
                before.passed,
                after.passed,
                m0["ctr/calibration"],
                m1["ctr/calibration"],
                before.seconds,
            )
        )
    print(
        "\n| negative_rate | worst layer | smd mean | kl mean | check | after recal. | "
        "day-5 ctr calibration before -> after | check s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.4f} | {'pass' if r[4] else 'FAIL'} | "
            f"{'pass' if r[5] else 'FAIL'} | {r[6]:.3f} -> {r[7]:.3f} | {r[8]:.2f} |"
        )


if __name__ == "__main__":
    main()
