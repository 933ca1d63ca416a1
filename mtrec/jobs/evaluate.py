"""`mtrec evaluate`: a published checkpoint scored on a day, as served, at world size 1.

The checkpoint may have been written by any number of workers with any sharding plan: DCP
reshards it onto this process's single-rank plan.
"""

from __future__ import annotations

import datetime as dt

from mtrec.config import MtrecConfig
from mtrec.eval.evaluate import evaluate_day
from mtrec.train import checkpoint
from mtrec.train.local import build_sharded


def evaluate_checkpoint(cfg: MtrecConfig, day: dt.date, url: str | None = None) -> tuple[dict[str, float], str, dict]:
    """(metrics, checkpoint URL, manifest): the newest checkpoint before `day` unless `url`."""
    url = url or checkpoint.latest_before(cfg, day)
    dmp, _ = build_sharded(cfg)
    manifest = checkpoint.load(dmp, None, url, cfg, allow_config_change=True)  # scoring: learning rates do not matter
    dmp.eval()
    return evaluate_day(dmp.module.model, cfg.spec, cfg.job.logs, day), url, manifest
