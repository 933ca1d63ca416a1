"""Figures of the synthetic world's `sequences` preset: history lengths, rates, the intent's signal
and ceiling, and generation speed with history on and off.

    .venv/bin/python bench/sequences.py --days 5 --rows 100000 --seeds 0,1,2

Per seed, writes the preset world, the same with ``history=0`` (intents still on) and the default
world, and prints each one's seconds per day. On day 1 and the last day of the preset world:

* the history length written per row (mean, median), CTR, CVR given click, the share of rows whose
  item category is the user's intent;
* truth CTR AUCs (a prediction scored against ``p_click_unbiased`` as a soft label, as
  `mtrec evaluate` does), i.e. ceilings: ``no intent`` is the truth without the intent term;
  ``+ category`` adds each category's average intent effect (about the best a model without the
  history can know of the intent); ``+ last 5`` / ``+ last 50`` add instead the intent's effect
  weighted by how often the candidate's category is the intent given its share among the row's
  last 5 / 50 history categories (what a model reading the history can know, fitted on the same
  day); ``truth`` is the truth itself;
* the click rate by that last-5 share, and its correlation with clicks.

docs/synthetic-world.md holds the figures with this command.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mtrec.data.synth import WorldParams, world_params, write_world
from mtrec.eval.metrics import auc


def _share_last(hist: pa.ListArray, cat: np.ndarray, n: int) -> np.ndarray:
    """Per row, the share of the last `n` entries of `hist` equal to `cat` (0 for an empty list)."""
    offsets, values = hist.offsets.to_numpy(), hist.values.to_numpy()
    start = np.maximum(offsets[:-1], offsets[1:] - n)
    hits = np.zeros(len(cat))
    for j in range(1, n + 1):
        idx = offsets[1:] - j
        hits += (idx >= start) & (values[np.maximum(idx, 0)] == cat)
    return hits / np.maximum(offsets[1:] - start, 1)


def _with_intent(p0_logit: np.ndarray, q: np.ndarray, strength: float) -> np.ndarray:
    """p(click) when the intent term applies with probability q."""
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    return (1 - q) * sig(p0_logit) + q * sig(p0_logit + strength)


def _posterior(key: np.ndarray, match: np.ndarray) -> np.ndarray:
    """Per row, the share of rows with the same key whose category is the intent."""
    _, inv = np.unique(key, return_inverse=True)
    return (np.bincount(inv, weights=match) / np.bincount(inv))[inv]


def day_figures(root: str, day: str, params: WorldParams) -> dict[str, float]:
    logs = ds.dataset(f"{root}/dt={day}").to_table()
    truth = ds.dataset(f"{root}/_truth/dt={day}").to_table()
    length = pc.list_value_length(logs["hist_item_id"]).to_numpy()
    click = logs["click"].to_numpy()
    cat = logs["item_category"].to_numpy()
    match = (cat == truth["intent"].to_numpy()).astype(np.float64)
    p = truth["p_click_unbiased"].to_numpy().astype(np.float64)
    p0_logit = np.log(p / (1 - p)) - params.intent_strength * match
    hist = logs["hist_item_category"].combine_chunks()
    out = {
        "len_mean": length.mean(),
        "len_median": float(np.median(length)),
        "len_empty": float((length == 0).mean()),
        "ctr": click.mean(),
        "cvr": logs["conversion"].to_numpy()[click == 1].mean(),
        "match": match.mean(),
        "auc_no_intent": auc(p0_logit, p),
        "auc_category": auc(_with_intent(p0_logit, _posterior(cat, match), params.intent_strength), p),
    }
    for n in (5, 50):
        share = _share_last(hist, cat, n)
        key = cat * 64 + np.rint(share * 20).astype(np.int64)
        out[f"auc_last{n}"] = auc(_with_intent(p0_logit, _posterior(key, match), params.intent_strength), p)
        if n == 5:
            out["corr_share5_click"] = np.corrcoef(share, click)[0, 1]
            out["ctr_by_share5"] = [click[np.rint(share * 5) == k].mean() for k in range(6)]
    out["auc_truth"] = auc(p, p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--rows", type=int, default=100_000, help="rows per day")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--preset", default="sequences")
    ap.add_argument("--world", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    args = ap.parse_args()
    params = world_params(args.world, args.preset, flag="--world")
    print(f"preset {args.preset}{''.join(' ' + kv for kv in args.world)}: {args.days} days x {args.rows:,} rows")
    for seed in (int(s) for s in args.seeds.split(",")):
        variants = {
            "history on": params,
            "history=0": world_params([*args.world, "history=0", "history_init=0"], args.preset, flag="--world"),
            "default world": WorldParams(),
        }
        for name, variant in variants.items():
            root = tempfile.mkdtemp(prefix="mtrec-seq-")
            t0 = time.perf_counter()
            s = write_world(root, days=args.days, rows_per_day=args.rows, seed=seed, params=variant)
            wall = time.perf_counter() - t0
            print(
                f"seed {seed} {name:>13}: {np.mean(s.seconds):.2f} s/day "
                f"(days: {', '.join(f'{x:.2f}' for x in s.seconds)});"
                f" {wall:.1f} s in all, {wall - sum(s.seconds):.1f} s outside the days (setup, the users' past)"
            )
            if name == "history on":
                kept = root
        for day in (s.days[0], s.days[-1]):
            f = day_figures(kept, day, params)
            print(
                f"seed {seed} {day}: history length mean {f['len_mean']:.1f} median {f['len_median']:.0f} "
                f"(empty {f['len_empty']:.1%}); CTR {f['ctr']:.2%}, CVR|click {f['cvr']:.2%}; "
                f"category = intent on {f['match']:.1%} of rows"
            )
            print(
                f"    truth CTR AUC: no intent {f['auc_no_intent']:.4f}, + category {f['auc_category']:.4f}, "
                f"+ last 5 {f['auc_last5']:.4f}, + last 50 {f['auc_last50']:.4f}, truth {f['auc_truth']:.4f}"
            )
            print(
                f"    CTR by share of the last 5 history categories equal to the item's (0/5 .. 5/5): "
                f"{', '.join(f'{x:.2%}' for x in f['ctr_by_share5'])}; corr(share, click) {f['corr_share5_click']:.3f}"
            )


if __name__ == "__main__":
    main()
