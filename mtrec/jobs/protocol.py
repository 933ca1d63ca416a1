"""One training job on Ray: the machinery `mtrec train`, `mtrec nightly` and `mtrec backfill` share.

    validate every day (quarantine, threshold) -> the good-row count the job must train
    -> Ray Data: one read task per Parquet file (any fsspec URL), the contract's row rules, the
       training columns plus each row's position; a stream in file order, split across the
       workers without dropping rows
    -> Ray Train: `num_workers` workers, each a DistributedModelParallel rank
       (mtrec.train.worker), warm-started from the parent checkpoint or the job's newest
       intra-day checkpoint; an intra-day checkpoint every `train.checkpoint_every_batches`
       steps; a failed worker group restarts from it (`train.max_failures`)
    -> the rows trained (positions merged over ranks and restarts) checked against the
       validated count: every row once; the checkpoint is staged, then published atomically

The pipeline never materializes the data: memory is bounded by Ray Data's backpressure and the
workers' prefetch, whatever the size of the range.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from mtrec import __version__
from mtrec.config import MtrecConfig
from mtrec.data.io import DataFile, filesystem, join, list_day_files
from mtrec.data.validate import ValidationReport, validate_day
from mtrec.errors import ConfigError, DataValidationError, MtrecError, TrackingError
from mtrec.train import checkpoint
from mtrec.train.position import Position
from mtrec.train.stream import read_good_rows


@dataclass
class TrainSummary:
    """What a training job did. `rows == expected_rows` is checked before the job succeeds."""

    model: str
    days: list[str]
    world_size: int
    kind: str = "full_retrain"  # full_retrain | nightly
    parent: str | None = None  # the checkpoint it warm-started from (None: cold start)
    resumed: dict | None = None  # {"checkpoint", "step", "rows"} when it resumed an intra-day checkpoint
    restarts: int = 0  # worker-group restarts within the job (each resumed from an intra-day checkpoint)
    skipped: bool = False  # the day was already published: nothing done
    phases: dict = field(default_factory=dict)  # milestone -> seconds since the job started (where the wall time goes)
    input_rows: int = 0
    quarantined_rows: int = 0
    expected_rows: int = 0  # good rows the validation counted
    rows: int = 0  # rows the workers trained, summed
    rows_per_s: float = 0.0  # streaming rate: rows / slowest worker's first-to-last-batch time
    wall_s: float = 0.0
    workers: list[dict] = field(default_factory=list)  # per rank: WorkerStats + node/pid/threads
    plan: dict = field(default_factory=dict)  # table -> {sharding_type, ranks}
    progress: list[dict] = field(default_factory=list)  # rank 0's progress records
    ray: dict = field(default_factory=dict)
    checkpoint: str = ""  # the published checkpoint (dt=<last day>)
    mlflow: dict = field(default_factory=dict)  # {"uri", "run_id", "version", "model_uri", "eval_day", "metrics"} (tracking on)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def lines(self) -> list[str]:
        per = ", ".join(f"worker {w['rank']}: {w['rows']:,} rows at {w['rows_per_s']:,.0f}/s "
                        f"({w['wait_s']:.1f}s waiting for data, {w['convert_s']:.1f}s converting)" for w in self.workers)
        tables: dict[int, int] = {}
        for t in self.plan.values():
            for r in t["ranks"]:
                tables[r] = tables.get(r, 0) + 1
        loss = [p["loss"] for p in self.progress]
        start = (f"warm start from {self.parent}" if self.parent else "cold start") + (
            f", resumed at step {self.resumed['step']} ({self.resumed['rows']:,} rows already trained)" if self.resumed else "") + (
            f", {self.restarts} worker restart(s)" if self.restarts else "")
        return [
            f"trained {self.rows:,} rows of {self.days[0]} .. {self.days[-1]} on {self.world_size} worker(s) "
            f"({self.quarantined_rows:,} quarantined): {self.rows_per_s:,.0f} rows/s streaming, {self.wall_s:.1f}s wall",
            f"  {self.kind}: {start}",
            *([f"  sampling: {sum(w.get('sampled_rows', 0) for w in self.workers):,} rows trained after sampling "
               f"(negative_rate / positive_repeat in train.sampling)"]
              if any(w.get("sampled_rows", w["rows"]) != w["rows"] for w in self.workers) else []),
            f"  {per}",
            f"  embedding shards per worker: {', '.join(f'worker {r}: {n} tables' for r, n in sorted(tables.items()))}",
            f"  loss {loss[0]:.4f} -> {loss[-1]:.4f}" if loss else "  loss: no batches",
            f"  checkpoint: {self.checkpoint}",
            *([f"  mlflow: run {self.mlflow['run_id']}, version {self.mlflow.get('version')} (alias challenger) in {self.mlflow['uri']}"
               + (f"; on {self.mlflow['eval_day']}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.mlflow["metrics"].items() if k in self.mlflow["gate"])
                  if self.mlflow.get("eval_day") else "; no next-day logs to evaluate on yet")] if self.mlflow.get("run_id") else []),
            "  timeline (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()),
        ]


def validate(cfg: MtrecConfig, day: dt.date) -> ValidationReport:
    """`validate_day` of the run spec's logs, quarantine and limit."""
    return validate_day(cfg.spec, cfg.job.logs, day, cfg.job.workdir, cfg.job.max_bad_fraction)


