"""What a job records in its run about a trained checkpoint: params, the evaluation on the day
after its data, plots, the BN statistics check, artifacts and the served model.

    params     flattened config, world size, sharding plan
    metrics    `eval/<task>/<metric>` on the day after the last trained day (when its logs exist),
               `bn/...` (models with BatchNorm), `position_bias/<p>`
    artifacts  config.json, manifest.json, validation/dt=D.json, plots/ (calibration, position
               bias, metric trend, BN drift), bn/ (running statistics, the check)
    model      the served model (pyfunc, `Tracker.log_model`), its URI as tag `mtrec.model_uri`;
               none above `tracking.max_pyfunc_mb` (`served_size`: tags `mtrec.served_model`,
               `mtrec.served_model_mb`, `mtrec.max_pyfunc_mb`)

The figures of the next day come from the Ray Train workers (`mtrec.eval.sharded`), and the served
model is built and logged by a Ray task beside the driver (`start_served`): recording a job never
loads the embedding tables into the driver.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mtrec.config import MtrecConfig
from mtrec.data.io import list_day_files
from mtrec.errors import MtrecError
from mtrec.serving import ServedModel
from mtrec.spec import ModelSpec
from mtrec.tracking.client import Tracker, flatten
from mtrec.tracking.pyfunc import LIMIT_TAG, SERVED_TAG, SIZE_TAG

log = logging.getLogger(__name__)


def example_rows(logs: str, day: dt.date, columns: list[str], n: int = 5, view=None):
    """The first `n` rows of a day's logs under `logs`, feature columns only, as the contract
    names them (`view`: the spec's `columns`): the model's input example."""
    from mtrec.data.validate import iter_file_batches

    for f in list_day_files(logs, day):
        for rb in iter_file_batches(f, columns=columns, batch_rows=n, view=view):
            return rb.select(columns).slice(0, n).to_pandas()
    raise MtrecError(f"no rows under {logs} for {day} to make the model's input example")


def record_job(
    tracker: Tracker,
    run_id: str,
    cfg: MtrecConfig,
    staged: str,
    manifest: dict,
    summary,
    reports: list,
    workers: dict | None = None,
) -> dict:
    """Everything a run holds about a trained (staged, not yet published) checkpoint: params,
    evaluation on the day after the last trained day (when its logs exist), artifacts, plots, the
    served model. The evaluation, the BN check and the BN layers' running statistics come from the
    workers (`workers`: rank 0's result, `mtrec.train.worker`: `evaluation`, `bn_running`,
    `example`; and `served`, the `start_served` task when the driver started it already), which
    scored the day with the sharded model; the driver never loads the tables. Returns
    {"model_uri", "eval_day", "metrics", "gate", "bn"}.

    Raises:
        MtrecError: the workers could not make the evaluation's figures (one line), or MLflow failed.
    """
    from mtrec.eval import plots
    from mtrec.train import checkpoint

    t0 = time.perf_counter()
    workers = workers or {}
    params = flatten(cfg.redacted())
    params["world_size"] = str(summary.world_size)
    params.update({f"plan.{t}": v["sharding_type"] for t, v in summary.plan.items()})
    tracker.log_params(run_id, params)

    last = dt.date.fromisoformat(summary.days[-1])
    evaluation = workers.get("evaluation")
    if evaluation is not None and evaluation.get("error"):
        raise MtrecError(f"evaluating on {evaluation['day']} failed on the workers: {evaluation['error']}")
    eval_day = dt.date.fromisoformat(evaluation["day"]) if evaluation else last + dt.timedelta(days=1)
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "config.json").write_text(json.dumps(cfg.redacted(), indent=2))
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        for r in reports:
            (out / "validation").mkdir(exist_ok=True)
            (out / "validation" / f"dt={r.date}.json").write_text(r.to_json())
        (out / "plots").mkdir()
        if evaluation is not None and evaluation["rows"]:
            metrics = evaluation["metrics"]
            tracker.log_metrics(run_id, {f"eval/{k}": v for k, v in metrics.items()})
            if evaluation.get("calibration_png"):
                (out / "plots" / "calibration.png").write_bytes(evaluation["calibration_png"])
            log.info(
                "evaluated on %s (%s rows, on the workers in %.1fs): %s",
                eval_day,
                f"{evaluation['rows']:,}",
                evaluation.get("seconds", 0.0),
                ", ".join(f"{m} {metrics[m]:.4f}" for m in cfg.gate_metrics() if m in metrics),
            )
        elif evaluation is not None:
            log.warning("not evaluated on %s: none of its rows passed the data contract", eval_day)
        bn_result = record_bn(tracker, run_id, workers.get("bn_running") or {}, evaluation, out)
        curve = plots.position_bias(
            cfg.spec, checkpoint.read_full(staged, prefix=plots.SHALLOW_TOWER), out / "plots" / "position_bias.png"
        )
        if curve:
            tracker.log_metrics(run_id, {f"position_bias/{p}": v for p, v in enumerate(curve)})
        history = day_trend(tracker, cfg.gate_metrics())
        if history:
            plots.trend(
                history, out / "plots" / "metric_trend.png", title=f"{cfg.name}: next-day metrics per trained day"
            )
        tracker.log_artifacts(run_id, tmp)
    size = served_size(cfg)
    if size.pyfunc:
        served = workers.get("served") or start_served(tracker, run_id, cfg, staged, workers.get("example"))
        model_uri = finish_served(served, run_id)
    else:  # no task (`start_served` said why); `register` reads the tags below: a version without a pyfunc
        model_uri = ""
    tracker.set_tags(
        run_id,
        {
            "mtrec.model_uri": model_uri,
            "mtrec.eval_day": eval_day.isoformat() if metrics else "",
            "mtrec.bn_check": bn_result,
            **size.tags(),
        },
    )
    log.info("recorded run %s in %s (%.1fs)", run_id, tracker.uri, time.perf_counter() - t0)
    return {
        "model_uri": model_uri,
        "eval_day": eval_day.isoformat() if metrics else None,
        "metrics": metrics,
        "gate": cfg.gate_metrics(),
        "bn": bn_result,
    }


def input_columns(cfg: MtrecConfig) -> list[str]:
    """The columns the served model of `cfg` reads (`ServedModel.columns`), without building it."""
    return cfg.spec.serving().input_columns()


def record_bn(tracker: Tracker, run_id: str, running: dict, evaluation: dict | None, out: Path) -> str:
    """A model with BatchNorm (`running`: its served layers' running statistics, `bn.capture`):
    those statistics as an artifact and, when the workers checked them against the day after
    (`evaluation["bn"]`, a `BNReport`), the check (metrics `bn/...`, `bn/check.json`,
    `plots/bn_drift.png`). Returns "passed", "failed", "not run" (no day) or "no BN layers"."""
    from mtrec import bn

    if not running:
        return "no BN layers"
    (out / "bn").mkdir(exist_ok=True)
    (out / "bn" / "running_stats.json").write_text(json.dumps(running))
    report = (evaluation or {}).get("bn")
    if report is None or not (evaluation or {}).get("metrics"):
        return "not run"
    tracker.log_metrics(run_id, report.metrics())
    (out / "bn" / "check.json").write_text(report.to_json())
    bn.drift_plot(report, out / "plots" / "bn_drift.png")
    log.info("%s (%.1fs)", report.summary(), report.seconds)
    return "passed" if report.passed else "failed"


def _served_task(cfg_json: dict, uri: str, staged: str, run_id: str, call: dict) -> str:
    """Ray task body of `start_served`: in the driver's folder and environment, the served model
    built from the staged checkpoint's model tensors and logged under the run; its model URI."""
    import os

    from mtrec import bn
    from mtrec.data.io import apply_storage_options
    from mtrec.train import checkpoint

    os.environ.update(call["env"])
    if os.path.isdir(call["cwd"]):
        os.chdir(call["cwd"])  # a relative sqlite or artifact path means what it means to the driver
    cfg = MtrecConfig.model_validate(cfg_json)
    apply_storage_options(cfg.job.storage_options)
    tracker = Tracker(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})}))
    served = ServedModel.from_state(cfg.spec, checkpoint.read_full(staged, prefix=MODEL_PREFIX), cfg.score_offsets())
    bn.apply(served.model, call.get("bn_stats"))  # a recalibrated version's statistics over the checkpoint's
    return tracker.log_model(run_id, served, call["example"])


