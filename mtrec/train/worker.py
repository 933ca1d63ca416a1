"""The Ray Train worker entry: `train_loop_per_worker(config)`, and the small actor that carries
progress and per-worker results back to the driver (no shared storage needed).

Each worker: builds the model on meta, shards it with DistributedModelParallel (the config's
planner constraints; Ray Train has already joined the process group: gloo on CPU, nccl on GPU),
streams its share of the Ray Data stream as Arrow batches, and runs the lockstep loop
(`mtrec.train.loop`). Rank 0 sends progress records; every rank sends its stats at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import ray
import ray.train
import torch
import torch.distributed as dist

from mtrec import bn
from mtrec.config import MtrecConfig
from mtrec.data.io import DataFile, apply_storage_options
from mtrec.data.validate import FileCounts
from mtrec.errors import MtrecError
from mtrec.models import MultiTaskTrain, build_model
from mtrec.train import checkpoint
from mtrec.train.loop import LoopOptions, Progress, gather_stats, train_stream
from mtrec.train.position import FILE_COL, ROW_COL, Position, skip_trained
from mtrec.train.sharding import dense_optimizer, device_for_backend, plan_summary, shard
from mtrec.train.stream import rebatch, shuffle_epochs


@ray.remote(num_cpus=0)
class RunCollector:
    """Driver-side inbox, alive across worker-group restarts: worker registrations, progress
    records, the final result, and the fault drill's one-shot switch."""

    def __init__(self):
        self.workers: dict[int, dict] = {}
        self.attempts = 0  # rank 0 registrations: 1 + worker-group restarts
        self.pending: list[dict] = []
        self.history: list[dict] = []
        self.result: dict | None = None
        self.killed = False
        self.marks: dict[str, float] = {}  # rank 0's milestones (epoch seconds), newest attempt
        self.starts: list[dict] = []  # per attempt that resumed: checkpoint, step, rows
        self.counts: dict[int, FileCounts] = {}  # per file index, what the training read's validation found

    def mark(self, name: str, t: float) -> None:
        self.marks[name] = t

    def staged(self, example) -> None:
        """Rank 0 staged the checkpoint (`example`: its first rows): the driver may start building
        the served model while the workers evaluate."""
        self.example = (self.attempts, example)

    def staged_example(self) -> tuple[int, object] | None:
        """(the attempt that staged the checkpoint, its first rows), or None before any did."""
        return getattr(self, "example", None)

    def attempt(self) -> int:
        return self.attempts

    def register(self, rank: int, info: dict) -> None:
        self.workers[rank] = info
        if rank == 0:
            self.attempts += 1

    def progress(self, rec: dict) -> None:
        self.pending.append(rec)
        self.history.append(rec)

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out

    def finish(self, result: dict) -> None:
        self.result = result

    def started(self, resumed: dict) -> None:
        """An attempt started from an intra-day checkpoint (the first such start is the job's resume point)."""
        self.starts.append(resumed)

    def file_counts(self, file: int, counts: FileCounts) -> None:
        """A read task validated file `file` to its end (a retried or later-epoch read: the same counts)."""
        self.counts[file] = counts

    def counts_of(self) -> dict[int, FileCounts]:
        return self.counts

    def claim_kill(self) -> bool:
        first, self.killed = not self.killed, True
        return first

    def snapshot(self) -> dict:
        return {
            "workers": self.workers,
            "history": self.history,
            "result": self.result,
            "attempts": self.attempts,
            "marks": self.marks,
            "starts": self.starts,
            "counts": self.counts,
        }


