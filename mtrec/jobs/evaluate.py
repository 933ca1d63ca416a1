"""`mtrec evaluate`: a published checkpoint scored on a day, or on a range of days pooled into one
slice, as served, at world size 1.

The checkpoint may have been written by any number of workers with any sharding plan: DCP
reshards it onto this process's single-rank plan.
"""

from __future__ import annotations

import datetime as dt
import logging

from mtrec.config import MtrecConfig
from mtrec.data.io import list_days
from mtrec.errors import DataValidationError, MtrecError
from mtrec.eval.evaluate import evaluate_days
from mtrec.jobs.protocol import date_range
from mtrec.train import checkpoint
from mtrec.train.local import build_sharded

log = logging.getLogger(__name__)


def logged_days(cfg: MtrecConfig, first: dt.date, last: dt.date) -> list[dt.date]:
    """The days of `first` .. `last` that have logs under `job.logs` (`validate.day_rows`); each day
    of the range without any is skipped with a log line (a gap in the logs is not a reason to score
    nothing).

    Raises:
        DataValidationError: no day of the range has logs.
    """
    from mtrec.data.validate import day_rows

    span = date_range(first, last)
    days = [d for d in span if day_rows(cfg.job.logs, d) > 0]
    if not days:
        have = list_days(cfg.job.logs)
        what, flags = (f"{first}", "--date") if first == last else (f"any day of {first} .. {last}", "--from/--to")
        near = (
            f"days present: {have[0]} .. {have[-1]} ({len(have)})"
            if have
            else f"it holds no {cfg.job.partition} folder"
        )
        raise DataValidationError(f"no logs for {what} under {cfg.job.logs} ({near}); check --logs and {flags}")
    for d in sorted(set(span) - set(days)):
        log.info(f"no logs for {d} under {cfg.job.logs}: skipped")
    return days


def evaluate_checkpoint(
    cfg: MtrecConfig, days: dt.date | list[dt.date], url: str | None = None, address: str | None = None
) -> tuple[dict[str, float], str, dict]:
    """(metrics of `days` pooled, checkpoint URL, manifest): the newest checkpoint before the first
    day unless `url`. `days`: one day, or the days with logs of a range (`logged_days`). With
    `train.num_workers` > 1 the workers score it, sharded (`score_checkpoint`); with one, this
    process does (`address`: the Ray cluster the workers join)."""
    days = [days] if isinstance(days, dt.date) else sorted(days)
    url = url or checkpoint.latest_before(cfg, days[0])
    if cfg.train.num_workers > 1:  # the tables stay sharded over the workers
        metrics, _, manifest = score_checkpoint(cfg, days, url, address)
        return metrics, url, manifest
    dmp, _ = build_sharded(cfg)
    manifest = checkpoint.load(dmp, None, url, cfg, allow_config_change=True)  # scoring: learning rates do not matter
    dmp.eval()
    return evaluate_days(dmp.module.model, cfg.spec, cfg.job.logs, days), url, manifest


def score_checkpoint(
    cfg: MtrecConfig,
    days: list[dt.date],
    url: str,
    address: str | None = None,
    bn_check: bool = False,
    bn_stats: dict | None = None,
) -> tuple[dict, dict, dict]:
    """A checkpoint scored on `days` pooled, as served, by `train.num_workers` Ray Train workers:
    loaded sharded at that world size (DCP reshards it), each worker scoring its share of the rows
    read by Ray Data, the figures merged on rank 0 (`mtrec.eval.sharded`); neither the tables nor
    the rows pass through this process. Returns (metrics, the figures `next_day_figures` makes:
    rows, BN report with `bn_check` (on the last day: its serving logs when `job.serving_logs`
    holds them, its impressions otherwise), calibration plot, ...; the checkpoint's manifest).
    `bn_stats`: a recalibrated version's BN statistics over the checkpoint's (`version_bn_stats`).

    Raises:
        DataValidationError: a day lacks a column (footers).
        MtrecError: a worker failed (named), or the figures could not be made (one line).
    """
    from mtrec.data.validate import check_day
    from mtrec.jobs.cluster import ray_session
    from mtrec.jobs.protocol import good_rows_dataset, run_scoring, serving_files
    from mtrec.train.worker import RunCollector, ScoreJob, score_loop_per_worker

    days = sorted(days)
    manifest = checkpoint.read_manifest(url)
    files, file_days = [], []
    for i, d in enumerate(days):
        fs = check_day(cfg.spec, cfg.job.logs, d)
        files += fs
        file_days += [i] * len(fs)
    serving = serving_files(cfg, days[-1]) if bn_check else []
    with ray_session(cfg, address):
        collector = RunCollector.remote()
        job = ScoreJob(
            cfg=cfg.model_dump(mode="json"),
            checkpoint=url,
            day=manifest.get("date") or "",
            eval_days=tuple(d.isoformat() for d in days),
            file_days=tuple(file_days),
            bn_serving=bool(serving),
            bn_check=bn_check,
            bn_stats=bn_stats,
            collector=collector,
        )
        datasets = {"eval": good_rows_dataset(cfg, files)}
        if serving:
            datasets["bn"] = good_rows_dataset(cfg, serving, serving=True)
        result = run_scoring(cfg, score_loop_per_worker, job, datasets, f"{cfg.name}-score-{days[0]}-{days[-1]}")
    figures = result["evaluation"]
    if figures.get("error"):
        raise MtrecError(f"scoring {url} on {figures['day']} failed on the workers: {figures['error']}")
    return figures["metrics"], figures, manifest