def date_range(start: dt.date, end: dt.date) -> list[dt.date]:
    if end < start:
        raise ConfigError(f"--to {end} is before --from {start}; pass a range whose end is on or after its start")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def good_rows_dataset(cfg: MtrecConfig, files: list[DataFile], done: dict | None = None):
    """A Ray Dataset streaming the good rows of `files` in file order (one read task per file),
    with positions (file index in `files`), leaving out the rows in `done` (`Position.to_json()`)."""
    import ray.data

    items = [{"index": i, "url": f.url, "name": f.name, "size": f.size} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    return ds.map_batches(read_good_rows, fn_kwargs={"spec": cfg.spec.model_dump(mode="json"), "done": done}, batch_size=1, batch_format="pyarrow")


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
                opts = self._resolve_execution_options(name)
                opts.preserve_order = True  # file order: reproducible runs
                r = opts.resource_limits
                opts.resource_limits = ExecutionResources(cpu=r.cpu, gpu=r.gpu, memory=r.memory,
                                                          object_store_memory=min(r.object_store_memory, buffer_bytes))
                ds.context.execution_options = opts
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    out[i][name] = split
            return out

    return ExactSplit()


def _storage(cfg: MtrecConfig) -> str:
    url = join(cfg.job.workdir, "ray")
    if "://" in url and not url.startswith("file://"):
        return url
    path = os.path.abspath(url.removeprefix("file://"))
    os.makedirs(path, exist_ok=True)
    return path


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
        return MtrecError(f"training failed in Ray Train's controller: {_first_line(cause)}; see the Ray logs (ray logs / /tmp/ray/session_latest/logs)")
    def died(exc: BaseException) -> bool:  # the process is gone (killed, OOM, node lost), not a Python error
        return any(k in type(_root(exc)).__name__ for k in ("HealthCheck", "ActorDied", "WorkerCrashed", "NodeDied"))

    parts = []
    for rank, exc in sorted(failures.items(), key=lambda kv: (not died(kv[1]), kv[0])):
        w = workers.get(rank, {})
        where = f"worker {rank}" + (f" (node {w['node']}, pid {w['pid']})" if w else "")
        parts.append(f"{where}{' died' if died(exc) else ''}: {_first_line(_root(exc))}")
    return MtrecError("training failed: " + "; then ".join(parts) + "; nothing was published, rerun the job (see the Ray logs for the traceback)")


def _root(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:200] + ' ...' if len(line) > 200 else line}".strip()


