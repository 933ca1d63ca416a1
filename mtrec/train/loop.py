"""The training loop every worker runs, in lockstep with the other ranks.

Sharded embedding tables make every step a collective (the all-to-all of ids and pooled
embeddings), so all ranks must take the same number of steps, and a stream split across workers
is never exactly even. Each step the ranks agree (one tiny all-reduce) on how many still have a
batch. A rank whose share has run out runs a pad batch (`mtrec.data.batch.pad_batch`) with its loss
multiplied by 0 and BatchNorm frozen, and the dense gradients (averaged over all ranks by DDP) are
rescaled to the mean over the ranks that trained. No row is dropped to even the split (Ray
Train's default `equal=True` split would), none is trained twice, and the step ends when every
rank's share is done.

World size 1 needs none of that and takes no collective.

Resumable: every step reseeds torch's RNG (dropout, the shallow tower's feature dropout) from
(train.seed, the job's key, the step, the rank), and each rank records the rows it trained
(`mtrec.train.position.Position`). A job resumed from an intra-day checkpoint at step S with the
same rows left therefore takes exactly the steps the uninterrupted job would have taken.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from mtrec.config import MtrecConfig
from mtrec.data.batch import BatchConverter, pad_batch
from mtrec.train.position import Position, batch_positions
from mtrec.train.sampling import sample


@dataclass
class WorkerStats:
    """What one rank trained. `rows` counts real rows only (never pad rows)."""

    rank: int
    world_size: int
    rows: int = 0  # rows consumed from the stream
    sampled_rows: int = 0  # rows trained after `train.sampling` (= rows without sampling)
    batches: int = 0
    steps: int = 0  # lockstep steps, pad steps included
    pad_steps: int = 0
    first_batch_wait_s: float = 0.0  # from loop start to this rank's first batch (stream start-up)
    seconds: float = 0.0  # from the first batch to the last step
    wait_s: float = 0.0  # of `seconds`, blocked waiting for the next batch (the input pipeline)
    convert_s: float = 0.0  # of `seconds`, Arrow -> KeyedJaggedTensor conversion
    losses: list[dict[str, float]] = field(default_factory=list)  # per logged step, this rank
    # mean loss per row of this rank's first and last tenth of trained batches (at least one each): the
    # gate's loss floor compares them (a loss that climbs: logs sorted by label, a diverging rate).
    # None for an attempt that resumed mid-job: its first tenth would be the middle of the job
    loss_first_tenth: float | None = None
    loss_last_tenth: float | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "rows_per_s": self.rows_per_s}


@dataclass
class Progress:
    """One progress record (identical on every rank; rank 0 prints it)."""

    step: int
    rows: list[int]  # rows trained so far, per rank
    rows_per_s: float  # all ranks together, since the first batch
    loss: float  # mean batch loss since the previous record, all ranks
    task_losses: dict[str, float] = field(default_factory=dict)  # the same, per task (unweighted)

    def line(self) -> str:
        per = ", ".join(f"{r:,}" for r in self.rows)
        return (
            f"  step {self.step}: {sum(self.rows):,} rows (per worker: {per}), {self.rows_per_s:,.0f} rows/s, "
            f"loss {self.loss:.4f}"
        )


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def _frozen(bns: list[nn.Module], frozen: bool = True) -> Iterator[None]:
    """BatchNorm layers on their running statistics (not updating them) inside the block."""
    for m in bns if frozen else ():
        m.eval()
    try:
        yield
    finally:
        for m in bns if frozen else ():
            m.train()


@dataclass
class LoopOptions:
    """How `train_stream` runs beyond its inputs: progress, positions, resume and hooks."""

    log_every: int = 50  # lockstep steps between progress records (each costs one small all-gather)
    on_progress: Callable[[Progress], None] | None = None  # receives each progress record, on every rank
    pg: dist.ProcessGroup | None = None  # process group (default: the world)
    position: Position | None = None  # receives the (file, row) positions of every row this rank trains
    start_step: int = 0  # steps already taken by the job (a resumed job continues its step count)
    rng_key: int = 0  # the job's key in the per-step seed (the nightly job uses the day's ordinal)
    # called on every rank after each step with the job's step count (intra-day checkpoints; a
    # collective is allowed there, every rank calls it at the same step)
    on_step: Callable[[int], None] | None = None
    # a fresh model: before the first step, each binary root task's output bias is set to the log-odds of
    # its label's rate in that step's rows, all ranks together (`train.start_at_base_rate`)
    base_rate_start: bool = False


def start_at_base_rate(
    dmp: nn.Module, cfg: MtrecConfig, fed: pa.RecordBatch | None, world: int, device: torch.device, pg=None
) -> dict[str, float]:
    """Set each binary root task's output bias to the log-odds of its label's rate in `fed` (this
    step's rows after sampling; None: none on this rank), summed over the ranks (a collective at
    world size > 1: every rank calls it at the same step). A model's output otherwise starts near
    p = 0.5, 10-20x a click rate. Returns task -> the bias set (rate clipped to [1e-4, 1 - 1e-4])."""
    from mtrec.spec import LabelKind

    towers = dmp.module.model.towers
    tasks = [
        t for t in cfg.spec.tasks if t.given is None and cfg.spec.label_kind(t) == LabelKind.BINARY and t.name in towers
    ]
    if not tasks:
        return {}
    counts = torch.zeros(len(tasks) + 1, dtype=torch.float64, device=device)  # positives per task, rows
    if fed is not None:
        for i, t in enumerate(tasks):
            counts[i] = float(np.sum(fed.column(t.label).to_numpy(zero_copy_only=False) > 0))
        counts[-1] = fed.num_rows
    if world > 1:
        dist.all_reduce(counts, group=pg)
    if counts[-1] <= 0:
        return {}
    out = {}
    with torch.no_grad():
        for i, t in enumerate(tasks):
            rate = min(max(float(counts[i] / counts[-1]), 1e-4), 1 - 1e-4)
            out[t.name] = float(np.log(rate / (1 - rate)))
            towers[t.name].out.bias.fill_(out[t.name])
    return out


@dataclass
class _Window:
    """This rank's loss sums since the last progress record."""

    tasks: list[str]
    loss: float = 0.0
    batches: int = 0
    per_task: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def add(self, loss: float, task_losses: dict) -> None:
        self.loss += loss
        self.batches += 1
        for i, name in enumerate(self.tasks):
            self.per_task[i] += float(task_losses[name])

    def reset(self) -> None:
        self.loss, self.batches, self.per_task = 0.0, 0, [0.0] * len(self.tasks)


