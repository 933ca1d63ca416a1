"""`mtrec train`: a full retrain (cold start) over a date range, on Ray.

The same job as a nightly day (`mtrec.jobs.protocol.run_job`), over every day of the range,
from a fresh model; it publishes the checkpoint dt=<last day>. Like every job it is idempotent:
if that day is already published, nothing is done unless `force`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from mtrec.config import MtrecConfig
from mtrec.jobs.cluster import ray_session
from mtrec.jobs.protocol import TrainSummary, date_range, ensure_registered, run_job
from mtrec.lock import model_lock
from mtrec.train import checkpoint


def run_train(
    cfg: MtrecConfig,
    start: dt.date,
    end: dt.date,
    address: str | None = None,
    say: Callable[[str], None] = print,
    log_every: int = 50,
    ray_logs: bool = False,
    force: bool = False,
) -> TrainSummary:
    """Full retrain of `cfg` over days `start`..`end` (inclusive) on Ray.

    Raises:
        DataValidationError: a day fails the contract (before any training).
        MtrecError: a worker failed (named), or the rows trained differ from the rows validated
            (checked on every worker before the checkpoint is staged).
        LockHeld: another job is training this model (`mtrec.lock`).
    """
    with model_lock(cfg, f"mtrec train {start} .. {end}"):
        return _train(cfg, start, end, address, say, log_every, ray_logs, force)


def _train(cfg: MtrecConfig, start: dt.date, end: dt.date, address: str | None, say: Callable[[str], None], log_every: int,
           ray_logs: bool, force: bool) -> TrainSummary:
    days = date_range(start, end)
    url = checkpoint.checkpoint_url(cfg, end)
    if not force and end in checkpoint.published_days(cfg):
        say(f"{url} is already published; nothing to do (--force retrains it and replaces it)")
        version = ensure_registered(cfg, url, say)
        return TrainSummary(model=cfg.name, days=[d.isoformat() for d in days], world_size=cfg.train.num_workers, skipped=True, checkpoint=url,
                            mlflow={"version": version} if version else {})
    with ray_session(cfg, address, say, ray_logs) as info:
        return run_job(cfg, days, "full_retrain", None, say=say, log_every=log_every, ray_info=info)
