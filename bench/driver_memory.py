"""The training job's driver after training: its peak memory and where the wall time goes, for
embedding tables 8x larger and days 4x longer ("after training, stay sharded").

    .venv/bin/python bench/driver_memory.py                                  # 1M and 4M rows/day x tables x1, x8
    .venv/bin/python bench/driver_memory.py --rows 20000 --tables x0.1,x1    # quick check, ~3 min on 2 cores
    .venv/bin/python bench/driver_memory.py --repo /tmp/before --label before --out /tmp/driver_memory_before.json

One configuration = one `mtrec train --from D --to D` (a cold-start full retrain of day D) in a
fresh Python process, the shipped CLI, 2 Ray Train workers x 1 CPU on a local Ray cluster (the
job gives it the workers' CPUs + 2 read slots, at least the box's cores: 4 logical CPUs on 2
cores), tracking on (MLflow's sqlite store and artifacts in the configuration's temporary
workdir). The job's record step scores day D+1 (next-day evaluation, BN check) and logs the
served model; then it publishes and registers. Measured: the driver process's peak RSS, read as
VmHWM (the kernel's high-water mark of that one process) from /proc/<pid>/status every 0.3 s,
the last value before it exits; not ru_maxrss of the children, since the driver starts and reaps
Ray's own processes (GCS, raylet, workers), which are not the driver. VmRSS samples on the job's
clock give the driver's largest RSS in each phase. Phases are the job summary's marks (seconds
since the job started, its plan and validation included); whatever marks come back are shown.

Model: the shipped ESMM example (towers 256-128-64 with BatchNorm, its dense and bias features),
its sparse features replaced by 20, each with a table of its own of `xK` x 100,000 rows x dim 16
(x1: 20 x 100,000 x 16 = 122 MiB of float32; x8: 20 x 800,000 x 16 = 977 MiB). The synthetic
world has 9 id columns (user_id, item_id, user_segment, age_bucket, item_category, brand, shop,
price_bucket and the multi-hot item_tags); the model spec lets a feature read another feature's
column (`column:`), so the 20 features are user_id and item_id three times each and the other 7
columns twice each, every one with its own table. Features reading the same column hash an id to
the same row of their own tables: the lookups carry no new information, but every table is
allocated, trained, checkpointed, gathered and served like any other, which is what the driver's
memory and time depend on. Ids are the synthetic world's (Zipf-like popularity).

The two days of logs per day size (`mtrec synth`, seed 0, 4 files/day) are written first, each
by its own process (kept and reused with --data). `--repo PATH` runs the jobs and the synth on
another checkout (PYTHONPATH=PATH, the process started in a scratch folder so that the current
one is not on sys.path; each job prints the `mtrec.__file__` it imported, checked to be under
PATH), so a before / after comparison is two runs with two --label / --out. The machine may be
shared: the load average is recorded beside each run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DAY = dt.date(2026, 1, 1)  # day D (trained); D + 1 is the one the job scores
FEATURES = 20
TABLE_ROWS = 100_000  # rows of each table at x1
DIM = 16
POLL_S = 0.3
# the synthetic world's id columns and how many features read each (3 + 3 + 7 x 2 = 20)
COLUMNS = {
    "user_id": 3,
    "item_id": 3,
    "user_segment": 2,
    "age_bucket": 2,
    "item_category": 2,
    "brand": 2,
    "shop": 2,
    "price_bucket": 2,
    "item_tags": 2,
}
MULTI_HOT = {"item_tags"}
# the job's marks, in their usual order, and what the stretch ending at each is
KNOWN = {
    "validated": "validation, Ray start (job start -> validated)",
    "planned": "plan, MLflow run, trainer (job start -> planned: no row is read)",
    "worker_started": "Ray Train workers up",
    "model_ready": "model built and sharded",
    "trained": "training (last step)",
    "staged": "staging the checkpoint (DCP save)",
    "evaluated": "next-day evaluation and BN check, on the workers",
    "fit_returned": "Ray Train fit returns",
    "recorded": "recording (before: evaluation, BN check, served model; after: the served model's task)",
    "published": "publish",
    "registered": "register",
}
WRAPPER = (
    "import sys, mtrec; print('mtrec.__file__ =', mtrec.__file__, file=sys.stderr, flush=True); "
    "from mtrec.cli import main; sys.exit(main(sys.argv[1:]))"
)


def mib(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def table_rows(tag: str) -> int:
    """`x8` -> 800,000 rows per table; `x0.1` -> 10,000."""
    if not tag.startswith("x"):
        raise ValueError(f"--tables {tag!r}: expected xK, e.g. x1 or x8")
    return max(int(round(float(tag[1:]) * TABLE_ROWS)), 1)


def sparse_features(rows: int) -> list[dict]:
    out = []
    for col, n in COLUMNS.items():
        for i in range(n):
            f = {"name": col if i == 0 else f"{col}_{i + 1}", "column": col, "hash_size": rows, "dim": DIM}
            if col in MULTI_HOT:
                f.update(multi_hot=True, pooling="mean")
            out.append(f)
    assert len(out) == FEATURES
    return out


def job_config(repo: Path, rows: int, logs: Path, work: Path, workers: int) -> dict:
    """The checkout's shipped ESMM example with the 20 features, `workers` workers, MLflow in `work`."""
    d = yaml.safe_load((repo / "mtrec" / "configs" / "esmm.yaml").read_text())
    d["name"] = "driver_memory"
    d["features"]["sparse"] = sparse_features(rows)
    d["train"].update(num_workers=workers, cpus_per_worker=1.0)
    d["job"].update(logs=str(logs), workdir=str(work / "work"))
    d["tracking"] = {"enabled": True, "uri": f"sqlite:///{work / 'mlflow.db'}", "artifacts": str(work / "mlartifacts")}
    return d


