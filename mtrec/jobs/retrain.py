"""`mtrec train`: a full retrain (cold start) over a date range, on Ray.

The same job as a nightly day (`mtrec.jobs.protocol.run_job`), over every day of the range,
from a fresh model; it publishes the checkpoint dt=<last day>. Like every job it is idempotent:
if that day is already published, nothing is done unless `force`.
"""

from __future__ import annotations

import datetime as dt
import logging

from mtrec.config import MtrecConfig
from mtrec.jobs.cluster import ray_session
from mtrec.jobs.plan import RunOptions, TrainSummary, report
from mtrec.jobs.protocol import (
    already_published,
    check_stores,
    date_range,
    days_with_logs,
    plan_job,
    preflight,
    run_job,
)
from mtrec.lock import model_lock
from mtrec.train import checkpoint

log = logging.getLogger(__name__)


def run_train(cfg: MtrecConfig, start: dt.date, end: dt.date, opts: RunOptions | None = None) -> TrainSummary:
    """Full retrain of `cfg` over days `start`..`end` (inclusive) on Ray, holding the model's lock.

    Raises:
        DataValidationError: a day is missing, empty or fails the contract (before any training;
            the cheap checks before Ray starts).
        MtrecError: a worker failed (named), or the rows trained differ from the rows validated
            (checked on every worker before the checkpoint is staged).
        LockHeld: another job is training this model (`mtrec.lock`).
    """
    opts = opts or RunOptions()
    days = days_with_logs(cfg, date_range(start, end), f"mtrec train {start} .. {end}")
    end = days[-1]  # with gaps allowed, the last day that has logs names the checkpoint
    check_stores(cfg)
    with model_lock(cfg, f"mtrec train {start} .. {end}"):
        if not opts.force and end in checkpoint.published_days(cfg):
            log.info(
                f"{checkpoint.checkpoint_url(cfg, end)} is already published; "
                "nothing to do (--force retrains it and replaces it)"
            )
            summary = already_published(cfg, days, "full_retrain")
        else:
            preflight(cfg, days)
            log.info(f"mtrec train {cfg.name}: full retrain over {start} .. {end} from {cfg.job.logs}")
            plan = plan_job(cfg, days, "full_retrain", None)  # before Ray starts: nothing depends on it
            with ray_session(cfg, opts.address, opts.ray_logs) as info:
                summary = run_job(cfg, plan, opts, info)
        report([summary], opts.summary)
        return summary
