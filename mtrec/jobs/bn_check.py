"""`mtrec bn-check`: a model's BatchNorm statistics against a day as served, and the fix.

model: --model URI (a logged/registered model), --checkpoint URL, or by default the newest
       published checkpoint before --date
check: mtrec.bn.check on the day (eval mode, forward hooks, streamed); prints a per-layer table
--recalibrate: recompute the running statistics on the day (mtrec.bn.settle: each layer's input
       statistics as served, layer by layer), check again, and (tracking on) record the
       recalibrated model as a new run and model version: same checkpoint (the training state is
       unchanged), its new statistics as the run's bn/running_stats.json, tagged
       `mtrec.bn_recalibrated_on`; it becomes the challenger and goes through the gate like any
       other version
--workers N (or train.num_workers > 1): the same on N Ray Train workers, the checkpoint loaded
       sharded and the moments summed across ranks; the recalibrated model's pyfunc is built by a
       Ray task from the checkpoint and the new statistics. Workers that score a recalibrated
       version (the gate, `mtrec predict --workers`) apply its statistics over the checkpoint's.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtrec import bn
from mtrec.config import MtrecConfig
from mtrec.data.io import list_day_files
from mtrec.errors import ConfigError, DataValidationError
from mtrec.serving import ServedModel
from mtrec.train import checkpoint

log = logging.getLogger(__name__)


def _describe(
    cfg: MtrecConfig, day: dt.date, model_uri: str | None, url: str | None, recalibrate: bool
) -> tuple[dict, object]:
    """What the model is, without loading it: ({"name", "date", "checkpoint", "version"} (version
    "" for a checkpoint, checkpoint "" for a model URI that is not an mtrec version), its
    VersionInfo or None). With `recalibrate`, refuses (before any work) what could not be
    registered."""
    if model_uri and url:
        raise ConfigError("pass --model or --checkpoint, not both")
    if recalibrate and not cfg.tracking.enabled:
        raise ConfigError(
            "--recalibrate registers the recalibrated model as a new version: it needs `tracking.enabled: true`"
        )
    if model_uri:
        from mtrec.tracking.client import REGISTERED, registered_version

        info, v = {"name": cfg.name, "date": "", "checkpoint": "", "version": ""}, None
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
        return info, v
    url = url or checkpoint.latest_before(cfg, day)
    manifest = checkpoint.read_manifest(url)
    if manifest.get("model") != cfg.name:
        checkpoint.check_compatible(manifest, url, cfg, allow_config_change=True)  # names the mismatch
    return {"name": cfg.name, "date": manifest["date"], "checkpoint": url, "version": ""}, None


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
    cfg: MtrecConfig,
    day: dt.date,
    model_uri: str | None = None,
    url: str | None = None,
    recalibrate: bool = False,
    address: str | None = None,
) -> BNCheckResult:
    """Check (and with `recalibrate`, fix) a model's BN statistics on `day`: with
    `train.num_workers` > 1, or for a version registered without a pyfunc, on `train.num_workers`
    Ray Train workers (the Ray cluster at `address`), the checkpoint loaded sharded
    (`_on_workers`); else the served model in this process."""
    source, v = _describe(cfg, day, model_uri, url, recalibrate)
    what = model_uri or source["checkpoint"]
    if source["date"] and dt.date.fromisoformat(source["date"]) >= day:
        log.info(f"note: {what} trained on {source['date']}, so {day} is not a day it has not seen")
    from mtrec.tracking.pyfunc import without_pyfunc

    if cfg.train.num_workers > 1 or (v is not None and without_pyfunc(v.tags)):  # no pyfunc: on workers
        return _on_workers(cfg, day, source, v, (what, recalibrate, address))
    if model_uri:
        from mtrec.tracking import load_served

        served = load_served(model_uri)
    else:
        served = ServedModel.from_checkpoint(source["checkpoint"])
    logs = cfg.job.logs  # the day under this config's logs, with its limits and batch size
    serving = cfg.job.serving_logs  # the day's candidates instead of its impressions, when set
    before = bn.check(served.model, served.spec, logs, day, cfg.bn, serving)
    _log_report(before, what, day, serving)
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

    def log_model(tracker, run_id: str) -> str:
        from mtrec.tracking import example_rows
        from mtrec.tracking.record import MIB, ServedSize, pyfunc_fits, served_bytes

        if not pyfunc_fits(tracker, run_id, ServedSize(served_bytes(served.spec) / MIB, cfg.tracking.max_pyfunc_mb)):
            return ""  # above tracking.max_pyfunc_mb: the version is registered without one
        return tracker.log_model(run_id, served, example_rows(logs, day, served.columns, view=cfg.spec.columns))

    rcfg = cfg.model_copy(update={"name": source["name"]})
    out.version = _record(rcfg, source, day, out, bn.capture(served.model), log_model)
    return out


def _log_report(report: bn.BNReport, what: str, day: dt.date, serving: str | None) -> None:
    log.info(f"{what} on {day}" + (f", against the serving logs under {serving}:" if serving else ":"))
    for line in report.table() if report.layers else []:
        log.info("  " + line)
    log.info(report.summary() + f" ({report.seconds:.1f}s)")


def _on_workers(cfg: MtrecConfig, day: dt.date, source: dict, v, run: tuple) -> BNCheckResult:
    """`run_bn_check` on `train.num_workers` Ray Train workers: the checkpoint loaded sharded
    (with a recalibrated version's own statistics over it), the day read by Ray Data, each BN
    layer's input moments summed across ranks (`bn_loop_per_worker`); with recalibration, the
    recalibrated version's served model is built and logged by a Ray task from the checkpoint and
    the new statistics (`start_served`). Neither the tables nor the rows pass through this
    process. `run`: (what the model is called, recalibrate, the Ray address)."""
    from mtrec.data.validate import check_day
    from mtrec.jobs.cluster import ray_session
    from mtrec.jobs.protocol import good_rows_dataset, run_scoring
    from mtrec.models import build_model
    from mtrec.tracking.gate import version_bn_stats, version_config
    from mtrec.train.stream import check_serving_files
    from mtrec.train.worker import BNJob, RunCollector, bn_loop_per_worker

    what, recalibrate, address = run
    url = source["checkpoint"]
    if not url:
        raise ConfigError(
            f"on workers the check loads a checkpoint: pass a registered mtrec version (models:/NAME/N, "
            f"models:/NAME@alias) or --checkpoint, not {what}; or check it in this process with --workers 1"
        )
    vcfg = version_config(cfg, url)
    if vcfg is None:
        raise ConfigError(
            f"{url}'s manifest does not say its sampling offsets, so workers cannot build its model; check it in "
            "this process with --workers 1"
        )
    serving = cfg.job.serving_logs
    population = "serving logs" if serving else "impressions"
    if not bn.served_bn_names(build_model(vcfg.spec, "meta", vcfg.score_offsets())):
        log.info(f"{what} has no BN layers: nothing to check" + (" or recalibrate" if recalibrate else ""))
        return BNCheckResult(bn.BNReport(day.isoformat(), 0, [], cfg.bn.model_dump(), 0.0, population), source=source)
    if serving:
        if not bn.has_serving_logs(serving, day):
            raise DataValidationError(f"no serving logs for {day} under {serving}; pass a day they hold")
        files = check_serving_files(vcfg.spec, list_day_files(serving, day))
    else:
        files = check_day(vcfg.spec, cfg.job.logs, day)
    t0 = time.perf_counter()
    with ray_session(cfg, address):
        collector = RunCollector.remote()
        job = BNJob(
            cfg=vcfg.model_dump(mode="json"),
            checkpoint=url,
            where=f"{day} under {serving or cfg.job.logs}",
            recalibrate=recalibrate,
            bn_stats=version_bn_stats(cfg.model_copy(update={"name": source["name"]}), v) if v else None,
            collector=collector,
        )
        datasets = {"bn": good_rows_dataset(vcfg, files, serving=bool(serving))}
        result = run_scoring(vcfg, bn_loop_per_worker, job, datasets, f"{cfg.name}-bn-check-{day}")
        seconds = time.perf_counter() - t0

        def report(running_ref: tuple) -> bn.BNReport:
            rep = bn.compare(*running_ref, cfg.bn, day.isoformat(), result["rows"])
            rep.seconds, rep.population = seconds, population
            return rep

        if not result["rows"]:
            raise bn.no_good_rows(
                day, f"the serving logs under {serving}" if serving else f"the logs under {cfg.job.logs}"
            )
        out = BNCheckResult(report(result["before"]), source=source)
        _log_report(out.before, what, day, serving)
        if not recalibrate:
            return out
        out.after = report(result["after"])
        log.info(
            f"recalibrated on {result['rows']:,} rows of {day}{' (serving logs)' if serving else ''} in "
            f"{result['passes']} passes on {cfg.train.num_workers} workers: {out.after.summary()}"
        )

        def log_model(tracker, run_id: str) -> str:
            from mtrec.tracking.record import finish_served, start_served

            ref = start_served(tracker, run_id, vcfg, url, result["head"], bn_stats=result["captured"])
            return finish_served(ref, run_id)

        rcfg = cfg.model_copy(update={"name": source["name"]})
        out.version = _record(rcfg, source, day, out, result["captured"], log_model)
    return out


def _record(cfg: MtrecConfig, source: dict, day: dt.date, result: BNCheckResult, captured: dict, log_model) -> str:
    """The recalibrated model as a run and a model version (the same checkpoint: only BN buffers
    differ): the reports, the new statistics (`captured`, `bn.capture`'s form: what the version's
    workers apply over the checkpoint), and its served model, logged by `log_model(tracker,
    run_id)` (returns the model URI)."""
    from mtrec.tracking import Tracker

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
            (Path(tmp) / "bn" / "running_stats.json").write_text(json.dumps(captured))
            tracker.log_artifacts(run_id, tmp)
        model_uri = log_model(tracker, run_id)
        checked = "passed" if after.passed else "failed"
        # the model URI: `ensure_registered` completes a lost registration from it
        tracker.set_tags(run_id, {"mtrec.model_uri": model_uri, "mtrec.bn_check": checked})
        # created with the tag: workers that score the version read it to apply its statistics
        recalibrated = {"mtrec.bn_recalibrated_on": day.isoformat()}
        version = tracker.register(run_id, model_uri, source["checkpoint"], trained_to, recalibrated)
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
