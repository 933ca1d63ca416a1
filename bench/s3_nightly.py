"""One nightly job (warm start) with logs, workdir and MLflow artifacts on S3 vs on a local disk:
requests to the object store by HTTP method and by area, wall time and where it goes.

    .venv/bin/python bench/s3_nightly.py                  # 2 days x 100,000 rows, 2 workers; ~2 min on 2 cores
    .venv/bin/python bench/s3_nightly.py --delay-ms 20    # the S3 nightly with 20 ms added to every request

The S3 server is moto's, in its own process on 127.0.0.1 behind the counting proxy of
`mtrec.testing.s3`; each request it logged is counted by the area of the bucket it touches (logs
of a day, a checkpoint, MLflow's artifacts, the lock, ...). `--delay-ms` is simulated latency:
the proxy sleeps that long before forwarding each request of the measured nightly (not the day-1
job's, not the upload's), a stand-in for a remote store; moto itself answers in well under a
millisecond.

Steps: `write_world` writes days + 1 days locally (the last one only scores the nightly: the job's
next-day evaluation and BN check) and uploads them to s3://mtrec/world. On one local Ray cluster
(2 workers x 1 CPU + 2 read slots by default), each store gets day 1 as a cold-start `run_train`
and days 2..N as `run_nightly` (warm start from the day before); MLflow's store is a local sqlite
file in both (it cannot live on S3), its artifacts on the store under test. Local disk first, then
S3. The S3 request counts are reset just before the last nightly; each request's arrival time
puts it in a phase. Both nightlies must train the same rows and get the same metrics and a
bit-identical checkpoint (`identical: yes`). Ids are the synthetic world's
(Zipf-like popularity). Figures: docs/benchmarks.md, "Object storage (S3) vs local disk".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

BUCKET = "mtrec"
METHODS = ("GET", "PUT", "HEAD", "POST", "DELETE")
DAY1 = dt.date(2026, 1, 1)


# --------------------------------------------------------------------------------------------------
# the S3 server: mtrec.testing.s3's, its proxy also counting requests by area ("METHOD area" keys)


def key_area(key: str) -> str:
    """Where in the bucket an object key is, coarse: `logs dt=D`, `truth dt=D`, `checkpoint dt=D`,
    `checkpoint _staging`, `mlflow artifacts`, `workdir locks`, ..."""
    comps = key.split("/")
    day = next((c for c in comps if c.startswith("dt=")), "")
    if comps[0] == "world":
        return f"truth {day}".strip() if len(comps) > 1 and comps[1] == "_truth" else f"logs {day or '(root)'}"
    if comps[0] == "mlartifacts":
        return "mlflow artifacts"
    if comps[0] == "work" and len(comps) > 1:
        if comps[1] == "checkpoints":
            return f"checkpoint {comps[3] if len(comps) > 3 and comps[3] else '(root)'}"
        return f"workdir {comps[1] or '(root)'}"
    return key or "(bucket)"


def request_key(method: str, path: str) -> str:
    """`OP area` of a request (path-style: /bucket/key?query): OP is the HTTP method, or LIST
    for a listing (a GET of the bucket with a prefix)."""
    parts = urlsplit(path)
    segs = unquote(parts.path).lstrip("/").split("/", 1)
    key = segs[1] if len(segs) > 1 else ""
    query = parse_qs(parts.query, keep_blank_values=True)
    if not key and method == "GET" and ("list-type" in query or "prefix" in query or "delimiter" in query):
        return f"LIST {key_area(query.get('prefix', [''])[0])}"
    if not key and "delete" in query:
        return f"{method} (bulk delete)"
    return f"{method} {key_area(key)}"


def total(counts: dict[str, int]) -> int:
    return sum(counts.get(m, 0) for m in METHODS)


# --------------------------------------------------------------------------------------------------
# the jobs


def job_config(logs: str, workdir: str, db: Path, artifacts: str | None, args, s3=None):
    """The shipped ESMM example on `logs` / `workdir`, MLflow's store the sqlite file `db`; on S3
    the endpoint and keys also as fsspec storage options, as a deployment on an S3-compatible
    store would set them."""
    from mtrec.config import load_config, parse_config

    d = load_config("esmm", logs=logs, workdir=workdir).model_dump(mode="json")
    d["train"].update(num_workers=args.workers, cpus_per_worker=args.cpus_per_worker)
    d["tracking"]["uri"] = f"sqlite:///{db}"
    if artifacts:
        d["tracking"]["artifacts"] = artifacts
    if s3 is not None:
        d["job"]["storage_options"] = {"s3": s3.storage_options()}
    return parse_config(d)


def run_chain(cfg, days: list[dt.date], measured=None) -> dict:
    """Day 1 cold start (`run_train`), then each later day's nightly, the last one inside
    `measured` (a context manager) when given. Returns the last nightly's summary and
    time.time() stamps: call start and end, its job clock's start (`JobPlan.started`)."""
    import contextlib

    from mtrec.jobs import nightly
    from mtrec.jobs.retrain import run_train

    t0 = time.perf_counter()
    run_train(cfg, days[0], days[0])
    print(f"    day 1 cold start: {time.perf_counter() - t0:.1f}s", flush=True)
    plan_job, started = nightly.plan_job, []

    def stamped(*a, **kw):  # when the job's clock starts: after the lock and the preflight
        plan = plan_job(*a, **kw)
        started.append(plan.started)
        return plan

    nightly.plan_job = stamped
    try:
        for i, d in enumerate(days[1:], start=2):
            with measured if measured is not None and i == len(days) else contextlib.nullcontext():
                t_start = time.time()
                (s,) = nightly.run_nightly(cfg, d)
                t_end = time.time()
            print(f"    day {i} nightly: {t_end - t_start:.1f}s", flush=True)
    finally:
        nightly.plan_job = plan_job
    return {"summary": s, "start": t_start, "end": t_end, "job": started[-1]}