def env_for(repo: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)
    return env


def world(repo: Path, data: Path, rows: int, seed: int, scratch: Path) -> Path:
    """Days D and D + 1 at `rows` rows each, written by `mtrec synth` in its own process (reused)."""
    out = data / f"world-{rows}-seed{seed}"
    done = data / f"world-{rows}-seed{seed}.done"
    if done.exists():
        print(f"world: {rows:,} rows/day x 2 days, seed {seed}: reusing {out}", flush=True)
        return out
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", WRAPPER, "synth", "--out", str(out), "--days", "2", "--start", str(DAY)]
    cmd += ["--rows-per-day", str(rows), "--seed", str(seed)]
    log = scratch / f"synth-{rows}.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=scratch, env=env_for(repo)).returncode
    if rc:
        sys.exit(f"synth failed (exit {rc}):\n{log.read_text()[-3000:]}")
    done.write_text(json.dumps({"rows": rows, "seed": seed}))
    print(f"world: {rows:,} rows/day x 2 days, seed {seed}, written in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def read_status(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in kB of `pid`, None where gone (a zombie has neither)."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, hwm


def run_job(repo: Path, cfg: dict, work: Path) -> dict:
    """One `mtrec train` of day D in a fresh process, polled; its summary, samples and log."""
    work.mkdir(parents=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    summary_path = work / "summary.json"
    cmd = [sys.executable, "-c", WRAPPER, "train", "--config", str(work / "config.yaml")]
    cmd += ["--from", str(DAY), "--to", str(DAY), "--summary", str(summary_path)]
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int, int]] = []  # (time.time(), VmRSS kB, VmHWM kB)
    load0 = os.getloadavg()
    t_start = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=work, env=env_for(repo)
    )

    def pump() -> None:
        for line in proc.stderr:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss, hwm = read_status(proc.pid)
        if hwm is not None:
            samples.append((time.time(), rss or 0, hwm))
        time.sleep(POLL_S)
    t_end = time.time()
    reader.join(timeout=10)
    load1 = os.getloadavg()
    (work / "job.log").write_text("\n".join(f"{t - t_start:8.2f} {s}" for t, s in lines) + "\n")
    summary = None
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary = summary[0] if isinstance(summary, list) else summary
    return {
        "rc": proc.returncode,
        "start": t_start,
        "end": t_end,
        "lines": lines,
        "samples": samples,
        "summary": summary,
        "summary_mtime": summary_path.stat().st_mtime if summary_path.exists() else None,
        "load": (load0, load1),
    }


