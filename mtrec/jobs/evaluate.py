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
from mtrec.errors import DataValidationError
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
    cfg: MtrecConfig, days: dt.date | list[dt.date], url: str | None = None
) -> tuple[dict[str, float], str, dict]:
    """(metrics of `days` pooled, checkpoint URL, manifest): the newest checkpoint before the first
    day unless `url`. `days`: one day, or the days with logs of a range (`logged_days`)."""
    days = [days] if isinstance(days, dt.date) else sorted(days)
    url = url or checkpoint.latest_before(cfg, days[0])
    dmp, _ = build_sharded(cfg)
    manifest = checkpoint.load(dmp, None, url, cfg, allow_config_change=True)  # scoring: learning rates do not matter
    dmp.eval()
    return evaluate_days(dmp.module.model, cfg.spec, cfg.job.logs, days), url, manifest