def segments(run: dict) -> list[tuple[str, float, float]]:
    """(part, seconds, its end in time.time()) of a nightly call: before the job's clock (lock,
    planning, preflight), each phase since the previous mark, after it (summary, lock release)."""
    s, t0 = run["summary"], run["job"]
    out = [("lock, preflight (before the job clock)", t0 - run["start"], t0)]
    prev = 0.0
    for name, at in s.phases.items():
        out.append((name, at - prev, t0 + at))
        prev = at
    out.append(("to the job's end (wall_s)", s.wall_s - prev, t0 + s.wall_s))
    out.append(("summary, lock release", run["end"] - t0 - s.wall_s, run["end"]))
    return out


def bucket_objects(fs) -> dict[str, tuple[int, str]]:
    """Every object of the bucket: key (without the bucket) -> (size, ETag)."""
    fs.invalidate_cache()
    return {
        k.removeprefix(f"{BUCKET}/"): (int(v["size"]), str(v.get("ETag", "")))
        for k, v in fs.find(BUCKET, detail=True).items()
    }


class Measured:
    """Around the measured S3 nightly: the counts reset (and the delay set) on entry; on exit its
    requests (`S3Server.requests`: time, method, path each), counted by method and by area
    ("OP area" keys), and the bucket's objects."""

    def __init__(self, s3, fs, delay_ms: float) -> None:
        self.s3, self.fs, self.delay_ms = s3, fs, delay_ms
        self.counts: dict[str, int] = {}
        self.log: list[tuple[float, str, str]] = []
        self.before: dict[str, tuple[int, str]] = {}
        self.after: dict[str, tuple[int, str]] = {}

    def __enter__(self) -> Measured:
        self.before = bucket_objects(self.fs)
        self.s3.reset_counts()
        if self.delay_ms:
            self.s3.set_faults(0.0, delay_s=self.delay_ms / 1000)
        return self

    def __exit__(self, *exc) -> None:
        self.s3.set_faults(0.0, delay_s=0.0)
        self.counts = self.s3.counts()
        self.log = self.s3.requests()
        self.counts.update(Counter(request_key(method, path) for _, method, path in self.log))
        self.after = bucket_objects(self.fs)

    def at(self, t: float) -> int:
        """Requests that arrived by time `t`."""
        return sum(1 for ts, _, _ in self.log if ts <= t)