def job_origin(run: dict) -> float:
    """time.time() of the job's clock zero: the progress line logged just before the job plans
    (`... full retrain over ...`), else the summary's write time less wall_s."""
    for t, s in run["lines"]:
        if "full retrain over" in s:
            return t
    return run["summary_mtime"] - run["summary"]["wall_s"]


def stretches(phases: dict, wall: float) -> list[tuple[str, str, float, float]]:
    """(from mark, to mark, start s, end s) between consecutive marks, from the job's start (0) to its end (wall_s)."""
    marks = sorted(phases.items(), key=lambda kv: kv[1])
    out, prev, prev_t = [], "start", 0.0
    for name, t in marks:
        out.append((prev, name, prev_t, t))
        prev, prev_t = name, t
    out.append((prev, "end", prev_t, wall))
    return out


def span(phases: dict, a: str, b: str, wall: float) -> float | None:
    ta = 0.0 if a == "start" else phases.get(a)
    tb = wall if b == "end" else phases.get(b)
    return None if ta is None or tb is None else tb - ta


def breakdown(phases: dict, wall: float) -> dict:
    """The wall time grouped: validation, training, after training (from the last training step:
    `trained`, else `fit_returned`) and within it every stretch between marks, recording, publish,
    register (None where a mark is missing)."""
    trained = "trained" if "trained" in phases else "fit_returned"
    first = "validated" if "validated" in phases else "planned"  # a job that validates in its read plans only
    t0 = phases.get(trained)
    return {
        "validation": span(phases, "start", first, wall),
        "training": span(phases, first, trained, wall),
        "after_training": span(phases, trained, "end", wall),
        "after_training_stretches": [
            {"from": a, "to": b, "what": KNOWN.get(b, ""), "seconds": e - s}
            for a, b, s, e in stretches(phases, wall)
            if t0 is not None and s >= t0 and a != "start"
        ],
        "recording": span(phases, "fit_returned", "recorded", wall),
        "publish": span(phases, "recorded", "published", wall),
        "register": span(phases, "published", "registered", wall),
        "trained_mark": trained,
    }


def rss_by_stretch(run: dict, origin: float) -> list[dict]:
    """The driver's largest VmRSS and its VmHWM at the end of each stretch: before the job's clock
    (Python start, imports, config, lock, preflight), between the marks, after the job (summary,
    Ray shutdown, exit)."""
    s = run["summary"]
    bounds = [("process start", "job start", run["start"], origin)]
    bounds += [(a, b, origin + x, origin + y) for a, b, x, y in stretches(s["phases"], s["wall_s"])]
    bounds.append(("end", "process exit", origin + s["wall_s"], run["end"]))
    out = []
    for a, b, lo, hi in bounds:
        inside = [x for x in run["samples"] if lo <= x[0] < hi]
        before = [x for x in run["samples"] if x[0] < hi]
        out.append(
            {
                "stretch": f"{a} -> {b}",
                "seconds": hi - lo,
                "max_rss_mib": mib(max(x[1] for x in inside)) if inside else None,
                "hwm_mib_at_end": mib(before[-1][2]) if before else None,
            }
        )
    return out


