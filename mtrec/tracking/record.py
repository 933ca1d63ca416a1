"""What a job records in its run about a trained checkpoint: params, the evaluation on the day
after its data, plots, the BN statistics check, artifacts and the served model.

    params     flattened config, world size, sharding plan
    metrics    `eval/<task>/<metric>` on the day after the last trained day (when its logs exist),
               `bn/...` (models with BatchNorm), `position_bias/<p>`
    artifacts  config.json, manifest.json, validation/dt=D.json, plots/ (calibration, position
               bias, metric trend, BN drift), bn/ (running statistics, the check)
    model      the served model (pyfunc, `Tracker.log_served`), its URI as tag `mtrec.model_uri`
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import time
from pathlib import Path

from mtrec.config import MtrecConfig
from mtrec.data.io import list_day_files
from mtrec.errors import ConfigError, MtrecError
from mtrec.serving import ServedModel
from mtrec.tracking.client import Tracker, flatten

log = logging.getLogger(__name__)


def example_rows(logs: str, day: dt.date, columns: list[str], n: int = 5, view=None):
    """The first `n` rows of a day's logs under `logs`, feature columns only, as the contract
    names them (`view`: the spec's `columns`): the model's input example."""
    from mtrec.data.validate import iter_file_batches

    for f in list_day_files(logs, day):
        for rb in iter_file_batches(f, columns=columns, batch_rows=n, view=view):
            return rb.select(columns).slice(0, n).to_pandas()
    raise MtrecError(f"no rows under {logs} for {day} to make the model's input example")


def _has_rows(cfg: MtrecConfig, day: dt.date) -> bool:
    """Whether the day after a job has logs to evaluate on; an unreadable one is said, not fatal:
    the job's own days trained fine."""
    from mtrec.data.validate import day_rows
    from mtrec.errors import DataValidationError

    try:
        return day_rows(cfg.job.logs, day) > 0
    except DataValidationError as e:
        log.warning(f"not evaluated on {day}: {e}")
        return False


def record_job(
    tracker: Tracker, run_id: str, cfg: MtrecConfig, staged: str, manifest: dict, summary, reports: list
) -> dict:
    """Everything a run holds about a trained (staged, not yet published) checkpoint: params,
    evaluation on the day after the last trained day (when its logs exist), artifacts, plots, the
    served model. Returns {"model_uri", "eval_day", "metrics"}."""
    from mtrec.eval import plots
    from mtrec.eval.evaluate import predict_day, read_truth, report
    from mtrec.train import checkpoint

    t0 = time.perf_counter()
    params = flatten(cfg.redacted())
    params["world_size"] = str(summary.world_size)
    params.update({f"plan.{t}": v["sharding_type"] for t, v in summary.plan.items()})
    tracker.log_params(run_id, params)

    full = checkpoint.read_full(staged)
    served = ServedModel.from_state(cfg.spec, full, cfg.score_offsets())
    last = dt.date.fromisoformat(summary.days[-1])
    eval_day = last + dt.timedelta(days=1)
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "config.json").write_text(json.dumps(cfg.redacted(), indent=2))
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        for r in reports:
            (out / "validation").mkdir(exist_ok=True)
            (out / "validation" / f"dt={r.date}.json").write_text(r.to_json())
        (out / "plots").mkdir()
        if _has_rows(cfg, eval_day):
            pred = predict_day(served.model, served.spec, cfg.job.logs, eval_day)
            metrics = report(served.spec, pred, read_truth(cfg.job.logs, eval_day))
            tracker.log_metrics(run_id, {f"eval/{k}": v for k, v in metrics.items()})
            plots.calibration(
                served.spec,
                pred,
                out / "plots" / "calibration.png",
                title=f"{cfg.name}: trained to {last}, scored on {eval_day}",
            )
            log.info(
                "evaluated on %s: %s",
                eval_day,
                ", ".join(f"{m} {metrics[m]:.4f}" for m in cfg.gate_metrics() if m in metrics),
            )
        else:
            log.info(
                "no logs for %s yet: the run has no evaluation metrics (the promotion gate evaluates once they land)",
                eval_day,
            )
        bn_result = record_bn(tracker, run_id, served, cfg, eval_day if metrics else None, out)
        curve = plots.position_bias(cfg.spec, full, out / "plots" / "position_bias.png")
        if curve:
            tracker.log_metrics(run_id, {f"position_bias/{p}": v for p, v in enumerate(curve)})
        history = day_trend(tracker, cfg.gate_metrics())
        if history:
            plots.trend(
                history, out / "plots" / "metric_trend.png", title=f"{cfg.name}: next-day metrics per trained day"
            )
        tracker.log_artifacts(run_id, tmp)
    example = example_rows(cfg.job.logs, eval_day if metrics else last, served.columns, view=cfg.spec.columns)
    model_uri = tracker.log_served(
        run_id,
        served,
        example,
        {"mtrec.eval_day": eval_day.isoformat() if metrics else "", "mtrec.bn_check": bn_result},
    )
    log.info("recorded run %s in %s (%.1fs)", run_id, tracker.uri, time.perf_counter() - t0)
    return {
        "model_uri": model_uri,
        "eval_day": eval_day.isoformat() if metrics else None,
        "metrics": metrics,
        "gate": cfg.gate_metrics(),
        "bn": bn_result,
    }


def record_bn(
    tracker: Tracker, run_id: str, served: ServedModel, cfg: MtrecConfig, day: dt.date | None, out: Path
) -> str:
    """A model with BatchNorm: its running statistics as an artifact and, when `day` has logs, the
    consistency check against it (metrics `bn/...`, `bn/check.json`, `plots/bn_drift.png`).
    Returns "passed", "failed", "not run" (no day) or "no BN layers"."""
    from mtrec import bn

    if not bn.bn_layers(served.model):
        return "no BN layers"
    (out / "bn").mkdir(exist_ok=True)
    (out / "bn" / "running_stats.json").write_text(json.dumps(bn.capture(served.model)))
    if day is None:
        return "not run"
    # the serving population when serving logs hold the day (the next day's candidates may not be
    # logged yet when the job ends), its impressions otherwise; the report says which
    try:
        serving = cfg.job.serving_logs if bn.has_serving_logs(cfg.job.serving_logs, day) else None
    except ConfigError as e:  # the model is published already: say so, check against the impressions
        log.warning("%s; the job's BN check uses the impressions of %s", e, day)
        serving = None
    report = bn.check(served.model, served.spec, cfg.job.logs, day, cfg.bn, serving)
    tracker.log_metrics(run_id, report.metrics())
    (out / "bn" / "check.json").write_text(report.to_json())
    bn.drift_plot(report, out / "plots" / "bn_drift.png")
    log.info("%s (%.1fs)", report.summary(), report.seconds)
    return "passed" if report.passed else "failed"


def day_trend(tracker: Tracker, metrics: list[str]) -> dict[str, list[tuple[str, float]]]:
    """Per metric, (trained-through date, next-day value) of the experiment's finished and current
    runs, oldest first (one point per date: the newest run)."""
    runs = tracker.call(
        "searching runs",
        tracker.client.search_runs,
        [tracker.experiment_id()],
        "tags.`mtrec.date` != ''",
        max_results=1000,
        order_by=["attributes.start_time DESC"],
    )
    runs = list(reversed(runs))  # the newest 1000, oldest first
    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for r in runs:
        if r.info.status == "FAILED":
            continue
        for m in metrics:
            v = r.data.metrics.get(f"eval/{m}")
            if v is not None:
                out[m][r.data.tags["mtrec.date"]] = v
    return {m: sorted(v.items()) for m, v in out.items() if v}
