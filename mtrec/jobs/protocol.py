"""One training job on Ray: the run protocol `mtrec train`, `mtrec nightly` and `mtrec backfill` share.

    preflight (before Ray starts): each day's files, rows and columns from their footers; the parent
    -> plan: the days' files, the job id, what an earlier run of the job already trained
    -> Ray Data: one read task per Parquet file (any fsspec URL) that validates as it reads (the
       contract's row rules, bad rows quarantined, the file's counts reported), the training
       columns plus each row's position; a stream in file order, split across the workers
       without dropping rows
    -> Ray Train: `num_workers` workers, each a DistributedModelParallel rank
       (mtrec.train.worker), warm-started from the parent checkpoint or the job's newest
       intra-day checkpoint; an intra-day checkpoint every `train.checkpoint_every_batches`
       steps; a failed worker group restarts from it (`train.max_failures`)
    -> the rows trained (positions merged over ranks and restarts) checked against the good rows
       the read counted: every row once; the checkpoint is staged; the workers score the next
       day with the sharded model (metrics, BN check) while a Ray task builds the served model
    -> each day's validation report, the threshold -> record (MLflow run, the workers' figures,
       the served model) -> publish (atomic) -> register

The pipeline never materializes the data: memory is bounded by Ray Data's backpressure and the
workers' prefetch, whatever the size of the range.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict
from typing import Any

from mtrec import __version__
from mtrec.config import MtrecConfig
from mtrec.data.io import (
    DataFile,
    apply_storage_options,
    check_bucket,
    day_url,
    filesystem,
    is_local,
    join,
    list_day_files,
    local_path,
)
from mtrec.data.validate import (
    FileCounts,
    ValidationReport,
    check_day,
    clear_quarantine,
    day_report,
    validate_day,
)
from mtrec.errors import ConfigError, DataValidationError, MtrecError, TrackingError, first_line
from mtrec.jobs.plan import JobPlan, RunOptions, TrainSummary
from mtrec.shims import trainer_class
from mtrec.train import checkpoint
from mtrec.train.position import Position
from mtrec.train.stream import job_reads, read_good_rows

log = logging.getLogger(__name__)


def validate(cfg: MtrecConfig, day: dt.date) -> ValidationReport:
    """`validate_day` of the run spec's logs, quarantine and limit."""
    return validate_day(cfg.spec, cfg.job.logs, day, cfg.job.workdir, cfg.job.max_bad_fraction)


def date_range(start: dt.date, end: dt.date) -> list[dt.date]:
    if end < start:
        raise ConfigError(f"--to {end} is before --from {start}; pass a range whose end is on or after its start")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def has_logs(cfg: MtrecConfig, day: dt.date) -> bool:
    """Whether `day` has logs to train (`validate.day_rows`: Parquet files whose footers hold rows).

    Raises:
        DataValidationError: the logs root is missing, or a file of the day is unreadable.
    """
    from mtrec.data.validate import day_rows

    return day_rows(cfg.job.logs, day) > 0


def days_with_logs(cfg: MtrecConfig, days: list[dt.date], what: str) -> list[dt.date]:
    """`days`, less those without logs when `job.allow_gaps` is on (said in one line); unchanged
    when it is off (the cheap checks then fail on such a day).

    Raises:
        DataValidationError: with gaps allowed, none of `days` has logs.
    """
    from mtrec.errors import DataValidationError

    if not cfg.job.allow_gaps:
        return days
    kept = [d for d in days if has_logs(cfg, d)]
    gone = [d for d in days if d not in kept]
    if gone:
        log.info(
            f"{what}: no logs for {', '.join(d.isoformat() for d in gone[:6])}{' ...' if len(gone) > 6 else ''} "
            f"({len(gone)} day(s)): skipped (job.allow_gaps)"
        )
    if not kept:
        raise DataValidationError(
            f"no day of {days[0]} .. {days[-1]} has logs under {cfg.job.logs} (expected folders like "
            f"{join(cfg.job.logs, cfg.job.partition)}); check --logs, the dates and `job.partition`"
        )
    return kept


