"""The serving population vs the logged one, for BatchNorm: what the BN check says against the
candidates serving scored (`job.serving_logs`) and against the impressions, and what recalibrating
on either does to the ranking of the candidates, which the synthetic world knows the truth of.

Per seed: a world of 5 days with candidate logs (`mtrec synth --candidates`: every request's 30
candidates, of which the policy showed 10). ESMM with BatchNorm in its towers is trained
single-process on days 1-3 (the shuffle on, as by default). Then, on day 4: the check against the
impressions and against the candidates. Three versions of the model are scored on day 5: as
trained, recalibrated on day 4's impressions, recalibrated on day 4's candidates:

  candidates  truth GAUC: per request, the AUC of the predicted CTR against each candidate's true
              relevance (soft labels), averaged over requests: how well it orders what serving
              ranks; pooled truth AUC over all candidates; "level": the mean predicted CTR of the
              candidates over that of the shown ones, divided by the same ratio of the true
              relevance (1: the model lowers its predictions for the unshown candidates as much as
              their relevance is lower)
  impressions truth CTR AUC (auc_unbiased) and CTR calibration (sum p / sum clicks)

    .venv/bin/python bench/bn_serving.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.dataset as pads
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtrec import bn  # noqa: E402
from mtrec.config import load_config  # noqa: E402
from mtrec.data.io import day_url  # noqa: E402
from mtrec.data.synth import Export, world_params, write_world  # noqa: E402
from mtrec.eval.evaluate import predict_day, read_truth, report  # noqa: E402
from mtrec.eval.metrics import auc, gauc  # noqa: E402
from mtrec.eval.scoring import evaluating, score_batches  # noqa: E402
from mtrec.serving import ServedModel  # noqa: E402
from mtrec.train import checkpoint  # noqa: E402
from mtrec.train.local import train_days  # noqa: E402
from mtrec.train.stream import feature_batches  # noqa: E402

DAY1 = dt.date(2026, 1, 1)
DAYS = [DAY1 + dt.timedelta(days=i) for i in range(5)]


def config(logs: str, batch: int):
    d = load_config("esmm", logs=logs).model_dump(mode="json")
    d["model"]["batch_norm"] = True
    d["train"]["batch_size"] = batch
    return type(load_config("esmm")).model_validate(d)


def candidate_metrics(served: ServedModel, cands: str, day: dt.date) -> dict[str, float]:
    """Truth GAUC (per request), pooled truth AUC and the level ratio of the model on `day`'s candidates."""
    rows, pred = [], []
    with evaluating(served.model):
        for rb, out in score_batches(served.model, served.spec, feature_batches(served.spec, cands, day, 8192)):
            rows.append(rb.column("row_id").to_numpy())
            pred.append(out["ctr"].float().numpy())
    rows, pred = np.concatenate(rows), np.concatenate(pred).astype(np.float64)
    truth = pads.dataset(day_url(f"{cands}/_truth", day)).to_table()
    t_rows = truth.column("row_id").to_numpy()
    idx = np.searchsorted(t_rows, rows, sorter=np.argsort(t_rows))
    idx = np.argsort(t_rows)[idx]
    rel = truth.column("p_click_unbiased").to_numpy()[idx].astype(np.float64)
    shown = truth.column("shown").to_numpy(zero_copy_only=False)[idx]
    request = rows // 30  # the world's candidate row ids: request x candidates + k
    level = (pred.mean() / pred[shown].mean()) / (rel.mean() / rel[shown].mean())
    return {"gauc": gauc(pred, rel, request), "auc": auc(pred, rel), "level": float(level)}


def score(served: ServedModel, logs: str, cands: str, day: dt.date) -> dict[str, float]:
    m = report(served.spec, predict_day(served.model, served.spec, logs, day), read_truth(logs, day))
    return {**candidate_metrics(served, cands, day), "imp_auc": m["ctr/auc_unbiased"], "calib": m["ctr/calibration"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-day", type=int, default=100_000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--preset", help="a named world variant (mtrec.data.synth.PRESETS)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mtrec-serving-")
    print(
        f"worlds: 5 days x {args.rows_per_day:,} impressions (synthetic, Zipf-like ids), 30 candidates per request "
        f"(10 shown){', preset ' + args.preset if args.preset else ''}; ESMM + BN, batch {args.batch}, trained on "
        "days 1-3 single-process; BN check and recalibration on day 4, scored on day 5"
    )
    table = []
    for seed in (int(s) for s in args.seeds.split(",")):
        logs, cands = os.path.join(tmp, f"logs-{seed}"), os.path.join(tmp, f"cands-{seed}")
        params = world_params([], args.preset)
        write_world(logs, 5, args.rows_per_day, seed=seed, params=params, export=Export(candidates=cands))
        cfg = config(logs, args.batch)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = train_days(cfg, DAYS[:3])
        url = os.path.join(tmp, f"ck-{seed}")
        checkpoint.save(res.dmp, res.optimizer, url, checkpoint.spec_manifest(cfg))
        print(f"\nseed {seed}: trained {res.counts.good:,} rows in {time.perf_counter() - t0:.0f}s")
        checks = {}
        for name, serving in (("impressions", None), ("candidates", cands)):
            served = ServedModel.from_checkpoint(url)
            rep = bn.check(served.model, served.spec, logs, DAYS[3], cfg.bn, serving)
            checks[name] = rep
            print(f"  check against the day-4 {name}:")
            print("\n".join("    " + line for line in rep.table()))
            print("    " + rep.summary())
        for variant, serving in (
            ("as trained", False),
            ("recal. on impressions", None),
            ("recal. on candidates", cands),
        ):
            served = ServedModel.from_checkpoint(url)
            if serving is not False:
                bn.recalibrate(served.model, served.spec, logs, DAYS[3], cfg.bn.batch_rows, serving)
            m = score(served, logs, cands, DAYS[4])
            print(
                f"  {variant:<22} candidates: truth GAUC {m['gauc']:.4f}, truth AUC {m['auc']:.4f}, level "
                f"{m['level']:.3f}; impressions: truth CTR AUC {m['imp_auc']:.4f}, calibration {m['calib']:.3f}"
            )
            table.append((seed, variant, checks, m))
    print(
        "\n| seed | model | check vs impressions: max smd, kl | check vs candidates: max smd, kl | "
        "candidates: truth GAUC | truth AUC | level | impressions: truth CTR AUC | CTR calibration |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, variant, checks, m in table:
        figs = [
            f"{'pass' if r.passed else 'FAIL'} {max(lc.smd_mean for lc in r.layers):.3f}, "
            f"{max(lc.kl_mean for lc in r.layers):.3f}"
            for r in (checks["impressions"], checks["candidates"])
        ]
        print(
            f"| {seed} | {variant} | {figs[0]} | {figs[1]} | {m['gauc']:.4f} | {m['auc']:.4f} | {m['level']:.3f} | "
            f"{m['imp_auc']:.4f} | {m['calib']:.3f} |"
        )
    for variant in ("recal. on impressions", "recal. on candidates"):
        for k in ("gauc", "auc", "imp_auc", "calib", "level"):
            base_rows = [r for r in table if r[1] == "as trained"]
            rows = [r for r in table if r[1] == variant]
            d = [r[3][k] - b[3][k] for r, b in zip(rows, base_rows, strict=True)]
            print(f"{variant} - as trained, {k}: mean {np.mean(d):+.4f} (per seed {', '.join(f'{x:+.4f}' for x in d)})")


if __name__ == "__main__":
    main()
