"""Incremental vs full retrain on a 7-day synthetic world with drift: quality and cost.

    .venv/bin/python bench/incremental.py                        # 500,000 rows/day, ~15 min on 2 cores
    .venv/bin/python bench/incremental.py --rows-per-day 100000  # quicker; the cost ratio gets worse (fixed cost)

1. `mtrec synth` writes 8 days (items and tastes drift daily, new users and items arrive).
2. Full retrain: `mtrec train --from day1 --to day7` (cold start, one job) in its own workdir.
3. Incremental: `mtrec backfill --from day1 --to day6 --cold-start`, then the day-7 nightly job
   `mtrec nightly --date day7` (warm start from day 6) in another workdir.
4. Both day-7 models are scored on day 8 (the next day): AUC of CTR and CTCVR.

Wall times are those of the commands as a scheduler sees them (Python start, Ray start, validation,
training, checkpoint, publish). Every command is the shipped CLI, one worker, the shipped ESMM
config. Ids are the synthetic world's (Zipf-like popularity). Figures: docs/incremental.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MTREC = [sys.executable, "-m", "mtrec.cli"]


def run(args: list[str], log: Path) -> float:
    """Run one mtrec command; its wall seconds. Output goes to `log` (shown on failure)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(MTREC + args, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    if rc:
        sys.exit(f"`mtrec {' '.join(args)}` failed (exit {rc}):\n{log.read_text()[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-per-day", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="esmm")
    ap.add_argument("--out", help="keep everything here (default: a temporary folder)")
    args = ap.parse_args()

    base = Path(args.out or tempfile.mkdtemp(prefix="mtrec-incremental-"))
    base.mkdir(parents=True, exist_ok=True)
    logs, full_wd, inc_wd = base / "world", base / "full", base / "incremental"
    days = [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(8)]
    d1, d6, d7, d8 = days[0], days[5], days[6], days[7]
    common = ["--config", args.config, "--logs", str(logs)]
    print(f"world: 8 days x {args.rows_per_day:,} rows, seed {args.seed}, under {base}", flush=True)

    if not (logs / f"dt={d8}").exists():
        w = run(
            [
                "synth",
                "--out",
                str(logs),
                "--days",
                "8",
                "--rows-per-day",
                str(args.rows_per_day),
                "--seed",
                str(args.seed),
            ],
            base / "synth.log",
        )
        print(f"  synth: {w:.0f}s", flush=True)

    full_s = run(
        ["train", *common, "--workdir", str(full_wd), "--from", str(d1), "--to", str(d7), "--force"], base / "full.log"
    )
    print(f"full retrain days 1-7:   {full_s:7.1f}s wall", flush=True)
    backfill_s = run(
        ["backfill", *common, "--workdir", str(inc_wd), "--from", str(d1), "--to", str(d6), "--cold-start", "--force"],
        base / "backfill.log",
    )
    print(f"backfill days 1-6:       {backfill_s:7.1f}s wall (6 nightly jobs in one Ray session)", flush=True)
    nightly_s = run(["nightly", *common, "--workdir", str(inc_wd), "--date", str(d7), "--force"], base / "nightly.log")
    print(f"nightly day 7:           {nightly_s:7.1f}s wall", flush=True)

    scores = {}
    for name, wd in (("full", full_wd), ("incremental", inc_wd)):
        out = base / f"eval-{name}.json"
        run(["evaluate", *common, "--workdir", str(wd), "--date", str(d8), "--json"], base / f"eval-{name}.log")
        text = (base / f"eval-{name}.log").read_text()
        metrics = json.loads(text[text.index("{") :])["metrics"]
        out.write_text(json.dumps(metrics, indent=2))
        scores[name] = metrics

    print(f"\nnext-day (day 8) AUC of the day-7 models, {args.rows_per_day:,} rows/day:")
    print(f"  {'metric':<10} {'full retrain':>12} {'incremental':>12} {'|diff|':>8}")
    result = {
        "rows_per_day": args.rows_per_day,
        "full_s": full_s,
        "nightly_s": nightly_s,
        "backfill_s": backfill_s,
        "auc": {},
    }
    for key in ("ctr/auc", "ctcvr/auc"):
        f, i = scores["full"][key], scores["incremental"][key]
        result["auc"][key] = {"full": f, "incremental": i, "diff": abs(f - i)}
        print(
            f"  {key:<10} {f:12.4f} {i:12.4f} {abs(f - i):8.4f}  "
            f"({'within' if abs(f - i) <= 0.005 else 'OUTSIDE'} 0.005)"
        )
    ratio = nightly_s / full_s
    result["ratio"] = ratio
    print(
        f"cost: nightly day 7 {nightly_s:.1f}s / full retrain {full_s:.1f}s = {ratio:.2f} "
        f"({'within' if ratio <= 1 / 3 else 'OVER'} 1/3)"
    )
    for name in ("full", "nightly"):
        tl = [ln for ln in (base / f"{name}.log").read_text().splitlines() if "timeline" in ln]
        if tl:
            print(f"  {name} {tl[-1].strip()}")
    (base / "result.json").write_text(json.dumps(result, indent=2))
    print(f"result: {base / 'result.json'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
