"""`mtrec demo`: the story so far on a small synthetic world, on one machine.

Today it writes a 7-day synthetic world and validates every day against the ESMM example's data
contract (the same code paths as `mtrec synth` and `mtrec validate`). Training, nightly
increments, MLflow and the promotion gate join as they land (issues 3-9).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from mtrec.config import load_config
from mtrec.data.io import join
from mtrec.data.synth import write_world
from mtrec.data.validate import validate_day


def run_demo(
    workdir: str = "./mtrec-demo",
    days: int = 7,
    rows_per_day: int = 100_000,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> list[dict]:
    """Run the demo and print its summary table.

    Returns:
        list[dict]: one row per day (date, rows, good, quarantined, seconds), as printed.
    """
    workdir = str(Path(workdir).resolve()) if "://" not in workdir else workdir
    logs = join(workdir, "world")
    say(f"mtrec demo — everything goes under {workdir}")
    say(f"[1/2] synthetic world: {days} days x {rows_per_day:,} rows -> {logs}")
    t0 = time.perf_counter()
    summary = write_world(logs, days, rows_per_day, seed=seed, progress=say)
    synth_s = time.perf_counter() - t0

    cfg = load_config("esmm", logs=logs, workdir=workdir)
    say(f"[2/2] validating every day against {cfg.name}'s data contract")
    rows = []
    for day in summary.days:
        report = validate_day(cfg, dt.date.fromisoformat(day))
        rows.append({"date": day, "rows": report.input_rows, "good": report.good_rows,
                     "quarantined": report.bad_rows, "seconds": report.seconds})
        say(f"  {day}: {report.input_rows:,} rows, {report.bad_rows:,} quarantined ({report.seconds:.1f}s)")

    say("")
    say(f"{'day':<12}{'rows':>10}{'good':>10}{'quarantined':>13}{'validate s':>12}")
    for r in rows:
        say(f"{r['date']:<12}{r['rows']:>10,}{r['good']:>10,}{r['quarantined']:>13,}{r['seconds']:>12.1f}")
    say(f"synthetic world written in {synth_s:.1f}s; truth tables under {join(logs, '_truth')}")
    say("")
    say("next:")
    say(f"  mtrec validate --config esmm --logs {logs} --workdir {workdir} --date {summary.days[0]}")
    say(f"  mtrec synth --days 3 --rows-per-day 100000 --out {join(workdir, 'world2')}")
    return rows