def torch_threads(requested: int, local_world_size: int) -> int:
    """`train.torch_threads`, or (0) the node's cores shared by the workers on it."""
    return requested if requested > 0 else max(1, (os.cpu_count() or 1) // max(local_world_size, 1))


def _kill_switch(batches, rank: int, kill: str | None, collector):
    """Fault injection for tests and drills (`MTREC_KILL_WORKER=<rank>:<batches>` on the driver):
    that rank SIGKILLs itself after that many batches, as an OOM kill or a lost node would; once
    per job (a restarted worker group runs on)."""
    if not kill:
        yield from batches
        return
    who, after = (int(x) for x in kill.split(":"))
    for i, b in enumerate(batches):
        if who == rank and i == after and ray.get(collector.claim_kill.remote()):
            os.kill(os.getpid(), signal.SIGKILL)
        yield b


def _known_counts(job: WorkerJob) -> dict[int, FileCounts]:
    """Per file index, the counts known so far: those a resumed job carried, then the reads'."""
    counts = {int(k): FileCounts(**v) for k, v in job.known_counts.items()}
    counts.update(ray.get(job.collector.counts_of.remote()))
    return counts


def _complete_counts(job: WorkerJob) -> dict | None:
    """Every file's counts so far (`_known_counts`), JSON-ready, when they cover every file; None
    otherwise."""
    counts = _known_counts(job)
    return {str(i): asdict(c) for i, c in sorted(counts.items())} if len(counts) == len(job.inputs) else None


def _good_rows(job: WorkerJob, cfg: MtrecConfig, rank: int, world: int) -> tuple[int, dict]:
    """(the good rows of the job's files, the manifest's input_rows / quarantined_rows /
    truncated), as its read counted them (rank 0 asks the collector, and validates itself any file
    no read reported: a resumed job whose reads were all done before), the same on every rank."""
    from mtrec.data.validate import RowValidator, checked_batches

    total: list = [0, {}]
    if rank == 0:
        counts = _known_counts(job)
        for i, f in enumerate(job.inputs):
            if i not in counts:  # not read by this run: validated here (quarantine too), and reported
                c = FileCounts(f["name"], f["size"])
                for _ in checked_batches(
                    DataFile(f["url"], f["name"], f["size"]), RowValidator(cfg.spec), c, f["quarantine"]
                ):
                    pass
                ray.get(job.collector.file_counts.remote(i, c))
                counts[i] = c
        truncated: dict[str, int] = {}
        for c in counts.values():
            for g, n in c.truncated.items():
                truncated[g] = truncated.get(g, 0) + n
        totals = {
            "input_rows": sum(c.rows for c in counts.values()),
            "quarantined_rows": sum(c.bad for c in counts.values()),
            "truncated": {g.name: truncated.get(g.name, 0) for g in cfg.spec.features.sequences},
        }
        total = [sum(c.good for c in counts.values()), totals]
    if world > 1:
        dist.broadcast_object_list(total, src=0)
    return total[0], total[1]


def _first_rows(batches, head: list, rows: int = 5):
    """`batches` as they are; the first one's first `rows` rows kept in `head`."""
    for b in batches:
        if not head and b.num_rows:
            head.append(pa.Table.from_batches([b.slice(0, rows)]))
        yield b


def _gather_positions(mine: Position, world: int) -> Position:
    """Every rank's trained rows merged (an overlap raises: a row trained twice)."""
    if world == 1:
        return Position(mine.intervals)
    parts: list[dict | None] = [None] * world
    dist.all_gather_object(parts, mine.to_json())
    merged = Position()
    for p in parts:
        merged.merge(Position.from_json(p))
    return merged


def day_ordinal(day: str) -> int:
    return dt.date.fromisoformat(day).toordinal()


@dataclass(frozen=True)
class WorkerJob:
    """What each Ray Train worker is given: one picklable object (`train_loop_per_worker`)."""

    cfg: dict[str, Any]  # the run spec, dumped (workers rebuild it)
    id: str  # JobPlan.job_id
    run: str  # JobPlan.run
    day: str  # the last day, ISO
    parent: str | None
    staging: str
    allow_config_change: bool
    manifest: checkpoint.Manifest
    collector: Any = None  # the RunCollector actor the workers report to
    log_every: int = 50
    kill: str | None = None  # fault drill: MTREC_KILL_WORKER
    init_from: str | None = None  # a cold start's initial weights (another model's checkpoint)
    epochs: int = 1  # passes over the rows (JobPlan.epochs)
    files: int = 0  # files per epoch: a position's file index // files is its epoch
    eval_days: tuple[str, ...] = ()  # the day after, ISO, when its logs are there: dataset shard "eval"
    file_days: tuple[int, ...] = ()  # per file of "eval", its day's index in `eval_days`
    bn_serving: bool = False  # the BN check reads the last eval day's serving logs: dataset shard "bn"
    bn_check: bool = True  # check the BN statistics on the last eval day
    inputs: tuple[dict, ...] = ()  # per file index: url, name, size, its day's quarantine folder
    known_counts: dict[int, dict] = field(default_factory=dict)  # FileCounts a resumed job's checkpoint carried


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry (also after a worker-group restart). `config`: {"job": WorkerJob}
    (above). The dataset shard "train" yields canonical Arrow batches with positions.

    Starts from the job's newest intra-day checkpoint if there is one, else the parent, else a
    fresh model; saves an intra-day checkpoint every `train.checkpoint_every_batches` steps;
    stages the final checkpoint only when every good row was trained exactly once."""
    job = config["job"]
    cfg = MtrecConfig.model_validate(job.cfg)
    apply_storage_options(cfg.job.storage_options)
    day = dt.date.fromisoformat(job.day)
    collector = job.collector
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = torch_threads(cfg.train.torch_threads, ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device, backend = device_for_backend()
    ray.get(
        collector.register.remote(
            rank,
            {
                "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "device": str(device),
                "backend": backend,
                "torch_threads": threads,
            },
        )
    )
    mark = (lambda name: collector.mark.remote(name, time.time())) if rank == 0 else (lambda name: None)
    mark("worker_started")
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    dmp, plan = shard(MultiTaskTrain(build_model(cfg.spec, "meta", cfg.score_offsets()), cfg.spec), cfg, device)
    optimizer = dense_optimizer(dmp, cfg)

    done, start_step = Position(), 0
    # the newest, also one written after the driver looked; rank 0 chooses for everyone (a
    # straggler of a killed run may complete another one while the ranks look)
    choice = [checkpoint.latest_partial(cfg, day) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    partial = choice[0]
    partial_resumed = bool(partial and partial[1].get("job_id") == job.id)
    if partial_resumed:
        checkpoint.load(dmp, optimizer, partial[0], cfg)
        done, start_step = Position.from_json(partial[1]["position"]), int(partial[1]["step"])
        if rank == 0:
            ray.get(collector.started.remote({"checkpoint": partial[0], "step": start_step, "rows": done.rows}))
    elif job.parent:
        checkpoint.load(dmp, optimizer, job.parent, cfg, allow_config_change=job.allow_config_change)
    elif job.init_from:  # another model's tensors that fit (the manifest names the source)
        checkpoint.load_matching(dmp, job.init_from)
    setup_s = time.perf_counter() - t0
    mark("model_ready")

    shard_it = ray.train.get_dataset_shard("train")
    tables = shard_it.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", prefetch_batches=2)
    # a restarted worker group streams the data from the start again: rows already trained are
    # dropped here; then exact-size batches (rebatch merges a small last one: BatchNorm never sees 1 row)
    # the rank's rows through its shuffle buffer (one per epoch), then the trained ones dropped: a resumed
    # day replays the same shuffled stream and continues where it stopped
    rows = (rb for t in tables for rb in t.combine_chunks().to_batches())
    buffer_rows, _, seed, together = cfg.train.shuffle_plan(day_ordinal(job.day), rank)
    shuffled = shuffle_epochs(rows, job.files, buffer_rows, seed, together)
    batches = rebatch(skip_trained(shuffled, done), cfg.train.batch_size)
    batches = _kill_switch(batches, rank, job.kill, collector)
    head: list[pa.Table] = []  # rank 0's first rows: the served model's input example when no day is scored
    batches = _first_rows(batches, head) if rank == 0 else batches

    mine = Position()  # rows this rank trains in this attempt
    every = cfg.train.checkpoint_every_batches

    def trained_so_far() -> Position:
        """Rows trained by every rank in this attempt plus those before it (a row twice raises)."""
        trained = _gather_positions(mine, world)
        trained.merge(done)
        return trained

    def on_step(step: int) -> None:
        if step % every:
            return
        trained = trained_so_far()
        # every file's counts once the reads have reported them all: a resumed job then knows which epochs
        # it finished (rank 0 writes the manifest)
        known = [_complete_counts(job) if rank == 0 else None]
        url = checkpoint.partial_url(cfg, day, step, job.run)
        checkpoint.save(
            dmp,
            optimizer,
            url,
            {
                **job.manifest,
                "job_id": job.id,
                "step": step,
                "position": trained.to_json(),
                "rows_trained": trained.rows,
                "rows_per_epoch": trained.rows_per_epoch(job.files, job.epochs),
                "world_size": world,
                "file_counts": known[0],
            },
        )
        if rank == 0:
            checkpoint.prune_partials(cfg, day, keep=url, run=job.run)

    def on_progress(p: Progress) -> None:
        if rank == 0:
            collector.progress.remote(
                {
                    "step": p.step,
                    "rows": p.rows,
                    "rows_per_s": p.rows_per_s,
                    "loss": p.loss,
                    "task_losses": p.task_losses,
                    "line": p.line(),
                }
            )

    stats = train_stream(
        dmp,
        optimizer,
        batches,
        cfg,
        device,
        LoopOptions(
            log_every=job.log_every,
            on_progress=on_progress,
            position=mine,
            start_step=start_step,
            rng_key=day_ordinal(job.day),
            on_step=on_step,
            # a fresh model only: a resumed, warm-started or init_from model keeps its weights
            base_rate_start=cfg.train.start_at_base_rate and not (partial_resumed or job.parent or job.init_from),
        ),
    )
    mark("trained")
    everyone = gather_stats(stats)
    trained = trained_so_far()
    per_epoch = trained.rows_per_epoch(job.files, job.epochs)
    expected, totals = _good_rows(job, cfg, rank, world)  # what the same read's validation counted
    if per_epoch != [expected] * job.epochs:  # every rank sees the same sums: all stop before staging
        per = ", ".join(f"{w['rows']:,}" for w in everyone)
        split = f" (per epoch: {', '.join(f'{r:,}' for r in per_epoch)})" if job.epochs > 1 else ""
        raise MtrecError(
            f"workers trained {trained.rows:,} rows{split} ({per} per worker in this attempt, {done.rows:,} before "
            f"it) but validation counted {expected:,} good rows"
            + (f", each of {job.epochs} epochs to train once" if job.epochs > 1 else "")
            + "; nothing was published - rerun the job"
        )
    t1 = time.perf_counter()
    plan_dict = plan_summary(plan)
    last = [w["losses"][-1]["loss"] for w in everyone if w["losses"]]
    metrics = {"train_loss_last_window": sum(last) / len(last)} if last else {}  # next-day metrics: `mtrec evaluate`
    for k in ("loss_first_tenth", "loss_last_tenth"):  # of this attempt, over the ranks: the gate's loss floor
        v = [w[k] for w in everyone if w[k] is not None]
        if v:
            metrics[f"train_{k}"] = sum(v) / len(v)
    manifest = {
        **job.manifest,
        **totals,
        "world_size": world,
        "plan": plan_dict,
        "rows_trained": trained.rows,  # epochs x the good rows
        "rows_per_epoch": per_epoch,
        "steps": start_step + stats.steps,
        "metrics": metrics,
        "rows_per_worker": [w["rows"] for w in everyone],
        "resumed_at_step": start_step or None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    checkpoint.save(dmp, optimizer, job.staging, manifest, marker=False)
    mark("staged")
    if rank == 0:
        ray.get(collector.staged.remote(head[0] if head else None))
    evaluation = score_days(dmp.module.model, cfg, job) if job.eval_days else None
    mark("evaluated")
    served_bn = bn.served_bn_names(dmp.module.model)
    if rank == 0:
        ray.get(
            collector.finish.remote(
                {
                    "workers": everyone,
                    "plan": plan_dict,
                    "setup_s": setup_s,
                    "rows_trained": trained.rows,
                    "checkpoint_s": time.perf_counter() - t1,
                    "evaluation": evaluation,
                    "bn_running": {k: v for k, v in bn.capture(dmp.module.model).items() if k in served_bn},
                    "example": head[0] if head else None,
                }
            )
        )


def _shard_batches(name: str, batch_rows: int):
    """This rank's share of the dataset `name` as Arrow record batches."""
    tables = ray.train.get_dataset_shard(name).iter_batches(
        batch_size=batch_rows, batch_format="pyarrow", prefetch_batches=2
    )
    return (rb for t in tables for rb in t.combine_chunks().to_batches())


def score_days(model: torch.nn.Module, cfg: MtrecConfig, job) -> dict | None:
    """The model (sharded, on every rank) scored as served on `job.eval_days` (a training job: the
    day after its data): each rank its share of the rows (dataset shard "eval"), in one pass that
    also collects the BN layers' input moments (or a second pass over the last day's serving logs,
    shard "bn", with `job.bn_serving`); merged on rank 0 (`mtrec.eval.sharded`), which returns the
    figures the driver records (`next_day_figures`); None on the other ranks. A share that fails
    on any rank ends every rank's pass at the same step, and rank 0 returns {"day", "error"}
    naming the ranks and their errors: the job then fails in one line (the worker group is not
    restarted, so the day is not retrained). `job`: a WorkerJob or a ScoreJob."""
    from mtrec.eval.scoring import model_device
    from mtrec.eval.sharded import ShardFailed, failure_line, merge, next_day_figures, score_shard

    t0 = time.perf_counter()
    names = bn.served_bn_names(model) if job.bn_check else []
    rows, device = cfg.bn.batch_rows, model_device(model)
    try:
        eval_batches = _shard_batches("eval", rows)
        scored = merge(score_shard(model, cfg.spec, eval_batches, None if job.bn_serving else names), device)
        serving = None
        if names and job.bn_serving:
            bn_batches = _shard_batches("bn", rows)
            serving = merge(score_shard(model, cfg.spec, bn_batches, names, keep=False, head_rows=0), device)
    except ShardFailed as e:  # every rank stopped at the same step: the driver fails the job, no restart
        line = failure_line(e)
        return None if line is None else {"day": job.eval_days[-1], "error": line}
    if scored is None:
        return None
    days = [dt.date.fromisoformat(d) for d in job.eval_days]
    out = next_day_figures(model, cfg, scored, serving, days, list(job.file_days), job.day)
    out["seconds"] = time.perf_counter() - t0
    if out["bn"] is not None:
        out["bn"].seconds = out["seconds"]
    return out


def _agreed(e) -> None:
    """After a `lockstep` that failed (`ShardFailed`, on every rank): rank 0 raises the failed
    ranks' errors as one MtrecError (what Ray Train reports); the other ranks return."""
    from mtrec.eval.sharded import failure_line

    line = failure_line(e)
    if line is not None:
        raise MtrecError(line) from None


def _loaded(job) -> tuple[MtrecConfig, torch.nn.Module, dict]:
    """A scoring worker's run spec, model and checkpoint manifest: `job.cfg`'s model built on meta,
    sharded at this world size and loaded from `job.checkpoint` (DCP reshards it), with
    `job.bn_stats` (a version's recalibrated BN statistics, `bn.capture`'s form) over the
    checkpoint's; the model is `dmp.module.model`, its tables sharded."""
    cfg = MtrecConfig.model_validate(job.cfg)
    apply_storage_options(cfg.job.storage_options)
    torch.set_num_threads(torch_threads(cfg.train.torch_threads, ray.train.get_context().get_local_world_size()))
    device, _ = device_for_backend()
    dmp, _ = shard(MultiTaskTrain(build_model(cfg.spec, "meta", cfg.score_offsets()), cfg.spec), cfg, device)
    manifest = checkpoint.load(dmp, None, job.checkpoint, cfg, allow_config_change=True)  # scoring: rates do not matter
    bn.apply(dmp.module.model, job.bn_stats)  # a recalibrated version's statistics over its checkpoint's
    return cfg, dmp.module.model, manifest


@dataclass(frozen=True)
class ScoreJob:
    """A scoring job's worker input (`score_loop_per_worker`): a checkpoint scored on days."""

    cfg: dict[str, Any]  # the run spec, dumped
    checkpoint: str  # the checkpoint's URL (any world size: DCP reshards it)
    day: str  # the last day it was trained on, ISO
    eval_days: tuple[str, ...]
    file_days: tuple[int, ...]
    bn_serving: bool = False
    bn_check: bool = False  # also check the BN statistics on the last day (the gate's challenger)
    bn_stats: dict | None = None  # the version's recalibrated BN statistics (`bn.capture`), if any
    collector: Any = None


def score_loop_per_worker(config: dict) -> None:
    """Ray Train entry of a scoring job (`mtrec.jobs.evaluate.score_checkpoint`): the checkpoint
    loaded sharded at this world size, the days scored (`score_days`); rank 0 hands the figures
    to the collector."""
    job: ScoreJob = config["job"]
    cfg, model, manifest = _loaded(job)
    ctx = ray.train.get_context()
    evaluation = score_days(model, cfg, job)
    if ctx.get_world_rank() == 0:
        ray.get(
            job.collector.finish.remote(
                {"evaluation": evaluation, "manifest": manifest, "world_size": ctx.get_world_size()}
            )
        )


@dataclass(frozen=True)
class BNJob:
    """A BN check's worker input (`bn_loop_per_worker`): a checkpoint's BN statistics against a
    day as served (dataset shard "bn": its impressions' good rows, or its serving logs')."""

    cfg: dict[str, Any]  # the run spec the checkpoint was trained under, dumped
    checkpoint: str  # its URL (any world size: DCP reshards it)
    where: str  # the day and root checked, as errors name them
    recalibrate: bool = False  # also recalibrate (`bn.settle`): every rank sets the same statistics
    bn_stats: dict | None = None  # the version's recalibrated BN statistics (`bn.capture`), if any
    collector: Any = None


def bn_loop_per_worker(config: dict) -> None:
    """Ray Train entry of `mtrec bn-check --workers N`: the checkpoint loaded sharded, this rank's
    share of the day through the model as served in lockstep, each served BN layer's input
    moments summed across ranks; with `recalibrate`, the passes of `bn.settle`. Rank 0 hands the
    running statistics and reference moments before (and after) to the collector, with the
    recalibrated statistics (`bn.capture`) and the first rows it read (the served model's input
    example)."""
    from mtrec.eval.scoring import model_device
    from mtrec.eval.sharded import ShardFailed, reduce_moments, score_shard

    job: BNJob = config["job"]
    cfg, model, manifest = _loaded(job)
    names, device = bn.served_bn_names(model), model_device(model)
    head = []

    def measure():
        s = score_shard(model, cfg.spec, _shard_batches("bn", cfg.bn.batch_rows), names, False, 0 if head else 5)
        head.append(s.head)
        reduce_moments(s.moments, device)
        return s.moments, max((m.n for m in s.moments.values()), default=0)

    running = bn.running_stats(model, names)
    try:
        if job.recalibrate:
            settled = bn.settle(model, measure, job.where)
        else:
            before, rows = measure()
            settled = bn.Settled(before, before, rows, 1)
    except ShardFailed as e:
        _agreed(e)
        return
    if ray.train.get_context().get_world_rank() == 0:
        out = {
            "manifest": manifest,
            "rows": settled.rows,
            "passes": settled.passes,
            "before": (running, {n: m.mean_var() for n, m in settled.before.items()}),
            "after": None,
            "head": head[0],
        }
        if job.recalibrate:
            after = {n: m.mean_var() for n, m in settled.after.items()}
            out.update(after=(bn.running_stats(model, names), after), captured=bn.capture(model, names))
        ray.get(job.collector.finish.remote(out))


@dataclass(frozen=True)
class PredictJob:
    """A batch-scoring job's worker input (`predict_loop_per_worker`)."""

    cfg: dict[str, Any]  # the run spec the checkpoint was trained under (`gate.version_config`), dumped
    checkpoint: str  # its URL (any world size: DCP reshards it)
    out: str  # the output folder: part-<rank>-<k>.parquet
    names: tuple[str, ...]  # per file index of the dataset, the file's name (rows without row_id)
    row_id: bool  # the logs have `row_id`: the output's id column; else `file` and `row`
    rows_per_part: int = 1_000_000
    bn_stats: dict | None = None  # the version's recalibrated BN statistics (`bn.capture`), if any
    collector: Any = None


def predict_loop_per_worker(config: dict) -> None:
    """Ray Train entry of `mtrec predict --workers N`: the checkpoint loaded sharded at this world
    size, this rank's share of the day's rows (dataset shard "rows": typed input columns and ids)
    scored as served in lockstep (`mtrec.eval.sharded.lockstep`), written by this rank as Parquet
    parts of at most `rows_per_part` rows; rank 0 hands the rows and parts of every rank to the
    collector."""
    import pyarrow.parquet as pq

    from mtrec.data.io import filesystem, join
    from mtrec.eval.sharded import ShardFailed, lockstep
    from mtrec.serving import served_scores

    job: PredictJob = config["job"]
    cfg, model, _ = _loaded(job)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = cfg.spec.serving()
    outputs = list(spec.served_columns())
    ids = (
        [pa.field("row_id", pa.int64())] if job.row_id else [pa.field("file", pa.string()), pa.field("row", pa.int64())]
    )
    schema = pa.schema(ids + [pa.field(k, pa.float32()) for k in outputs])
    fs, root = filesystem(job.out)
    state = {"writer": None, "sink": None, "rows": 0, "in_part": 0}
    parts: list[str] = []

    def close() -> None:
        if state["writer"] is not None:
            state["writer"].close()
            state["sink"].close()
            state["writer"] = None

    def on_batch(rb: pa.RecordBatch, out: dict[str, torch.Tensor]) -> None:
        if state["writer"] is None or state["in_part"] >= job.rows_per_part:
            close()
            name = f"part-{rank:05d}-{len(parts):05d}.parquet"
            parts.append(name)
            state["sink"] = fs.open(f"{root}/{name}", "wb")
            state["writer"] = pq.ParquetWriter(state["sink"], schema)
            state["in_part"] = 0
        scores = served_scores(spec, out)
        if job.row_id:
            cols = [rb.column("row_id").cast(pa.int64())]
        else:
            files = rb.column(FILE_COL).to_numpy(zero_copy_only=False)
            cols = [pa.array([job.names[i] for i in files], pa.string()), rb.column(ROW_COL).cast(pa.int64())]
        state["writer"].write_table(pa.Table.from_arrays(cols + [pa.array(scores[k]) for k in outputs], schema=schema))
        state["rows"] += rb.num_rows
        state["in_part"] += rb.num_rows

    tables = ray.train.get_dataset_shard("rows").iter_batches(
        batch_size=cfg.bn.batch_rows, batch_format="pyarrow", prefetch_batches=2
    )
    try:
        lockstep(model, spec, (rb for t in tables for rb in t.combine_chunks().to_batches()), on_batch)
    except ShardFailed as e:
        _agreed(e)
        return
    finally:
        close()
    mine = {"rank": rank, "rows": state["rows"], "parts": [join(job.out, p) for p in parts]}
    everyone: list = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    if rank == 0:
        ray.get(job.collector.finish.remote({"ranks": everyone}))