MODEL_PREFIX = "model.model."  # the model's tensors in a checkpoint (not the optimizers')
# what reaches MLflow and the stores: credentials, endpoints, proxies and CA bundles
_FORWARDED = (
    "MLFLOW_",
    "AWS_",
    "GOOGLE_",
    "AZURE_",
    "OSS_",
    "DATABRICKS_",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
)


def start_served(tracker: Tracker, run_id: str, cfg: MtrecConfig, staged: str, head, bn_stats: dict | None = None):
    """Start logging the served model under the run: a Ray task on this node, in a process of its
    own that exits after it (`max_calls=1`), reads the staged checkpoint's model tensors (not the
    optimizers'), builds the served model and logs it, so the driver never holds the embedding
    tables, whatever their size. `head`: the first rows read (an Arrow table), the model's input
    example. `bn_stats`: BN statistics over the checkpoint's (a recalibration's, `bn.capture`'s
    form). Runs in the job's Ray session; returns the task's ObjectRef (`finish_served`). Above
    `tracking.max_pyfunc_mb` (`served_size`) it starts no task: it tags the run with that decision
    (`ServedSize.tags`, which `Tracker.register` reads to register the version without a pyfunc)
    and returns None, for which `finish_served` gives an empty model URI.

    Raises:
        TrackingError: MLflow unreachable while tagging the run (above the limit only).
    """
    import os

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not pyfunc_fits(tracker, run_id, served_size(cfg)):
        return None
    example = head.select(input_columns(cfg)).to_pandas() if head is not None else None
    call = {
        "env": {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED)},
        "cwd": os.getcwd(),
        "example": example,
        "bn_stats": bn_stats,
    }
    task = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(_served_task)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return task.options(scheduling_strategy=here).remote(cfg.model_dump(mode="json"), tracker.uri, staged, run_id, call)