def rss_by_line(run: dict, origin: float, after: float) -> list[dict]:
    """After the last training step (`after`, s on the job's clock), the stretch up to each progress
    line of the job (the record step logs `evaluated on`, `BN check on`, `recorded run`): its
    seconds, the driver's largest VmRSS in it and VmHWM at its end. The lines are what the marks
    do not split."""
    out, prev = [], after
    for t, line in run["lines"]:
        t -= origin
        if t <= after or t > run["summary"]["wall_s"] + 0.05:  # the summary's lines come after the job
            continue
        inside = [x for x in run["samples"] if origin + prev <= x[0] < origin + t]
        before = [x for x in run["samples"] if x[0] < origin + t]
        out.append(
            {
                "at": t,
                "line": line,
                "seconds": t - prev,
                "max_rss_mib": mib(max(x[1] for x in inside)) if inside else None,
                "hwm_mib_at_end": mib(before[-1][2]) if before else None,
            }
        )
        prev = t
    return out


def measure(args, repo: Path, worlds: dict, rows: int, tag: str, scratch: Path) -> dict:
    nrows = table_rows(tag)
    work = scratch / f"job-{rows}-{tag}"
    cfg = job_config(repo, nrows, worlds[rows], work, args.workers)
    run = run_job(repo, cfg, work)
    imported = next((s.split("=", 1)[1].strip() for _, s in run["lines"] if s.startswith("mtrec.__file__")), None)
    res = {
        "rows_per_day": rows,
        "tables": tag,
        "features": FEATURES,
        "table_rows": nrows,
        "dim": DIM,
        "table_mib": FEATURES * nrows * DIM * 4 / 2**20,
        "workers": args.workers,
        "mtrec_file": imported,
        "exit_code": run["rc"],
        "process_s": run["end"] - run["start"],
        "loadavg_start": run["load"][0],
        "loadavg_end": run["load"][1],
        "peak_rss_mib": mib(run["samples"][-1][2]) if run["samples"] else None,
        "samples": len(run["samples"]),
        "log": str(work / "job.log"),
    }
    if imported is None or not Path(imported).resolve().is_relative_to(repo):
        res["error"] = f"the job imported mtrec from {imported}, not from {repo}"
    s = run["summary"]
    if run["rc"] or s is None:
        tail = "\n".join(x for _, x in run["lines"][-15:])
        res["error"] = res.get("error") or f"exit {run['rc']}: {tail}"
    else:
        origin = job_origin(run)
        m = s.get("mlflow", {})
        res.update(
            wall_s=s["wall_s"],
            phases=s["phases"],
            breakdown=breakdown(s["phases"], s["wall_s"]),
            rss_by_stretch=rss_by_stretch(run, origin),
            rss_by_line=rss_by_line(run, origin, s["phases"].get("trained", s["phases"].get("fit_returned", 0.0))),
            timeline=[  # every ~1 s: (s on the job's clock, VmRSS MiB, VmHWM MiB)
                [round(t - origin, 1), round(mib(a)), round(mib(b))]
                for t, a, b in run["samples"][:: max(int(1 / POLL_S), 1)]
            ],
            rows_trained=s["rows"],
            rows_per_s=s["rows_per_s"],
            plan={t: v["sharding_type"] + " " + ",".join(map(str, v["ranks"])) for t, v in s["plan"].items()},
            eval_day=m.get("eval_day"),
            metrics={k: v for k, v in (m.get("metrics") or {}).items() if k in ("ctr/auc", "ctcvr/auc")},
            bn=m.get("bn"),
        )
        tl = [(t - origin, x) for t, x in run["lines"]]
        (work / "job.log").write_text("\n".join(f"{t:8.2f} {x}" for t, x in tl) + "\n")  # on the job's clock
    if not args.keep:
        for p in (work / "work", work / "mlartifacts"):
            shutil.rmtree(p, ignore_errors=True)
    return res


def fmt(v, spec: str = "8.1f") -> str:
    """`v` formatted, `-` for None; marks are rounded to 0.01 s, so a stretch of -0.0 shows as 0.0."""
    if not isinstance(v, int | float):
        return format("-", f">{spec.split('.')[0]}")
    return format(0.0 if -0.05 < v < 0 else v, spec)


