"""Entry points for schedulers that call Python rather than the `mtrec` command, e.g. Airflow's
PythonOperator on a worker that is itself the Ray driver:

    from pipelines import nightly
    PythonOperator(task_id="mtrec_nightly", python_callable=nightly,
                   op_kwargs={"config": "/etc/mtrec/config.yaml", "date": "{{ ds }}"})

Each is a few lines over `mtrec.jobs`: the jobs own the run protocol (lock, checks, training,
MLflow, publishing, the gate); these load the run spec and resolve the date the way the command
line does. Imports go one way: pipelines -> mtrec.
"""

from __future__ import annotations

import logging
import sys

from mtrec.config import load_config
from mtrec.data.io import parse_date
from mtrec.jobs.nightly import run_nightly
from mtrec.jobs.plan import RunOptions, TrainSummary
from mtrec.jobs.retrain import run_train
from mtrec.log import configure


def _progress() -> None:
    """The jobs' progress lines to stderr, unless the host (Airflow, a notebook) routes the "mtrec" logger itself."""
    if not logging.getLogger("mtrec").handlers and not logging.getLogger().handlers:
        configure(sys.stderr)


def nightly(
    config: str,
    date: str = "yesterday",
    promote: bool = True,
    catch_up: bool = True,
    logs: str | None = None,
    workdir: str | None = None,
) -> list[TrainSummary]:
    """`mtrec nightly --config CONFIG --date DATE [--promote] [--catch-up]`: one incremental day
    (and any missing day before it), then the promotion gate. Raises the jobs' MtrecError
    (its `exit_code` is what the command would exit with; 5: the gate refused, 8: the lock is held)."""
    _progress()
    cfg = load_config(config, logs=logs, workdir=workdir)
    return run_nightly(cfg, parse_date(date, "date", cfg.job.timezone), RunOptions(promote=promote, catch_up=catch_up))


def retrain(
    config: str, start: str, end: str, workers: int | None = None, logs: str | None = None, workdir: str | None = None
) -> TrainSummary:
    """`mtrec train --config CONFIG --from START --to END [--workers N]`: a full retrain."""
    _progress()
    cfg = load_config(config, logs=logs, workdir=workdir)
    cfg = cfg.with_train(num_workers=workers) if workers else cfg
    return run_train(cfg, parse_date(start, "start", cfg.job.timezone), parse_date(end, "end", cfg.job.timezone))


__all__ = ["nightly", "retrain"]