def good_rows_dataset(
    cfg: MtrecConfig,
    files: list[DataFile],
    done: dict | None = None,
    reads: list[int] | None = None,
    serving: bool = False,
    report=None,
    quarantine: list[str] | None = None,
):
    """A Ray Dataset streaming the good rows of `files` in file order (one read task per file),
    with positions (file index in `files`), leaving out the rows in `done` (`Position.to_json()`).
    With `reads` (`mtrec.train.stream.job_reads`: several epochs), those reads in that order, each
    row's file index the read's. `serving`: the files are serving logs (`read_good_rows`). With
    `report` (the job's RunCollector) and `quarantine` (per file, its day's quarantine folder),
    the read validates: bad rows quarantined, each file's counts reported."""
    import ray.data

    n = len(files)
    order = range(n) if reads is None else reads
    items = [
        {
            "index": v,
            "file": v % n,
            "url": files[v % n].url,
            "name": files[v % n].name,
            "size": files[v % n].size,
            # a file's first read writes its quarantine (a full retrain reads it once per epoch)
            "quarantine": quarantine[v % n] if quarantine and v < n else None,
        }
        for v in order
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    return ds.map_batches(
        read_good_rows,
        fn_kwargs={
            "spec": cfg.spec.model_dump(mode="json"),
            "done": done,
            "storage": cfg.job.storage_options,
            "serving": serving,
            "report": report,
        },
        batch_size=1,
        batch_format="pyarrow",
    )


def _read_side_skip(cfg: MtrecConfig, plan: JobPlan) -> dict | None:
    """The rows a resumed job's readers may leave out. With a shuffle buffer none: the workers
    replay the whole stream through the same buffer and drop the trained rows after it, so the
    day continues exactly where it stopped (without a buffer, dropping them at the read keeps the
    order of the rest and reads less)."""
    if plan.done.empty or cfg.train.shuffle.buffer_rows:
        return None
    return plan.done.to_json()


def _reads_left(plan: JobPlan) -> list[int]:
    """The reads of a job still to train: a resumed job leaves out the epochs it finished (each
    epoch is shuffled on its own, so the next one's order does not depend on them)."""
    n = len(plan.files)
    reads = plan.reads or list(range(n))
    per_epoch = plan.done.rows_per_epoch(n, plan.epochs)
    good = plan.expected_rows  # None: some file's counts are not known yet, so no epoch is known to be finished
    return [v for v in reads if plan.done.empty or good is None or per_epoch[v // n] < good]


def _exact_split_config(buffer_bytes: int):
    """Ray Train's default DataConfig splits with `equal=True`, which drops rows to even the
    shards out; mtrec's lockstep loop handles uneven shards, so split with `equal=False`. Reads
    run ahead of training by at most `buffer_bytes` of object-store memory (without a limit Ray
    Data reads a whole day ahead into the object store: memory would grow with the data)."""
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    class ExactSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                # the current DataContext's options, a copy: changed below
                opts = copy.deepcopy(self.default_ingest_options())
                opts.preserve_order = True  # file order: reproducible runs
                r = opts.resource_limits
                opts.resource_limits = ExecutionResources(
                    cpu=r.cpu, gpu=r.gpu, memory=r.memory, object_store_memory=min(r.object_store_memory, buffer_bytes)
                )
                ds.context.execution_options = opts
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    out[i][name] = split
            return out

    return ExactSplit()


def _storage(cfg: MtrecConfig) -> tuple[str, Any]:
    """Ray Train's storage (path, pyarrow file system or None) under the workdir. On an object
    store Ray is handed mtrec's fsspec file system, so it reaches the store with the same
    options (`job.storage_options`) and credentials as the job."""
    url = join(cfg.job.workdir, "ray")
    if not is_local(url):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = filesystem(url)
        return path, PyFileSystem(FSSpecHandler(fs))
    path = os.path.abspath(local_path(url))
    os.makedirs(path, exist_ok=True)
    return path, None


def worker_failure(err: Exception, workers: dict[int, dict]) -> MtrecError:
    """Ray Train's failure -> one line naming the worker(s) and the cause (the worker's own
    MtrecError as is)."""
    failures = getattr(err, "worker_failures", None) or {}
    for exc in failures.values():
        cause = _root(exc)
        if isinstance(cause, MtrecError):
            return cause
    if not failures:
        cause = _root(getattr(err, "controller_failure", err))
        return MtrecError(
            f"training failed in Ray Train's controller: {first_line(cause, typed=True)}; "
            "see the Ray logs (ray logs / /tmp/ray/session_latest/logs)"
        )

    def died(exc: BaseException) -> bool:  # the process is gone (killed, OOM, node lost), not a Python error
        return any(k in type(_root(exc)).__name__ for k in ("HealthCheck", "ActorDied", "WorkerCrashed", "NodeDied"))

    parts = []
    for rank, exc in sorted(failures.items(), key=lambda kv: (not died(kv[1]), kv[0])):
        w = workers.get(rank, {})
        where = f"worker {rank}" + (f" (node {w['node']}, pid {w['pid']})" if w else "")
        parts.append(f"{where}{' died' if died(exc) else ''}: {first_line(_root(exc), typed=True)}")
    return MtrecError(
        "training failed: "
        + "; then ".join(parts)
        + "; nothing was published, rerun the job (see the Ray logs for the traceback)"
    )


def _root(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def job_id(
    cfg: MtrecConfig,
    kind: str,
    days: list[dt.date],
    parent: str | None,
    parent_manifest: dict | None,
    files: list[DataFile],
    init_from: str | None = None,
) -> str:
    """What makes two runs the same job (so one may resume the other's intra-day checkpoint): the
    kind, days, parent checkpoint (and when it was written), the files (URL and size) and the
    config hashes."""
    key = {
        "kind": kind,
        "days": [d.isoformat() for d in days],
        "parent": parent,
        "parent_created": (parent_manifest or {}).get("created_at"),
        "files": [[f.url, f.size] for f in files],
        "model": cfg.fingerprint(),
        "training": cfg.training_fingerprint(),
    }
    if init_from:
        key["init_from"] = init_from
    if kind == "full_retrain" and cfg.train.epochs != 1:
        key["epochs"] = cfg.train.epochs  # another number of passes is another job
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_stores(cfg: MtrecConfig) -> None:
    """Before a job takes its lock (the first thing it writes): its storage options apply in this
    process, and the buckets it writes to exist (`check_bucket`: a workdir or artifact root on an
    object store)."""
    apply_storage_options(cfg.job.storage_options)
    check_bucket(cfg.job.workdir, "job.workdir")
    if cfg.tracking.enabled and cfg.tracking.artifacts:
        check_bucket(cfg.tracking.artifacts, "tracking.artifacts")


def preflight(
    cfg: MtrecConfig, days: list[dt.date], parent: str | None = None, allow_config_change: bool = False
) -> None:
    """The cheap checks of a training job, before Ray starts: each day has files with rows and
    the config's columns (footers only), and the parent checkpoint is published and fits.

    Raises:
        DataValidationError: a day is missing, empty or lacks a column (one line naming it).
        CheckpointError: the parent is unpublished, of another model or shape, or trained under
            other training settings (without `allow_config_change`).
    """
    for day in days:
        check_day(cfg.spec, cfg.job.logs, day)
    if parent:
        checkpoint.check_compatible(checkpoint.read_manifest(parent), parent, cfg, allow_config_change)
    else:
        resolve_init(cfg)


def resolve_init(cfg: MtrecConfig) -> str | None:
    """`train.init_from` as the URL of a published checkpoint: a registered version
    (`models:/NAME/N`, `models:/NAME@alias`) is its `mtrec.checkpoint` tag.

    Raises:
        ConfigError: a models:/ URI that names no registered mtrec version.
        CheckpointError: the checkpoint is not published.
    """
    src = cfg.train.init_from
    if not src:
        return None
    url = src
    if src.startswith("models:/"):
        from mtrec.tracking import registered_version, tracking_uri

        v = registered_version(cfg, src)
        if v is None or not v.checkpoint:
            raise ConfigError(
                f"`train.init_from` {src} names no registered mtrec version with a checkpoint in {tracking_uri(cfg)} "
                "(models:/NAME/N or models:/NAME@alias); pass a published checkpoint's URL instead"
            )
        url = v.checkpoint
    checkpoint.read_manifest(url)  # published, or one line saying it is not
    return url


def plan_job(
    cfg: MtrecConfig, days: list[dt.date], kind: str, parent: str | None, allow_config_change: bool = False
) -> JobPlan:
    """List `days`' files, check the parent, and find what an unfinished earlier run of the same
    job already trained (its newest intra-day checkpoint). The rows are validated by the training
    read itself (`checked_batches` in the read tasks: each file opened once), so the plan holds no
    counts yet, except those a resumed job's checkpoint carries.

    Raises:
        DataValidationError: a day has no Parquet file.
        CheckpointError: the parent is unpublished or does not fit (see `preflight`).
    """
    started = time.time()
    parent_manifest = None
    if parent:
        parent_manifest = checkpoint.read_manifest(parent)
        checkpoint.check_compatible(parent_manifest, parent, cfg, allow_config_change)
    listed = [(day, list_day_files(cfg.job.logs, day)) for day in days]
    day_of = {f.url: day for day, fs in listed for f in fs}
    epochs = cfg.train.epochs if kind == "full_retrain" else 1  # a nightly learns its new day once
    files, reads = job_reads(listed, cfg.train.seed, cfg.train.shuffle.files, epochs)
    end = days[-1]
    init = None if parent else resolve_init(cfg)
    jid = job_id(cfg, kind, days, parent, parent_manifest, files, init)
    done, counts = Position(), {}
    partial = checkpoint.latest_partial(cfg, end)
    if partial and partial[1].get("job_id") == jid:
        done = Position.from_json(partial[1]["position"])  # read less; the workers skip by the newest one
        counts = {int(k): FileCounts(**v) for k, v in (partial[1].get("file_counts") or {}).items()}
        good = sum(c.good for c in counts.values()) if len(counts) == len(files) else None
        per_epoch = done.rows_per_epoch(len(files), epochs)
        at = next((e for e, rows in enumerate(per_epoch) if good is None or rows < good), epochs - 1)
        of = f" of {epochs * good:,}" if good is not None else ""
        log.info(
            f"resuming from intra-day checkpoint {partial[0]}: step {partial[1]['step']}, "
            f"{done.rows:,}{of} rows already trained"
            + (
                f" (in epoch {at + 1} of {epochs}: {per_epoch[at]:,}{f' of {good:,}' if good else ''})"
                if epochs > 1
                else ""
            )
        )
    elif partial:
        log.info(
            "discarding intra-day checkpoints of another job (other data, parent or settings) "
            f"under {checkpoint.partial_root(cfg, end)}"
        )
        checkpoint.prune_partials(cfg, end)
    for line in checkpoint.recover_staging(cfg, end):  # a driver that died between staging and publishing
        log.info(line)
    if done.empty:  # the training read writes each day's quarantine afresh (a resumed job keeps what it wrote)
        for day in days:
            clear_quarantine(cfg.job.workdir, day)
    manifest = {
        **checkpoint.spec_manifest(cfg),
        "date": end.isoformat(),
        "kind": kind,
        "days": [d.isoformat() for d in days],
        "parent": parent,
        "parent_date": (parent_manifest or {}).get("date"),
        "parent_run_id": (parent_manifest or {}).get("mlflow_run_id"),
        "init_from": init,
        "job_id": jid,
        "config_fingerprint": cfg.fingerprint(),
        "training_fingerprint": cfg.training_fingerprint(),
        "config": cfg.redacted(),
        "epochs": epochs,
        "files": [{"url": f.url, "size": f.size} for f in files],
        "mtrec_version": __version__,
    }
    return JobPlan(
        kind=kind,
        days=days,
        parent=parent,
        files=files,
        job_id=jid,
        done=done,
        staged=checkpoint.staging_url(cfg, end),
        checkpoint=checkpoint.checkpoint_url(cfg, end),
        manifest=manifest,
        started=started,
        init_from=init,
        epochs=epochs,
        reads=reads,
        file_days=[day_of[f.url] for f in files],
        counts=counts,
    )


def day_reports(cfg: MtrecConfig, plan: JobPlan, counts: dict[int, FileCounts], seconds: float) -> list:
    """Each day's validation report from the training read's per-file counts (`validate.day_report`:
    `_report.json` written, the threshold enforced), and the counts' totals in the manifest.

    Raises:
        DataValidationError: a day's quarantined fraction is above `job.max_bad_fraction`.
        MtrecError: a file has no counts (the read did not report it).
    """
    missing = [plan.files[i].url for i in range(len(plan.files)) if i not in counts]
    if missing:
        raise MtrecError(
            f"the training read reported no counts for {len(missing)} file(s) ({missing[0]} ...); nothing was "
            "published - rerun the job"
        )
    reports = []
    for day in plan.days:
        mine = sorted((counts[i] for i, d in enumerate(plan.file_days) if d == day), key=lambda c: c.name)
        report = day_report(cfg.spec, cfg.job.logs, day, cfg.job.workdir, mine, cfg.job.max_bad_fraction, seconds)
        log.info(
            f"validated {day} in the training read: {report.good_rows:,} good rows, {report.bad_rows:,} quarantined"
        )
        reports.append(report)
    return reports


def run_job(cfg: MtrecConfig, plan: JobPlan, opts: RunOptions, ray_info: dict | None = None) -> TrainSummary:
    """Train a planned job on Ray, record it (MLflow), publish its checkpoint, register it.
    Runs inside a Ray session (`mtrec.jobs.cluster.ray_session`). The order keeps the registry
    and the checkpoints consistent: record before publishing (no published checkpoint without its
    run), register after (no version pointing at a missing checkpoint).

    Raises:
        MtrecError: a worker failed (named) more than `train.max_failures` times, or the rows
            trained differ from the rows validated; nothing is published then.
        LockHeld: another job took this job's lease over; nothing is published.
        TrackingError: MLflow unreachable (tracking on): before training, nothing done; while
            recording, nothing published; while registering, the checkpoint is published and
            the rerun of the same command registers it.
    """
    return _Job(cfg, plan, opts, ray_info or {}).run()


class _Job:
    """One run of a planned job: its summary, its MLflow run and where the wall time goes."""

    def __init__(self, cfg: MtrecConfig, plan: JobPlan, opts: RunOptions, ray_info: dict):
        self.cfg, self.plan, self.opts = cfg, plan, opts
        self.t_epoch = plan.started  # the job's clock starts with its plan
        self.t_job = time.perf_counter() - (time.time() - plan.started)
        self.summary = TrainSummary(
            model=cfg.name,
            days=[d.isoformat() for d in plan.days],
            world_size=cfg.train.num_workers,
            kind=plan.kind,
            parent=plan.parent,
            ray=ray_info,
            checkpoint=plan.checkpoint,
            epochs=plan.epochs,
        )
        self.manifest = dict(plan.manifest)
        self.tracker, self.run_id = None, None
        self.published = False
        self.tracking_error: MtrecError | None = None  # MLflow failed while the workers trained
        self.marks: dict[str, float] = {}
        self.workers_result: dict = {}  # rank 0's result: the next day's figures, the BN statistics
        # (attempt, Ray task) building and logging the served model, once that attempt staged the checkpoint;
        # the task is None above tracking.max_pyfunc_mb (no pyfunc: `start_served` starts none)
        self.served: tuple[int, Any] | None = None

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks[name] = (time.time() if at is None else at) - self.t_epoch

    def run(self) -> TrainSummary:
        cfg, plan = self.cfg, self.plan
        with contextlib.ExitStack() as tracked:
            if cfg.tracking.enabled:  # before training: MLflow down fails the job now, not after the day is trained
                from mtrec.tracking import Tracker

                self.tracker = Tracker(cfg)
                # a published day's run is complete (only its registration may lag): a failure after the publish
                # leaves it RUNNING
                self.run_id = tracked.enter_context(
                    self.tracker.job_run(
                        plan.kind,
                        plan.days,
                        plan.checkpoint,
                        plan.parent,
                        self.manifest.get("parent_run_id"),
                        keep_open=lambda: self.published,
                    )
                )
                self.manifest.update(mlflow_run_id=self.run_id, tracking_uri=self.tracker.uri)
                self.summary.mlflow = {"uri": self.tracker.uri, "run_id": self.run_id}
                log.info(f"mlflow: run {self.run_id} in experiment {cfg.name} at {self.tracker.uri}")
            snap = self.train()
            self.record()
            self.publish()
            self.register()
        s = self.summary
        s.phases = {k: round(v, 2) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])}
        s.progress = [{k: v for k, v in p.items() if k != "line"} for p in snap["history"]]
        s.rows = snap["result"]["rows_trained"]  # == epochs x expected_rows: the workers checked each epoch
        slowest = max((w["seconds"] for w in s.workers), default=0.0)
        s.rows_per_s = sum(w["rows"] for w in s.workers) / slowest if slowest > 0 else 0.0
        s.wall_s = time.perf_counter() - self.t_job
        return s

    def cancel_served(self) -> None:
        """The served model's task stopped (the checkpoint it reads is being replaced or discarded)."""
        if self.served is not None:
            import ray

            if self.served[1] is not None:  # None: above tracking.max_pyfunc_mb, no task was started
                ray.cancel(self.served[1], force=True)
            self.served = None

    def _fail(self, err: MtrecError, what: str = "") -> MtrecError:
        """The staged checkpoint discarded; the error says where the next run resumes."""
        self.cancel_served()
        checkpoint.discard(self.plan.staged)
        left = checkpoint.latest_partial(self.cfg, self.plan.end)
        resume = f"; the next run of this job resumes from {left[0]} (step {left[1]['step']})" if left else ""
        return err.reworded(f"{err}{what}{resume}")

    def train(self) -> dict:
        """Ray Train over the day's stream; returns the collector's snapshot (the workers' result)."""
        import ray

        from mtrec.train.worker import RunCollector

        cfg, plan, summary = self.cfg, self.plan, self.summary
        collector = RunCollector.remote()
        trainer = _trainer(
            cfg,
            plan,
            self.manifest,
            self.opts,
            collector,
            use_gpu=summary.ray.get("gpus", 0) >= cfg.train.num_workers > 0,
        )
        log.info(
            f"training {cfg.name} on the good rows of {len(plan.files)} file(s), validated as they are read"
            + (f" ({plan.done.rows:,} rows trained before)" if plan.done.rows else "")
            + (f" x {plan.epochs} epochs" if plan.epochs > 1 else "")
            + f" with {cfg.train.num_workers} worker(s), batch {cfg.train.batch_size}"
        )
        outcome: dict = {}
        self.mark("planned")  # plan, MLflow run and trainer ready: the workers start next
        thread = threading.Thread(target=lambda: _fit(trainer, outcome), daemon=True)
        thread.start()

        def drain() -> None:
            if self.tracker is not None and self.tracking_error is None:
                staged = ray.get(collector.staged_example.remote())
                if staged is not None and (self.served is None or self.served[0] != staged[0]):
                    # built beside the evaluation, from the staged checkpoint; a worker group that restarted
                    # after staging stages again: the task of the earlier attempt is dropped
                    from mtrec.tracking.record import start_served

                    self.cancel_served()
                    try:  # above tracking.max_pyfunc_mb no task: it tags the run instead, and MLflow may fail
                        self.served = (staged[0], start_served(self.tracker, self.run_id, cfg, plan.staged, staged[1]))
                    except MtrecError as e:  # as for the progress below: the job fails before publishing
                        self.tracking_error = e
                        log.info(f"{e}; training goes on, but the job will fail before publishing")
            recs = ray.get(collector.drain.remote())
            for rec in recs:
                log.info(rec["line"])
            if recs and self.tracker is not None and self.tracking_error is None:
                try:
                    self.tracker.log_progress(self.run_id, recs)
                except MtrecError as e:  # training goes on (its intra-day checkpoints are kept); nothing is published
                    self.tracking_error = e
                    log.info(f"{e}; training goes on, but the job will fail before publishing")

        while thread.is_alive():
            thread.join(timeout=1.0)
            drain()
        drain()
        snap = ray.get(collector.snapshot.remote())
        summary.restarts = max(snap["attempts"] - 1, 0)
        summary.resumed = snap["starts"][0] if snap["starts"] and (not summary.restarts or plan.done.rows) else None
        if "error" in outcome or snap["result"] is None:
            err = (
                worker_failure(outcome["error"], snap["workers"])
                if "error" in outcome
                else MtrecError("training ended without a result from worker 0; see the Ray logs")
            )
            raise self._fail(err) from None
        summary.workers = [{**w, **snap["workers"].get(w["rank"], {})} for w in snap["result"]["workers"]]
        summary.plan = snap["result"]["plan"]
        self.workers_result = snap["result"]
        if self.served is not None and self.served[0] != snap["attempts"]:  # staged by an attempt that did not end
            self.cancel_served()
        for k, v in snap["marks"].items():
            self.mark(k, v)
        self.mark("fit_returned")
        self.validated(snap.get("counts", {}))
        return snap

    def validated(self, counts: dict[int, FileCounts]) -> None:
        """The days' validation from the training read's counts (known ones of a resumed job
        beneath): reports written, the threshold enforced before anything is recorded or
        published, the totals in the summary and manifest."""
        plan, summary = self.plan, self.summary
        try:
            plan.reports = day_reports(self.cfg, plan, {**plan.counts, **counts}, self.marks.get("trained", 0.0))
        except MtrecError as e:
            raise self._fail(e, "; the day was trained but nothing was published") from None
        totals = {
            "input_rows": sum(r.input_rows for r in plan.reports),
            "quarantined_rows": sum(r.bad_rows for r in plan.reports),
            "truncated": {g: sum(r.truncated.get(g, 0) for r in plan.reports) for g in plan.reports[0].truncated}
            if plan.reports
            else {},
        }
        self.manifest.update(totals)
        summary.input_rows, summary.quarantined_rows, summary.truncated = (
            totals["input_rows"],
            totals["quarantined_rows"],
            totals["truncated"],
        )
        summary.expected_rows = sum(r.good_rows for r in plan.reports)

    def record(self) -> None:
        """The run's params, next-day evaluation, artifacts and served model (tracking on)."""
        if self.tracker is None:
            return
        from mtrec.tracking import record_job

        try:
            if self.tracking_error is not None:
                raise self.tracking_error
            self.summary.mlflow.update(
                record_job(
                    self.tracker,
                    self.run_id,
                    self.cfg,
                    self.plan.staged,
                    self.manifest,
                    self.summary,
                    self.plan.reports,
                    {**self.workers_result, "served": self.served[1] if self.served else None},
                )
            )
        except Exception as e:  # noqa: BLE001 - MLflow, plotting, scoring: one line, nothing published
            err = (
                e
                if isinstance(e, MtrecError)
                else TrackingError(f"recording run {self.run_id} failed: {first_line(e, typed=True)}")
            )
            raise self._fail(err, "; the day was trained but nothing was published") from None
        self.mark("recorded")

    def publish(self) -> None:
        """`_staging` -> dt=D with `_SUCCESS` last, unless another job took the lease over."""
        from mtrec.lock import ensure_held

        try:  # a job whose lease another job took over publishes nothing: that job owns the model now
            ensure_held(self.cfg)
        except MtrecError:
            checkpoint.discard(self.plan.staged)
            raise
        checkpoint.publish(self.plan.staged, self.plan.checkpoint)
        self.published = True
        checkpoint.prune_partials(self.cfg, self.plan.end)
        log.info(f"published {self.plan.checkpoint}")
        self.mark("published")

    def register(self) -> None:
        """A model version for the published day, alias `challenger` (tracking on)."""
        if self.tracker is None:
            return
        url, run_id = self.plan.checkpoint, self.run_id
        try:
            self.summary.mlflow["version"] = self.tracker.register(
                run_id, self.summary.mlflow["model_uri"], url, self.plan.end
            )
        except MtrecError as e:
            raise e.reworded(
                f"{e}; {url} is published and run {run_id} recorded, but its registration did not "
                "complete: rerun the same command once MLflow is back, it completes it without retraining"
            ) from None
        log.info(f"registered version {self.summary.mlflow['version']} of {self.cfg.name} (alias challenger)")
        self.mark("registered")


def next_day_inputs(cfg: MtrecConfig, end: dt.date) -> tuple[dt.date | None, list[DataFile], list[DataFile]]:
    """What the workers score after training (tracking on): the day after `end` when its logs can
    be (footers only: files with rows and the columns), its files, and its serving logs' files
    for the BN check (`serving_files`). A day that cannot be scored is said (not fatal: the job's
    own days trained fine)."""
    day = end + dt.timedelta(days=1)
    fs, path = filesystem(day_url(cfg.job.logs, day))
    if not fs.isdir(path):
        log.info(
            "no logs for %s yet: the run has no evaluation metrics (the promotion gate evaluates once they land)", day
        )
        return None, [], []
    try:
        files = check_day(cfg.spec, cfg.job.logs, day)  # one footer read per file
    except MtrecError as e:
        log.warning(f"not evaluated on {day}: {e}")
        return None, [], []
    return day, files, serving_files(cfg, day)


def serving_files(cfg: MtrecConfig, day: dt.date) -> list[DataFile]:
    """For a model with BN layers, `day`'s serving logs' files when `job.serving_logs` holds it (the
    BN check's population, checked from the footers: every feature the model reads); [] for the
    impressions (no serving logs configured or none for the day, or a missing root: said)."""
    from mtrec import bn
    from mtrec.models import build_model
    from mtrec.train.stream import check_serving_files

    serving: list[DataFile] = []
    if cfg.job.serving_logs and bn.bn_layers(build_model(cfg.spec, "meta", cfg.score_offsets())):
        try:
            if bn.has_serving_logs(cfg.job.serving_logs, day):
                serving = check_serving_files(cfg.spec, list_day_files(cfg.job.serving_logs, day))
        except (ConfigError, DataValidationError) as e:  # the BN check falls back to the impressions, said
            log.warning("%s; the BN check uses the impressions of %s", e, day)
    return serving


def _trainer(cfg: MtrecConfig, plan: JobPlan, manifest: dict, opts: RunOptions, collector, use_gpu: bool):
    """The Ray TorchTrainer of a planned job: its workers, their data and the job they run."""
    from mtrec.train.worker import WorkerJob, train_loop_per_worker

    eval_day, eval_files, serving_files = next_day_inputs(cfg, plan.end) if cfg.tracking.enabled else (None, [], [])
    datasets = {
        "train": good_rows_dataset(
            cfg,
            plan.files,
            _read_side_skip(cfg, plan),
            _reads_left(plan),
            report=collector,
            quarantine=plan.quarantine(cfg.job.workdir),
        )
    }
    if eval_day is not None:
        datasets["eval"] = good_rows_dataset(cfg, eval_files)
    if serving_files:
        datasets["bn"] = good_rows_dataset(cfg, serving_files, serving=True)

    job = WorkerJob(
        cfg=cfg.model_dump(mode="json"),
        id=plan.job_id,
        run=plan.run,
        day=plan.end.isoformat(),
        parent=plan.parent,
        init_from=plan.init_from,
        staging=plan.staged,
        inputs=tuple(
            {"url": f.url, "name": f.name, "size": f.size, "quarantine": q}
            for f, q in zip(plan.files, plan.quarantine(cfg.job.workdir), strict=True)
        ),
        known_counts={i: asdict(c) for i, c in plan.counts.items()},
        epochs=plan.epochs,
        files=len(plan.files),
        allow_config_change=opts.allow_config_change,
        manifest=manifest,
        collector=collector,
        log_every=opts.log_every,
        kill=os.environ.get("MTREC_KILL_WORKER"),
        eval_days=(eval_day.isoformat(),) if eval_day else (),
        file_days=(0,) * len(eval_files),
        bn_serving=bool(serving_files),
    )
    name = f"{cfg.name}-{plan.kind}-{plan.days[0]}-{plan.end}"
    return _ray_trainer(cfg, train_loop_per_worker, job, datasets, name, cfg.train.max_failures, use_gpu)


def _ray_trainer(cfg: MtrecConfig, loop, job, datasets: dict, name: str, max_failures: int, use_gpu: bool):
    """The TorchTrainer every mtrec Ray Train job runs on: `train.num_workers` workers (a GPU each
    with `use_gpu`: nccl, else gloo) run `loop` with {"job": job} on `datasets`, split exactly (no
    row dropped), Ray Train's storage under the workdir."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    storage_path, storage_fs = _storage(cfg)
    return trainer_class()(
        loop,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
            placement_strategy=cfg.train.placement.value.upper(),
        ),
        datasets=datasets,
        dataset_config=_exact_split_config(cfg.train.ingest_buffer_mb * 2**20),
        run_config=RunConfig(
            name=f"{name}-{int(time.time())}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def run_scoring(cfg: MtrecConfig, loop, job, datasets: dict, name: str) -> dict:
    """A Ray Train job that scores (no training: no restart; a GPU per worker when the cluster has
    one for each, as training): `train.num_workers` workers run `loop` with {"job": job} on
    `datasets`, split without dropping a row; returns what rank 0 handed to `job.collector`
    (`RunCollector.finish`). Runs inside a Ray session.

    Raises:
        MtrecError: a worker failed (named), or rank 0 handed nothing.
    """
    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.train.num_workers > 0
    trainer = _ray_trainer(cfg, loop, job, datasets, name, 0, use_gpu)
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray Train's failure: one line naming the worker
        raise worker_failure(e, ray.get(job.collector.snapshot.remote())["workers"]) from None
    result = ray.get(job.collector.snapshot.remote())["result"]
    if result is None:
        raise MtrecError(f"{name} ended without a result from worker 0; see the Ray logs")
    return result


def ensure_registered(cfg: MtrecConfig, url: str) -> str | None:
    """For a day already published (a rerun is a no-op): its model version, registering it now if
    MLflow was down when the job that published it tried (tracking on; None otherwise)."""
    if not cfg.tracking.enabled:
        return None
    from mtrec.tracking import Tracker

    return Tracker(cfg).ensure_registered(url, checkpoint.read_manifest(url))


def already_published(cfg: MtrecConfig, days: list[dt.date], kind: str) -> TrainSummary:
    """The summary of a job whose last day is published already: nothing trained, its version
    registered now if an earlier run's registration did not complete."""
    url = checkpoint.checkpoint_url(cfg, days[-1])
    version = ensure_registered(cfg, url)
    return TrainSummary(
        model=cfg.name,
        days=[d.isoformat() for d in days],
        world_size=cfg.train.num_workers,
        kind=kind,
        skipped=True,
        checkpoint=url,
        mlflow={"version": version} if version else {},
    )


def _fit(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except Exception as e:  # handed to the main thread, which names the worker
        outcome["error"] = e