def area_table(m: Measured, labels: dict[str, str]) -> list[str]:
    """Requests of the nightly by area and operation, with the objects each area holds after it
    and how many of those it wrote (new or rewritten)."""
    ops = ("GET", "LIST", "HEAD", "PUT", "POST", "DELETE")
    req: dict[str, Counter] = {}
    for key, v in m.counts.items():
        if " " in key:
            op, where = key.split(" ", 1)
            req.setdefault(where, Counter())[op] += v
    held: Counter = Counter(key_area(k) for k in m.after)
    wrote: Counter = Counter(key_area(k) for k, v in m.after.items() if m.before.get(k) != v)
    rows = sorted(set(req) | set(wrote), key=lambda a: (-sum(req.get(a, Counter()).values()), a))
    out = [f"  {'area':<40} {'requests':>8}  " + " ".join(f"{o:>6}" for o in ops) + f"  {'objects':>7} {'written':>7}"]
    for a in rows:
        c = req.get(a, Counter())
        name = f"{a} ({labels[a]})" if a in labels else a
        out.append(
            f"  {name:<40} {sum(c.values()):8,}  "
            + " ".join(f"{c.get(o, 0):6,}" for o in ops)
            + f"  {held.get(a, 0):7,} {wrote.get(a, 0):7,}"
        )
    return out


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows per day")
    ap.add_argument("--days", type=int, default=2, help="days trained: day 1 cold start, then nightlies")
    ap.add_argument("--files-per-day", type=int, default=None, help="Parquet files per day (write_world's default: 4)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="added to every S3 request of the measured nightly")
    ap.add_argument("--out", help="keep the world, workdirs and MLflow stores here (default: a temporary folder)")
    ap.add_argument("-v", "--verbose", action="store_true", help="the jobs' progress lines on stderr")
    args = ap.parse_args()
    if args.days < 2:
        ap.error("--days must be >= 2 (day 1 cold start, then a nightly)")

    if args.verbose:
        from mtrec.log import configure

        configure(sys.stderr)
    from mtrec.data.io import filesystem
    from mtrec.data.synth import write_world
    from mtrec.jobs.cluster import local_cpus, quiet_ray
    from mtrec.testing.s3 import S3Server
    from mtrec.train import checkpoint as ck

    base = Path(args.out or tempfile.mkdtemp(prefix="mtrec-s3-nightly-"))
    base.mkdir(parents=True, exist_ok=True)
    world = base / "world"
    days = [DAY1 + dt.timedelta(days=i) for i in range(args.days)]
    last, eval_day = days[-1], days[-1] + dt.timedelta(days=1)

    with S3Server() as s3:
        s3.make_bucket(BUCKET)
        os.environ.update(s3.env())  # before Ray starts: its workers inherit it (and MLflow's boto3 reads it)
        t0 = time.perf_counter()
        write_world(
            str(world), days=args.days + 1, rows_per_day=args.rows, seed=args.seed, files_per_day=args.files_per_day
        )
        fs, _ = filesystem(f"s3://{BUCKET}")
        fs.put(str(world), f"{BUCKET}/world", recursive=True)
        files_per_day = len(list((world / f"dt={last}").glob("*.parquet")))
        print(
            f"world: {args.days} + 1 days x {args.rows:,} rows in {files_per_day} files/day (the last day only scores "
            f"the nightly), seed {args.seed}, the synthetic world's Zipf-like ids; written and uploaded in "
            f"{time.perf_counter() - t0:.1f}s ({base}, s3://{BUCKET}/world)",
            flush=True,
        )

        local = job_config(str(world), str(base / "work"), base / "local.db", None, args)
        remote = job_config(
            f"s3://{BUCKET}/world", f"s3://{BUCKET}/work", base / "s3.db", f"s3://{BUCKET}/mlartifacts", args, s3
        )
        quiet_ray()
        import ray

        quiet_ray()
        ray.init(address="local", num_cpus=local_cpus(local), include_dashboard=False, log_to_driver=False)
        print(
            f"ray: one local cluster for every job, {local_cpus(local)} logical CPUs on {os.cpu_count()} cores; "
            f"{args.workers} worker(s) x {args.cpus_per_worker:g} CPU",
            flush=True,
        )
        measured = Measured(s3, fs, args.delay_ms)
        try:
            print("local disk:", flush=True)
            lrun = run_chain(local, days)
            delay = (
                f" (the last nightly with {args.delay_ms:g} ms simulated latency per request)" if args.delay_ms else ""
            )
            print(f"s3:{delay}", flush=True)
            rrun = run_chain(remote, days, measured)
        finally:
            ray.shutdown()
        diff, where = ck.max_abs_diff(
            ck.read_full(rrun["summary"].checkpoint), ck.read_full(lrun["summary"].checkpoint)
        )

    # ---------------------------------------------------------------------------------------------- report
    want, got = lrun["summary"], rrun["summary"]
    want_wall, got_wall = lrun["end"] - lrun["start"], rrun["end"] - rrun["start"]
    counts, after = measured.counts, measured.after
    n = total(counts)
    by_method = ", ".join(f"{m} {counts.get(m, 0):,}" for m in METHODS)
    ckpt = [k for k in after if key_area(k) == f"checkpoint dt={last}"]
    local_ckpt = [p for p in Path(ck.checkpoint_url(local, last)).rglob("*") if p.is_file()]
    labels = {
        f"logs dt={last}": "trained day",
        f"logs dt={eval_day}": "next day: evaluation",
        f"truth dt={eval_day}": "evaluation",
        f"checkpoint dt={days[-2]}": "parent",
        f"checkpoint dt={last}": "published",
    }
    print(f"\nnightly {last} (warm start from dt={days[-2]}), {args.rows:,} rows/day, {args.workers} workers")
    print(f"S3 requests: {n:,} ({by_method}); failed {counts.get('failed', 0)}")
    print(
        f"objects: {files_per_day} log files per day; checkpoint {len(ckpt)} objects "
        f"({sum(after[k][0] for k in ckpt) / 2**20:.1f} MiB; {len(local_ckpt)} files on local disk)"
    )
    print("\nrequests by area (LIST: a GET listing a prefix; objects: held after the nightly, written: by it)")
    for line in area_table(measured, labels):
        print(line)

    def per(areas: list[str], objs: int) -> str:
        reqs = sum(v for k, v in counts.items() if " " in k and k.split(" ", 1)[1] in areas)
        return f"{reqs:,} requests / {objs} = {reqs / max(objs, 1):.1f}"

    print(
        f"\nper log file of the trained day: {per([f'logs dt={last}'], files_per_day)}; "
        f"of the evaluation day (logs + truth): {per([f'logs dt={eval_day}', f'truth dt={eval_day}'], files_per_day)}"
    )
    print(
        f"per checkpoint object: parent read {per([f'checkpoint dt={days[-2]}'], len(ckpt))}; "
        f"new one staged and published {per([f'checkpoint dt={last}', 'checkpoint _staging'], len(ckpt))}"
    )

    print(f"\n{'phase (seconds since the previous mark)':<40} {'local':>8} {'s3':>8} {'s3 requests':>12}")
    prev = 0
    for (name, dl, _), (_, ds, end) in zip(segments(lrun), segments(rrun), strict=True):
        at = measured.at(end) if end < rrun["end"] else n
        print(f"{name:<40} {max(dl, 0.0):8.2f} {max(ds, 0.0):8.2f} {at - prev:12,}")
        prev = at
    print(f"{'nightly call, wall':<40} {want_wall:8.2f} {got_wall:8.2f} {n:12,}")
    print(f"{'  of which the job clock (wall_s)':<40} {want.wall_s:8.2f} {got.wall_s:8.2f}")

    same = (
        (got.rows, got.input_rows, got.quarantined_rows) == (want.rows, want.input_rows, want.quarantined_rows)
        and got.mlflow.get("metrics") == want.mlflow.get("metrics")
        and diff == 0.0
    )
    print()
    for name, s in (("local", want), ("s3", got)):
        m = s.mlflow.get("metrics", {})
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("ctr/auc", "cvr/auc", "ctcvr/auc") if k in m)
        print(
            f"{name:<5}: {s.rows:,} rows trained ({s.input_rows:,} read, {s.quarantined_rows} quarantined); "
            f"{len(m)} metrics on {s.mlflow.get('eval_day')}: {shown}"
        )
    print(f"checkpoints: max |s3 - local| = {diff:g}" + (f" at {where}" if diff else ""))
    print(f"identical: {'yes' if same else 'no'}")
    print(
        f"s3 nightly: {n:,} requests ({by_method}), {got_wall:.1f} s wall"
        + (f" with {args.delay_ms:g} ms simulated latency per request" if args.delay_ms else "")
        + f"; local: {want_wall:.1f} s wall"
    )


if __name__ == "__main__":
    main()