def show(r: dict) -> None:
    print(
        f"\n{r['rows_per_day']:,} rows/day, tables {r['tables']} ({r['features']} x {r['table_rows']:,} x {r['dim']}, "
        f"{r['table_mib']:,.0f} MiB float32), {r['workers']} workers; mtrec from {r['mtrec_file']}",
        flush=True,
    )
    la, lb = r["loadavg_start"], r["loadavg_end"]
    print(f"  load average {la[0]:.2f} / {la[1]:.2f} at start, {lb[0]:.2f} / {lb[1]:.2f} at end (1 / 5 min)")
    if "error" in r:
        print(f"  FAILED: {r['error']}")
        if r.get("peak_rss_mib"):
            print(f"  driver peak RSS (VmHWM) before it ended: {r['peak_rss_mib']:,.0f} MiB")
        return
    print(
        f"  driver peak RSS (VmHWM): {r['peak_rss_mib']:,.0f} MiB; wall: job {r['wall_s']:.1f} s "
        f"(process {r['process_s']:.1f} s, Python start and Ray shutdown included); "
        f"{r['rows_trained']:,} rows trained at {r['rows_per_s']:,.0f} rows/s"
    )
    b, tm = r["breakdown"], r["breakdown"]["trained_mark"]
    print(f"  time after the last training step ({tm} -> end): {fmt(b['after_training'], '.1f')} s")
    print("  marks (s since the job started): " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()))
    print("  wall time by phase (s):")
    print(f"    {'validation (start -> validated)':<74} {fmt(b['validation'])}")
    print(f"    {f'training (validated -> {tm})':<74} {fmt(b['training'])}")
    print(f"    {f'after training ({tm} -> end)':<74} {fmt(b['after_training'])}")
    for x in b["after_training_stretches"]:
        name = f"{x['from']} -> {x['to']}" + (f": {x['what']}" if x["what"] else "")
        print(f"      {name:<72} {fmt(x['seconds'])}")
    for k, what in (
        ("recording", "fit_returned -> recorded"),
        ("publish", "recorded -> published"),
        ("register", "published -> registered"),
    ):
        print(f"      {f'= {k} ({what})':<72} {fmt(b[k])}")
    print(f"  driver RSS by stretch (MiB): {'seconds':>8} {'max RSS':>8} {'HWM at end':>10}")
    for x in r["rss_by_stretch"]:
        top, hwm = fmt(x["max_rss_mib"], "8.0f"), fmt(x["hwm_mib_at_end"], "10.0f")
        print(f"    {x['stretch']:<40} {fmt(x['seconds'])} {top} {hwm}")
    print(f"  after training, by the job's progress lines (MiB): {'seconds':>8} {'max RSS':>8} {'HWM at end':>10}")
    for x in r["rss_by_line"]:
        top, hwm = fmt(x["max_rss_mib"], "8.0f"), fmt(x["hwm_mib_at_end"], "10.0f")
        print(f"    {x['at']:6.1f} {x['line'][:50]:<50} {fmt(x['seconds'])} {top} {hwm}")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
    print(f"  scored {r['eval_day']}: {shown or 'no metrics'}; BN check {r['bn']}")


