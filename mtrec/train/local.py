"""Single-process training: the same DMP-sharded model and step the Ray workers run, in one
process (world size 1). Used by the model comparison (bench/compare_models.py) and tests."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mtrec.config import MtrecConfig
from mtrec.models import MultiTaskTrain, build_model
from mtrec.train.loop import LoopOptions, train_stream
from mtrec.train.sharding import dense_optimizer, device_for_backend, init_single_process, shard
from mtrec.train.stream import StreamCounts, day_batches

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    dmp: torch.nn.Module  # DistributedModelParallel(MultiTaskTrain(model))
    counts: StreamCounts
    seconds: float
    losses: list[dict[str, float]] = field(default_factory=list)  # per logged step
    optimizer: torch.optim.Optimizer | None = None  # the dense optimizer
    loss_first_tenth: float | None = None  # mean batch loss of the first / last tenth of batches
    loss_last_tenth: float | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The (sharded) MultiTaskModel inside, for scoring."""
        return self.dmp.module.model


def build_sharded(cfg: MtrecConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Seeded model -> MultiTaskTrain -> DMP, and the dense optimizer."""
    init_single_process()
    device, _ = device_for_backend()
    torch.manual_seed(cfg.train.seed)
    dmp, _ = shard(MultiTaskTrain(build_model(cfg.spec, "meta", cfg.score_offsets()), cfg.spec), cfg, device)
    return dmp, dense_optimizer(dmp, cfg)


def train_days(
    cfg: MtrecConfig,
    days: Iterable[dt.date],
    log_every: int = 50,
    dmp: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epochs: int = 1,
) -> TrainResult:
    """`epochs` passes over `days` in order (a fresh seeded model unless `dmp`/`optimizer` are
    given), with the same loop and per-step seeds the Ray workers run (`mtrec.train.loop.train_stream`):
    `train_days(cfg, [d])` takes the same steps as the job that trains day d on one worker, and
    `train_days(cfg, days, epochs=cfg.train.epochs)` those of the full retrain over `days`."""
    days = list(days)
    fresh = dmp is None
    if fresh:
        dmp, optimizer = build_sharded(cfg)
    device, _ = device_for_backend()
    counts = StreamCounts()
    t0 = time.perf_counter()
    key = days[-1].toordinal()
    opts = LoopOptions(
        log_every=log_every,
        on_progress=lambda p: log.info(p.line()),
        rng_key=key,
        base_rate_start=fresh and cfg.train.start_at_base_rate,
    )
    batches = day_batches(
        cfg.spec, cfg.job.logs, days, cfg.train.batch_size, counts, cfg.train.shuffle_plan(key, rank=0), epochs
    )
    stats = train_stream(dmp, optimizer, batches, cfg, device, opts)
    return TrainResult(
        dmp, counts, time.perf_counter() - t0, stats.losses, optimizer, stats.loss_first_tenth, stats.loss_last_tenth
    )