def train_stream(
    dmp: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[pa.RecordBatch],
    cfg: MtrecConfig,
    device: torch.device,
    opts: LoopOptions | None = None,
) -> WorkerStats:
    """Train on this rank's share of the stream until every rank's share is done.

    Args:
        dmp: DistributedModelParallel(MultiTaskTrain(model)); returns (loss, (losses, out, labels)).
        optimizer: the dense optimizer (the tables' fused optimizer steps inside backward).
        batches: this rank's Arrow record batches (canonical columns, see mtrec.train.stream).
        cfg: the run spec (the model spec for the converter and the pad batch, `train.sampling`, `train.seed`).
        device: where batches go.
        opts: progress, positions, resume and hooks (LoopOptions).

    Returns:
        WorkerStats of this rank.
    """
    opts = opts or LoopOptions()
    pg, position, start_step = opts.pg, opts.position, opts.start_step
    world = dist.get_world_size(pg) if dist.is_initialized() else 1
    rank = dist.get_rank(pg) if dist.is_initialized() else 0
    stats = WorkerStats(rank=rank, world_size=world)
    conv = BatchConverter(cfg.spec)
    pad = pad_batch(cfg.spec).to(device)
    bns = _batchnorms(dmp)
    dense_params = [p for g in optimizer.param_groups for p in g["params"]]
    it = iter(batches)
    dmp.train()
    t_start = time.perf_counter()
    t0: float | None = None
    window = _Window([t.name for t in cfg.tasks])
    batch_losses, batch_rows = array("d"), array("d")  # every trained batch's loss and rows: 16 bytes a step
    while True:
        tw = time.perf_counter()
        rb = next(it, None)
        if t0 is not None:
            stats.wait_s += time.perf_counter() - tw
        if rb is not None and t0 is None:
            t0 = time.perf_counter()
            stats.first_batch_wait_s = t0 - t_start
        fed = None  # the rows this rank trains on this step: rb after sampling
        if rb is not None:
            stats.rows += rb.num_rows  # consumed (sampled out or not): exactly-once counts these
            if position is not None and (pos := batch_positions(rb)) is not None:
                position.add_batch(*pos)
            fed = sample(rb, cfg.train.sampling, cfg.train.seed)
            stats.sampled_rows += fed.num_rows
            fed = fed if fed.num_rows else None
            if fed is None and world == 1:  # sampled away: no step at all (no collective needs it)
                continue
        if world > 1:
            flag = torch.tensor([0 if rb is None else 1, 0 if fed is None else 1], dtype=torch.int64, device=device)
            dist.all_reduce(flag, group=pg)
            alive, active = int(flag[0].item()), int(flag[1].item())
        else:
            alive, active = int(rb is not None), int(fed is not None)
        if alive == 0:
            break
        if opts.base_rate_start and stats.steps == 0 and start_step == 0:
            start_at_base_rate(dmp, cfg, fed, world, device, pg)
        optimizer.zero_grad()
        torch.manual_seed(step_seed(cfg.train.seed, opts.rng_key, start_step + stats.steps, rank))
        if fed is not None:
            tc = time.perf_counter()
            batch = conv(fed).to(device)
            stats.convert_s += time.perf_counter() - tc
            with _frozen(bns, fed.num_rows < 2):  # BatchNorm cannot take batch statistics of one row
                loss, (task_losses, _, _) = dmp(batch)
                loss.backward()
            batch_losses.append(float(loss.item()))
            batch_rows.append(fed.num_rows)
            window.add(batch_losses[-1], task_losses)
            stats.batches += 1
        else:  # this rank's stream has ended (or sampling left nothing): the collectives still need it
            with _frozen(bns):  # the pad rows must not move the running statistics
                loss, _ = dmp(pad)
                (loss * 0.0).backward()
            stats.pad_steps += 1
        if 0 < active < world:  # DDP averaged over `world` ranks, of which only `active` trained
            for p in dense_params:
                if p.grad is not None:
                    p.grad.mul_(world / active)
        if active:  # nobody trained (every rank's batch sampled away): Adam's momentum must not move
            optimizer.step()
        stats.steps += 1
        if stats.steps % opts.log_every == 0:
            _progress(stats, window, t0, world, device, opts)
        if opts.on_step is not None:
            opts.on_step(start_step + stats.steps)
    if stats.steps % opts.log_every:  # the last partial window (every rank ends at the same step)
        _progress(stats, window, t0, world, device, opts)
    stats.seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    if batch_losses and start_step == 0:  # a resumed attempt's first tenth is the middle of the job: none
        tenth = max(1, len(batch_losses) // 10)
        loss, rows = np.frombuffer(batch_losses), np.frombuffer(batch_rows)
        stats.loss_first_tenth = float(np.average(loss[:tenth], weights=rows[:tenth]))
        stats.loss_last_tenth = float(np.average(loss[-tenth:], weights=rows[-tenth:]))
    return stats


def step_seed(seed: int, key: int, step: int, rank: int) -> int:
    """A 63-bit seed from (seed, key, step, rank): reproducible, different for every step. A
    multiply-xorshift of its own, not splitmix64 (mtrec.data.hashing): every trained model's
    dropout masks come from these exact values."""
    x = 0x9E3779B97F4A7C15
    for v in (seed, key, step, rank):
        x = ((x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def _progress(
    stats: WorkerStats, window: _Window, t0: float | None, world: int, device: torch.device, opts: LoopOptions
) -> None:
    """Gather (rows, window loss, elapsed, per-task window losses) from every rank; record this
    rank's window mean loss."""
    mine = torch.tensor(
        [stats.rows, window.loss, window.batches, time.perf_counter() - (t0 or time.perf_counter()), *window.per_task],
        dtype=torch.float64,
        device=device,
    )
    if world > 1:
        parts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=opts.pg)
    else:
        parts = [mine]
    rows = [int(p[0].item()) for p in parts]
    n_loss = sum(p[2].item() for p in parts)
    mean_loss = sum(p[1].item() for p in parts) / max(n_loss, 1)
    elapsed = max(p[3].item() for p in parts)
    task_losses = {t: sum(p[4 + i].item() for p in parts) / max(n_loss, 1) for i, t in enumerate(window.tasks)}
    rec = Progress(
        step=opts.start_step + stats.steps,
        rows=rows,
        rows_per_s=sum(rows) / elapsed if elapsed > 0 else 0.0,
        loss=mean_loss,
        task_losses=task_losses,
    )
    if window.batches:
        stats.losses.append({"step": stats.steps, "rows": stats.rows, "loss": window.loss / window.batches})
    window.reset()
    if opts.on_progress is not None:
        opts.on_progress(rec)


def gather_stats(stats: WorkerStats, pg: dist.ProcessGroup | None = None) -> list[dict]:
    """Every rank's WorkerStats as dicts, on every rank (world size 1: just this one)."""
    if not dist.is_initialized() or dist.get_world_size(pg) == 1:
        return [stats.to_dict()]
    out: list[dict | None] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, stats.to_dict(), group=pg)
    return out  # type: ignore[return-value]