def _trainer_class():
    """TorchTrainer whose placement-group cleaner gives up quickly. Ray Train 2.x starts a detached
    cleaner actor per run and, at the end, waits for its monitor thread, which may sit in a 10 s
    state-API call (or fail to reach the state API when the local cluster runs without a
    dashboard): 12 s added to every job. With 1 s/2 s timeouts the run ends in about 3 s; the
    cleaner still removes the placement group if the controller dies."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [PlacementGroupCleanerCallback(check_interval_s=0.5, get_actor_timeout_s=1.0, stop_timeout=2.0)
                    if isinstance(cb, PlacementGroupCleanerCallback) else cb for cb in super()._create_default_callbacks()]

    return Trainer


def job_id(cfg: MtrecConfig, kind: str, days: list[dt.date], parent: str | None, parent_manifest: dict | None,
           files: list[DataFile]) -> str:
    """What makes two runs the same job (so one may resume the other's intra-day checkpoint): the
    kind, days, parent checkpoint (and when it was written), the files (URL and size) and the
    config hashes."""
    key = {"kind": kind, "days": [d.isoformat() for d in days], "parent": parent,
           "parent_created": (parent_manifest or {}).get("created_at"), "files": [[f.url, f.size] for f in files],
           "model": cfg.fingerprint(), "training": cfg.training_fingerprint()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_job(
    cfg: MtrecConfig,
    days: list[dt.date],
    kind: str,
    parent: str | None,
    say: Callable[[str], None] = print,
    log_every: int = 50,
    allow_config_change: bool = False,
    ray_info: dict | None = None,
) -> TrainSummary:
    """Train `days` (in order) starting from checkpoint `parent` (None: a fresh model) and publish
    the checkpoint dt=<last day>. Runs inside a Ray session (`mtrec.jobs.cluster.ray_session`).

    An unfinished earlier run of the same job (same days, parent, files and settings) left an
    intra-day checkpoint: the job resumes from it and trains only the rows it had not trained.

    Raises:
        DataValidationError: a day fails the contract (before any training).
        CheckpointError: the parent is unpublished, of another model or shape, or (without
            `allow_config_change`) trained under other training settings.
        MtrecError: a worker failed (named) more than `train.max_failures` times, or the rows
            trained differ from the rows validated; nothing is published then.
        TrackingError: MLflow unreachable (tracking on): before training, nothing done; while
            recording, nothing published; while registering, the checkpoint is published and
            the rerun of the same command registers it.
    """
    t_job, t_epoch = time.perf_counter(), time.time()
    end = days[-1]
    summary = TrainSummary(model=cfg.name, days=[d.isoformat() for d in days], world_size=cfg.train.num_workers,
                           kind=kind, parent=parent, ray=ray_info or {})
    parent_manifest = None
    if parent:
        parent_manifest = checkpoint.read_manifest(parent)
        checkpoint.check_compatible(parent_manifest, parent, cfg, allow_config_change)
    files: list[DataFile] = []
    reports = []
    for day in days:
        report = validate(cfg, day)
        reports.append(report)
        if report.input_rows == 0:
            raise DataValidationError(f"the logs of {day} hold no rows ({len(list_day_files(cfg.job.logs, day))} empty file(s) under "
                                      f"{cfg.job.logs}); the export is empty or truncated - re-export the day, nothing was trained")
        summary.input_rows += report.input_rows
        summary.quarantined_rows += report.bad_rows
        summary.expected_rows += report.good_rows
        files += list_day_files(cfg.job.logs, day)
        say(f"validated {day}: {report.good_rows:,} good rows, {report.bad_rows:,} quarantined")

    jid = job_id(cfg, kind, days, parent, parent_manifest, files)
    done = Position()
    partial = checkpoint.latest_partial(cfg, end)
    if partial and partial[1].get("job_id") == jid:
        done = Position.from_json(partial[1]["position"])  # read less; the workers skip by the newest one
        say(f"resuming from intra-day checkpoint {partial[0]}: step {partial[1]['step']}, "
            f"{done.rows:,} of {summary.expected_rows:,} rows already trained")
    elif partial:
        say(f"discarding intra-day checkpoints of another job (other data, parent or settings) under {checkpoint.partial_root(cfg, end)}")
        checkpoint.prune_partials(cfg, end)
    for line in checkpoint.recover_staging(cfg, end):  # a driver that died between staging and publishing
        say(line)

    summary.checkpoint = checkpoint.checkpoint_url(cfg, end)
    staged = checkpoint.staging_url(cfg, end)
    run = staged.rsplit(".", 1)[-1]  # this run's id, also in its intra-day checkpoints' names
    manifest = {**checkpoint.spec_manifest(cfg), "date": end.isoformat(), "kind": kind, "days": summary.days, "parent": parent,
                "parent_date": (parent_manifest or {}).get("date"), "job_id": jid,
                "config_fingerprint": cfg.fingerprint(), "training_fingerprint": cfg.training_fingerprint(),
                "config": cfg.model_dump(mode="json"), "input_rows": summary.input_rows, "quarantined_rows": summary.quarantined_rows,
                "files": [{"url": f.url, "size": f.size} for f in files], "mtrec_version": __version__}
    tracker, run_id = None, None
    with contextlib.ExitStack() as tracked:
        if cfg.tracking.enabled:  # before training: MLflow down fails the job now, not after the day is trained
            from mtrec.tracking import Tracker

            tracker = Tracker(cfg)
            # a published day's run is complete (only its registration may lag): a failure after the publish leaves it RUNNING
            run_id = tracked.enter_context(tracker.job_run(kind, days, summary.checkpoint, parent, parent_manifest,
                                                           keep_open=lambda: summary.mlflow.get("published", False)))
            manifest.update(mlflow_run_id=run_id, tracking_uri=tracker.uri)
            summary.mlflow = {"uri": tracker.uri, "run_id": run_id}
            say(f"mlflow: run {run_id} in experiment {cfg.name} at {tracker.uri}")
        return _train_and_publish(cfg, days, kind, parent, say, log_every, allow_config_change, summary, manifest, files, done, jid,
                                  staged, run, reports, tracker, run_id, t_job, t_epoch)


def _train_and_publish(cfg: MtrecConfig, days: list[dt.date], kind: str, parent: str | None, say: Callable[[str], None], log_every: int,
                       allow_config_change: bool, summary: TrainSummary, manifest: dict, files: list[DataFile], done: Position,
                       jid: str, staged: str, run: str, reports: list, tracker, run_id: str | None, t_job: float,
                       t_epoch: float) -> TrainSummary:
    """run_job after the checks: train on Ray, record (MLflow), publish, register."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from mtrec.train.worker import RunCollector, train_loop_per_worker

    end = days[-1]
    use_gpu = summary.ray.get("gpus", 0) >= cfg.train.num_workers > 0
    collector = RunCollector.remote()
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "collector": collector, "log_every": log_every,
                           "kill": os.environ.get("MTREC_KILL_WORKER"),
                           "job": {"id": jid, "run": run, "day": end.isoformat(), "parent": parent, "staging": staged,
                                   "expected_rows": summary.expected_rows, "allow_config_change": allow_config_change,
                                   "manifest": manifest}},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                     placement_strategy=cfg.train.placement.value.upper()),
        datasets={"train": good_rows_dataset(cfg, files, done.to_json() if done.intervals else None)},
        dataset_config=_exact_split_config(cfg.train.ingest_buffer_mb * 2**20),
        run_config=RunConfig(name=f"{cfg.name}-{kind}-{days[0]}-{end}-{int(time.time())}", storage_path=_storage(cfg),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    say(f"training {cfg.name} on {summary.expected_rows - done.rows:,} rows with {cfg.train.num_workers} worker(s), batch {cfg.train.batch_size}")
    outcome: dict = {}
    t_start = time.time()
    thread = threading.Thread(target=lambda: _fit(trainer, outcome), daemon=True)
    thread.start()
    tracking_error: list[MtrecError] = []

    def drain() -> None:
        recs = ray.get(collector.drain.remote())
        for rec in recs:
            say(rec["line"])
        if recs and tracker is not None and not tracking_error:
            try:
                tracker.log_progress(run_id, recs)
            except MtrecError as e:  # training goes on (its intra-day checkpoints are kept); nothing is published
                tracking_error.append(e)
                say(f"{e}; training goes on, but the job will fail before publishing")

    while thread.is_alive():
        thread.join(timeout=1.0)
        drain()
    drain()
    snap = ray.get(collector.snapshot.remote())
    summary.restarts = max(snap["attempts"] - 1, 0)
    summary.resumed = snap["starts"][0] if snap["starts"] and (not summary.restarts or done.rows) else None
    if "error" in outcome or snap["result"] is None:
        checkpoint.discard(staged)
        left = checkpoint.latest_partial(cfg, end)
        err = worker_failure(outcome["error"], snap["workers"]) if "error" in outcome else \
            MtrecError("training ended without a result from worker 0; see the Ray logs")
        if left:
            raise err.reworded(f"{err}; the next run of this job resumes from {left[0]} (step {left[1]['step']})") from None
        raise err from None
    result = snap["result"]
    t_fit = time.time()
    summary.workers = [{**w, **snap["workers"].get(w["rank"], {})} for w in result["workers"]]
    summary.plan = result["plan"]
    marks = {"validated": t_start - t_epoch, **{k: v - t_epoch for k, v in snap["marks"].items()}, "fit_returned": t_fit - t_epoch}
    if tracker is not None:  # record before publishing: no published checkpoint without its run
        from mtrec.tracking import record_job

        try:
            if tracking_error:
                raise tracking_error[0]
            summary.mlflow.update(record_job(tracker, run_id, cfg, staged, manifest, summary, reports))
        except Exception as e:  # noqa: BLE001 - MLflow, plotting, scoring: one line, nothing published
            checkpoint.discard(staged)
            left = checkpoint.latest_partial(cfg, end)
            resume = f"; the next run resumes from {left[0]} (step {left[1]['step']})" if left else ""
            err = e if isinstance(e, MtrecError) else TrackingError(f"recording run {run_id} failed: {_first_line(e)}")
            raise err.reworded(f"{err}; the day was trained but nothing was published{resume}") from None
        marks["recorded"] = time.time() - t_epoch
    from mtrec.lock import ensure_held

    try:  # a job whose lease another job took over publishes nothing: that job owns the model now
        ensure_held(cfg)
    except MtrecError:
        checkpoint.discard(staged)
        raise
    checkpoint.publish(staged, summary.checkpoint)
    summary.mlflow["published"] = True
    checkpoint.prune_partials(cfg, end)
    say(f"published {summary.checkpoint}")
    marks["published"] = time.time() - t_epoch
    if tracker is not None:  # after publishing: no version points at a missing checkpoint
        try:
            summary.mlflow["version"] = tracker.register(run_id, summary.mlflow["model_uri"], summary.checkpoint, end)
        except MtrecError as e:
            raise e.reworded(f"{e}; {summary.checkpoint} is published and run {run_id} recorded, but its registration did not "
                             "complete: rerun the same command once MLflow is back, it completes it without retraining") from None
        say(f"registered version {summary.mlflow['version']} of {cfg.name} (alias challenger)")
        marks["registered"] = time.time() - t_epoch
    summary.phases = {k: round(v, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
    summary.progress = [{k: v for k, v in p.items() if k != "line"} for p in snap["history"]]
    summary.rows = result["rows_trained"]
    slowest = max((w["seconds"] for w in summary.workers), default=0.0)
    summary.rows_per_s = sum(w["rows"] for w in summary.workers) / slowest if slowest > 0 else 0.0
    summary.wall_s = time.perf_counter() - t_job
    return summary  # rows == expected_rows: the workers checked it before staging

def ensure_registered(cfg: MtrecConfig, url: str, say: Callable[[str], None] = print) -> str | None:
    """For a day already published (a rerun is a no-op): its model version, registering it now if
    MLflow was down when the job that published it tried (tracking on; None otherwise)."""
    if not cfg.tracking.enabled:
        return None
    from mtrec.tracking import Tracker

    return Tracker(cfg).ensure_registered(url, checkpoint.read_manifest(url))


def _fit(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except Exception as e:  # handed to the main thread, which names the worker
        outcome["error"] = e


def write_summary(summary: TrainSummary | list[TrainSummary], url: str) -> None:
    """The job summary as JSON (a list for a multi-day nightly/backfill)."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as fh:
        fh.write(summary.to_json() if isinstance(summary, TrainSummary) else json.dumps([asdict(s) for s in summary], indent=2, default=str))