def ratios(results: list[dict]) -> dict:
    """tables: RSS(largest tables) / RSS(smallest) at the fewest rows/day; days: RSS(most rows/day) /
    RSS(fewest) at the smallest tables. With the defaults: x8 / x1 at 1M, 4M / 1M at x1."""
    ok = {(r["rows_per_day"], r["tables"]): r["peak_rss_mib"] for r in results if "error" not in r}
    rows = sorted({r for r, _ in ok})
    tags = sorted({t for _, t in ok}, key=table_rows)
    out = {"tables": None, "days": None, "tables_pair": None, "days_pair": None}
    if rows and len(tags) > 1 and (rows[0], tags[0]) in ok and (rows[0], tags[-1]) in ok:
        out["tables"] = ok[(rows[0], tags[-1])] / ok[(rows[0], tags[0])]
        out["tables_pair"] = f"{tags[-1]} / {tags[0]} at {rows[0]:,} rows/day"
    if tags and len(rows) > 1 and (rows[0], tags[0]) in ok and (rows[-1], tags[0]) in ok:
        out["days"] = ok[(rows[-1], tags[0])] / ok[(rows[0], tags[0])]
        out["days_pair"] = f"{rows[-1]:,} / {rows[0]:,} rows/day at {tags[0]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000,4000000", help="rows per day, comma-separated (default 1000000,4000000)")
    ap.add_argument("--tables", default="x1,x8", help="table sizes xK = 20 x K*100,000 rows x dim 16 (default x1,x8)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose mtrec runs the jobs (default: this one)")
    ap.add_argument("--label", default="", help="a name for this run, kept in the output (e.g. before / after)")
    ap.add_argument("--out", help="write every figure as JSON to this file")
    ap.add_argument("--data", help="keep the synthetic worlds here and reuse them (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep each job's workdir and MLflow artifacts")
    args = ap.parse_args()

    repo = Path(args.repo).resolve()
    if not (repo / "mtrec" / "__init__.py").exists():
        ap.error(f"--repo {repo}: no mtrec/ package there")
    try:
        rows_list = sorted({int(x) for x in args.rows.split(",") if x.strip()})
        tags = sorted({x.strip() for x in args.tables.split(",") if x.strip()}, key=table_rows)
    except ValueError as e:
        ap.error(str(e))
    scratch = Path(tempfile.mkdtemp(prefix="mtrec-driver-memory-"))
    data = Path(args.data) if args.data else scratch / "data"
    data.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "mtrec"], capture_output=True, text=True)
    commit = head.stdout.strip() + (" + uncommitted changes under mtrec/" if dirty.stdout.strip() else "")
    print(
        f"driver_memory {args.label!r}: repo {repo} at {commit or '?'}; {FEATURES} sparse features x tables "
        f"{', '.join(tags)} x dim {DIM}; {', '.join(f'{r:,}' for r in rows_list)} rows/day; day {DAY} trained, "
        f"{DAY + dt.timedelta(days=1)} scored; {args.workers} workers; synthetic world (Zipf-like ids), seed "
        f"{args.seed}; {os.cpu_count()} cores; scratch {scratch}",
        flush=True,
    )
    worlds = {r: world(repo, data, r, args.seed, scratch) for r in rows_list}

    out = {
        "label": args.label,
        "repo": str(repo),
        "commit": commit,
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cores": os.cpu_count(),
        "configs": [],
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2))

    for rows in rows_list:
        for tag in tags:
            r = measure(args, repo, worlds, rows, tag, scratch)
            out["configs"].append(r)
            show(r)
            out["ratios"] = ratios(out["configs"])
            save()

    res = out["configs"]
    print(f"\n{args.label or 'run'}: driver peak RSS and wall time (s) per configuration")
    cols = ["before train", "training", "after train", "recording", "publish", "register"]
    print(f"  {'rows/day':>10} {'tables':>6} {'RSS MiB':>8} {'wall':>7} " + " ".join(f"{c:>11}" for c in cols))
    for r in res:
        b = r.get("breakdown", {})
        vals = [b.get(k) for k in ("validation", "training", "after_training", "recording", "publish", "register")]
        print(
            f"  {r['rows_per_day']:>10,} {r['tables']:>6} {fmt(r.get('peak_rss_mib'), '8.0f')} "
            + f"{fmt(r.get('wall_s'), '7.1f')} "
            + " ".join(fmt(v, "11.1f") for v in vals)
            + ("  FAILED" if "error" in r else "")
        )
    ra = out["ratios"]
    for key in ("tables", "days"):
        if ra[f"{key}_pair"]:
            print(f"  {key}: {ra[f'{key}_pair']}")
    shown = {k: "n/a" if ra[k] is None else f"{ra[k]:.2f}" for k in ("tables", "days")}
    print(f"driver RSS ratio tables: {shown['tables']} days: {shown['days']}")
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    if args.out:
        print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
