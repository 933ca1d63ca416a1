"""`mtrec bn-check`: a model's BatchNorm statistics against a day as served, and the fix.

model: --model URI (a logged/registered model), --checkpoint URL, or by default the newest
       published checkpoint before --date
check: mtrec.bn.check on the day (eval mode, forward hooks, streamed); prints a per-layer table
--recalibrate: recompute the running statistics on the day (mtrec.bn.recalibrate), check again,
       and (tracking on) record the recalibrated model as a new run and model version: same
       checkpoint (the training state is unchanged), tagged `mtrec.bn_recalibrated_on`; it
       becomes the challenger and goes through the gate like any other version
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mtrec import bn
from mtrec.config import MtrecConfig
from mtrec.errors import ConfigError
from mtrec.serving import ServedModel
from mtrec.train import checkpoint

log = logging.getLogger(__name__)


def _source(
    cfg: MtrecConfig, day: dt.date, model_uri: str | None, url: str | None, recalibrate: bool
) -> tuple[ServedModel, dict]:
    """The model and what it is: {"name", "date", "checkpoint", "version"} (version "" for a
    checkpoint). With `recalibrate`, refuses (before any work) what could not be registered."""
    if model_uri and url:
        raise ConfigError("pass --model or --checkpoint, not both")
    if recalibrate and not cfg.tracking.enabled:
        raise ConfigError(
            "--recalibrate registers the recalibrated model as a new version: it needs `tracking.enabled: true`"
        )
    if model_uri:
        from mtrec.tracking import load_served
        from mtrec.tracking.client import REGISTERED, registered_version

        info = {"name": cfg.name, "date": "", "checkpoint": "", "version": ""}
        if cfg.tracking.enabled:
            v = registered_version(cfg, model_uri)
            if v is not None:
                info = {
                    "name": REGISTERED.fullmatch(model_uri).group(1),
                    "date": v.date.isoformat(),
                    "checkpoint": v.checkpoint,
                    "version": v.version,
                }
        if recalibrate and not info["checkpoint"]:
            raise ConfigError(
                "--recalibrate needs a registered mtrec version (models:/NAME/N or models:/NAME@alias), "
                f"got {model_uri}; pass one, or --checkpoint"
            )
        return load_served(model_uri), info
    url = url or checkpoint.latest_before(cfg, day)
    manifest = checkpoint.read_manifest(url)
    if manifest.get("model") != cfg.name:
        checkpoint.check_compatible(manifest, url, cfg, allow_config_change=True)  # names the mismatch
    return ServedModel.from_checkpoint(url), {
        "name": cfg.name,
        "date": manifest["date"],
        "checkpoint": url,
        "version": "",
    }


@dataclass
class BNCheckResult:
    """What `run_bn_check` found (and, with `recalibrate`, did)."""

    before: bn.BNReport  # the model's statistics as they were
    after: bn.BNReport | None = None  # after recalibration
    version: str | None = None  # the recalibrated model's new version
    source: dict = field(default_factory=dict)  # {"name", "date", "checkpoint", "version"} of the model checked

    @property
    def final(self) -> bn.BNReport:
        return self.after or self.before


def run_bn_check(
    cfg: MtrecConfig, day: dt.date, model_uri: str | None = None, url: str | None = None, recalibrate: bool = False
) -> BNCheckResult:
    """Check (and with `recalibrate`, fix) a model's BN statistics on `day`."""
    served, source = _source(cfg, day, model_uri, url, recalibrate)
    what = model_uri or source["checkpoint"]
    if source["date"] and dt.date.fromisoformat(source["date"]) >= day:
        log.info(f"note: {what} trained on {source['date']}, so {day} is not a day it has not seen")
    logs = cfg.job.logs  # the day under this config's logs, with its limits and batch size
    serving = cfg.job.serving_logs  # the day's candidates instead of its impressions, when set
    before = bn.check(served.model, served.spec, logs, day, cfg.bn, serving)
    log.info(f"{what} on {day}" + (f", against the serving logs under {serving}:" if serving else ":"))
    for line in before.table() if before.layers else []:
        log.info("  " + line)
    log.info(before.summary() + f" ({before.seconds:.1f}s)")
    out = BNCheckResult(before, source=source)
    if not recalibrate:
        return out
    if not before.layers:
        log.info("no BN layers: nothing to recalibrate")
        return out
    rows = bn.recalibrate(served.model, served.spec, logs, day, cfg.bn.batch_rows, serving)
    after = bn.check(served.model, served.spec, logs, day, cfg.bn, serving)
    out.after = after
    log.info(f"recalibrated on {rows:,} rows of {day}{' (serving logs)' if serving else ''}: {after.summary()}")
    out.version = _record(cfg.model_copy(update={"name": source["name"]}), served, source, day, out)
    return out


def _record(cfg: MtrecConfig, served: ServedModel, source: dict, day: dt.date, result: BNCheckResult) -> str:
    """The recalibrated model as a run and a model version (the same checkpoint: only BN buffers differ)."""
    from mtrec.tracking import Tracker, example_rows

    before, after = result.before, result.final
    tracker = Tracker(cfg)
    trained_to = dt.date.fromisoformat(source["date"])
    with tracker.job_run("bn_recalibration", [trained_to], source["checkpoint"]) as run_id:
        tracker.set_tags(
            run_id, {"mtrec.bn_recalibrated_on": day.isoformat(), "mtrec.source_version": source["version"]}
        )
        tracker.log_metrics(run_id, {**{f"before/{k}": v for k, v in before.metrics().items()}, **after.metrics()})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "bn").mkdir()
            (Path(tmp) / "bn" / "check_before.json").write_text(before.to_json())
            (Path(tmp) / "bn" / "check.json").write_text(after.to_json())
            (Path(tmp) / "bn" / "running_stats.json").write_text(json.dumps(bn.capture(served.model)))
            tracker.log_artifacts(run_id, tmp)
        model_uri = tracker.log_served(
            run_id,
            served,
            example_rows(cfg.job.logs, day, served.columns, view=cfg.spec.columns),
            {"mtrec.bn_check": "passed" if after.passed else "failed"},
        )
        version = tracker.register(run_id, model_uri, source["checkpoint"], trained_to)
    tracker.tag_version(version, {"mtrec.bn_recalibrated_on": day.isoformat()})
    chal = tracker.alias("challenger")
    alias = (
        " (alias challenger)"
        if chal is not None and chal.version == version
        else " (the challenger alias stays on a newer day's version)"
    )
    log.info(
        f"registered the recalibrated model as version {version} of {cfg.name}{alias}; "
        f"`mtrec promote --version {version}` judges it on a day after {day}"
    )
    return version