MIB = 2**20  # tracking.max_pyfunc_mb counts MiB


def served_bytes(spec: ModelSpec) -> int:
    """Bytes of the served model's tensors (what `ServedModel.save` writes: every parameter and
    buffer of the model without its shallow tower, embedding tables included), exact and without
    allocating a table: the model is built from the spec with its tables on the meta device
    (shapes and dtypes, no storage; the dense layers are built on CPU, they are small)."""
    from mtrec.models import build_model

    state = build_model(spec.serving(), "meta").state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass(frozen=True)
class ServedSize:
    """The served model's size against `tracking.max_pyfunc_mb` (MiB; None: no limit)."""

    mb: float
    limit: float | None

    @property
    def pyfunc(self) -> bool:
        """Whether the job logs the served model as a pyfunc (at or below the limit)."""
        return self.limit is None or self.mb <= self.limit

    def tags(self) -> dict[str, str]:
        """The run's (and, without a pyfunc, the version's) tags saying what was decided."""
        return {
            SERVED_TAG: "pyfunc" if self.pyfunc else "none",
            SIZE_TAG: f"{self.mb:.4f}",
            LIMIT_TAG: "" if self.limit is None else f"{self.limit:g}",
        }

    def reason(self) -> str:
        return f"its tensors ({self.mb:,.1f} MiB) are above tracking.max_pyfunc_mb ({self.limit:,g})"


def served_size(cfg: MtrecConfig) -> ServedSize:
    """The served model of `cfg` against its `tracking.max_pyfunc_mb` (`served_bytes`)."""
    return ServedSize(served_bytes(cfg.spec) / MIB, cfg.tracking.max_pyfunc_mb)


def pyfunc_fits(tracker: Tracker, run_id: str, size: ServedSize) -> bool:
    """Whether the run logs its served model as a pyfunc; when not (above the limit), says why
    and tags the run with the decision (`Tracker.register` reads it: a version without one).

    Raises:
        TrackingError: MLflow unreachable while tagging the run.
    """
    if size.pyfunc:
        return True
    log.info("no pyfunc for run %s: %s; score this model with --workers N", run_id, size.reason())
    tracker.set_tags(run_id, size.tags())
    return False


def finish_served(ref, run_id: str) -> str:
    """The model URI the `start_served` task logged; "" when it started none (`ref` None: above
    `tracking.max_pyfunc_mb`).

    Raises:
        MtrecError: the task's own error (MLflow unreachable: TrackingError), or one line naming
            how the task failed.
    """
    import ray

    from mtrec.errors import TrackingError, first_line

    if ref is None:
        return ""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, MtrecError):
            raise cause from None
        raise TrackingError(
            f"logging the served model of run {run_id} failed: {first_line(cause or e, typed=True)}"
        ) from None
    except ray.exceptions.RayError as e:
        raise TrackingError(
            f"logging the served model of run {run_id} failed: its Ray task died ({first_line(e, typed=True)}); "
            "see the Ray logs"
        ) from None


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
