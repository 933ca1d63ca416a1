"""MLflow: every job a run, every published day a model version, a promotion gate that can say no.

    experiment  = model name (`cfg.name`); one run per job (full retrain, nightly day)
    run         = params (flattened config, world size, sharding plan), tags (`mtrec.*`: date, kind,
                  parent checkpoint and run, checkpoint URL, version), per-step training metrics
                  (`train/loss`, `train/loss/<task>`, `train/rows_per_s`), evaluation metrics on
                  the day after the last trained day (`eval/<task>/<metric>`), artifacts (config,
                  manifest, validation reports, plots) and the served model (pyfunc)
    registered model = model name; one version per published day, tagged with its date and
                  checkpoint; aliases `challenger` (newest) and `champion` (serving)

The order a job follows, so that the registry never points at a missing checkpoint and no
checkpoint is published without its run:

    start run (fails before training when MLflow is down) -> train -> stage checkpoint
    -> record (eval metrics, artifacts, model)  -- fails: staged checkpoint discarded, nothing published
    -> publish checkpoint
    -> register version + alias challenger      -- fails: the rerun of the same command registers it
    -> end run FINISHED

Only the job's driver talks to MLflow (the Ray workers report to it through the run collector),
so a tracking store on the driver's disk works on any cluster. Every call goes through
`Tracker.call`: transient failures (connection refused, timeouts, 5xx, a locked sqlite file) are
retried with exponential backoff (`tracking.retries`, `tracking.backoff_s`), then the job fails
with one line naming the tracking URI.

The embedded default needs no server: `sqlite:///<workdir>/mlflow.db`, artifacts under
`<workdir>/mlartifacts`; `MLFLOW_TRACKING_URI` (or `tracking.uri`) points it at a server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mtrec import __version__
from mtrec.config import GATE_METRICS, MtrecConfig
from mtrec.data.io import is_local, list_day_files, list_days, local_path
from mtrec.errors import ConfigError, GateDeferred, GateRefused, MtrecError, TrackingError, first_line
from mtrec.retry import retry
from mtrec.serving import ServedModel

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "model"
_RETRY_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_SERVING_DISTS = ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "fsspec", "mlflow")


def tracking_uri(cfg: MtrecConfig) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else the embedded sqlite store in the workdir."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    workdir = cfg.job.workdir
    if not is_local(workdir):
        raise ConfigError(f"the embedded MLflow store is a sqlite file in the workdir, and {workdir} is not a local path; "
                          "set `tracking.uri` (or MLFLOW_TRACKING_URI) to an MLflow server, or `tracking.enabled: false`")
    path = Path(local_path(workdir)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}/mlflow.db"


def _artifact_root(cfg: MtrecConfig, uri: str) -> str | None:
    if cfg.tracking.artifacts:
        return cfg.tracking.artifacts
    if uri.startswith("sqlite:///"):  # embedded: beside the database, not in the current directory
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a server decides (--artifacts-destination)


def quiet_mlflow() -> None:
    """MLflow's INFO lines and progress bars would drown the job's own progress."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _transient(e: BaseException) -> bool:
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, MlflowException):
        # the REST client wraps a refused connection / timeout as "API request to ... failed with
        # exception ..." and a non-JSON 5xx as "... failed with error code 5xx"; INTERNAL_ERROR alone
        # is also what any locally raised MlflowException carries, so it is not a reason to retry
        text = str(e)
        return (e.error_code in _RETRY_CODES or ("API request to" in text and "failed with exception" in text)
                or re.search(r"error code 5\d\d", text) is not None)
    if type(e).__name__ == "OperationalError":  # sqlalchemy: sqlite locked / unreachable database
        return True
    return isinstance(e, requests.exceptions.HTTPError) and e.response is not None and e.response.status_code >= 500


def _absent(e: BaseException) -> bool:
    """MLflow answered that the thing does not exist (a missing alias is INVALID_PARAMETER_VALUE)."""
    if not isinstance(e, MlflowException):
        return False
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(e) and "not found" in str(e))


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {"a.b.0.c": "value"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(d) if isinstance(d, (list, bool)) or d is None else str(d)
    return out


@dataclass
class VersionInfo:
    """A registered model version, as the gate sees it."""

    version: str
    date: dt.date  # the last day it trained on
    checkpoint: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)


class Tracker:
    """MLflow for one job or command: the URI, the retrying client, the experiment.

    Args:
        cfg (MtrecConfig): model name (experiment and registered model), tracking settings.
        say: progress lines.
    """

    def __init__(self, cfg: MtrecConfig, say: Callable[[str], None] = print):
        self.cfg, self.say = cfg, say
        self.uri = tracking_uri(cfg)
        self.name = cfg.name
        # mtrec retries (below) with its own backoff; MLflow's HTTP layer would otherwise retry 7
        # times over minutes before the first failure surfaces
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.tracking.timeout_s))
        quiet_mlflow()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(self.uri, self.uri)
        self._experiment: str | None = None

    # ---- every call to MLflow goes through here -------------------------------------------------
    def call(self, what: str, fn: Callable[..., Any], *args: Any, absent_ok: bool = False, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, retried with backoff on transient failures; with `absent_ok`, None
        when MLflow answers that the thing does not exist.

        Raises:
            TrackingError: MLflow unreachable after the retries, or a call it refused.
        """
        tries = self.cfg.tracking.retries + 1
        t0 = time.monotonic()
        try:
            return retry(lambda: fn(*args, **kwargs), tries, self.cfg.tracking.backoff_s, _transient)
        except MtrecError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow, requests, sqlalchemy: classified below
            if absent_ok and _absent(e):
                return None
            if not _transient(e):
                raise TrackingError(f"MLflow at {self.uri} refused {what}: {first_line(e, limit=240)}") from None
            raise TrackingError(f"MLflow at {self.uri} is unreachable: {what} failed {tries} time(s) over "
                                f"{time.monotonic() - t0:.0f}s ({first_line(e, limit=240)}); check that the tracking server is up "
                                "and that tracking.uri / MLFLOW_TRACKING_URI point at it") from None

    def experiment_id(self) -> str:
        if self._experiment is None:
            exp = self.call("reading the experiment", self.client.get_experiment_by_name, self.name)
            if exp is None:
                exp_id = self.call("creating the experiment", self.client.create_experiment, self.name,
                                   artifact_location=_artifact_root(self.cfg, self.uri))
            else:
                exp_id = exp.experiment_id
            self._experiment = exp_id
        return self._experiment

    # ---- one run per job --------------------------------------------------------------------------
    def start_run(self, kind: str, days: list[dt.date], checkpoint_url: str, parent: str | None,
                  parent_manifest: dict | None) -> str:
        """Open the job's run (status RUNNING) with its tags; returns the run id."""
        tags = {"mtrec.date": days[-1].isoformat(), "mtrec.first_day": days[0].isoformat(), "mtrec.kind": kind,
                "mtrec.checkpoint": checkpoint_url, "mtrec.parent_checkpoint": parent or "",
                "mtrec.parent_run_id": (parent_manifest or {}).get("mlflow_run_id", ""), "mtrec.version": __version__,
                "mtrec.git": _git_commit(), "mlflow.runName": f"{kind} {days[0]}" + (f"..{days[-1]}" if len(days) > 1 else "")}
        stale = self.call("searching unfinished runs", self.client.search_runs, [self.experiment_id()],
                          f"attributes.status = 'RUNNING' and tags.`mtrec.date` = '{days[-1]}' and tags.`mtrec.kind` = '{kind}'")
        for r in stale:  # a job killed (or cut off from MLflow) before it could mark its run FAILED
            self.call("closing a stale run", self.client.set_terminated, r.info.run_id, "FAILED")
            self.say(f"mlflow: marked run {r.info.run_id} of an earlier, unfinished {kind} job for {days[-1]} FAILED")
        run = self.call("starting the run", self.client.create_run, self.experiment_id(), tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.call("logging params", self.client.log_batch, run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.call("logging metrics", self.client.log_batch, run_id, metrics=items[i:i + 1000])

    def log_progress(self, run_id: str, records: list[dict]) -> None:
        """Rank 0's progress records as per-step training metrics."""
        now = int(time.time() * 1000)
        items = []
        for r in records:
            items += [Metric("train/loss", r["loss"], now, r["step"]), Metric("train/rows_per_s", r["rows_per_s"], now, r["step"])]
            items += [Metric(f"train/loss/{t}", v, now, r["step"]) for t, v in (r.get("task_losses") or {}).items()]
        for i in range(0, len(items), 1000):
            self.call("logging training metrics", self.client.log_batch, run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.call("tagging the run", self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, folder: str, path: str | None = None) -> None:
        self.call(f"uploading artifacts {path or ''}".strip(), self.client.log_artifacts, run_id, folder, path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.call("ending the run", self.client.set_terminated, run_id, status)

    def fail_run(self, run_id: str) -> None:
        """Best effort, with the usual retries (MLflow may be the reason the job failed; a run left
        RUNNING is closed by the next `start_run` of the same job)."""
        with contextlib.suppress(MtrecError):  # the job's own error is the one to report
            self.call("marking the run FAILED", self.client.set_terminated, run_id, "FAILED")

    # ---- the served model --------------------------------------------------------------------------
    def log_model(self, run_id: str, served: ServedModel, example) -> str:
        """The served model as an MLflow pyfunc under the run; returns its model URI."""
        from mlflow.models import infer_signature

        with tempfile.TemporaryDirectory() as tmp:
            served.save(tmp)
            signature = infer_signature(example, served.predict_pandas(example))

            def log() -> str:  # Model.log with run_id: no fluent active run (whose exit would end the run)
                mlflow.set_experiment(experiment_id=self.experiment_id())  # the logged model's home (default: experiment 0, ./mlruns)
                info = Model.log(artifact_path=None, name=MODEL_ARTIFACT, flavor=mlflow.pyfunc, run_id=run_id,
                                 python_model=str(Path(__file__).with_name("mlflow_model.py")), artifacts={"served": tmp},
                                 signature=signature, input_example=example, pip_requirements=_requirements())
                return info.model_uri

            return self.call("logging the model", log)

    # ---- registry ----------------------------------------------------------------------------------
    def register(self, run_id: str, model_uri: str, checkpoint_url: str, day: dt.date) -> str:
        """The version of the registered model for the published checkpoint of run `run_id`;
        alias `challenger` -> it unless a newer day's version holds it; the run ends FINISHED.
        Idempotent: a rerun after a partial registration finds the version (by run id) and
        completes the rest; a retry after a timeout does not register twice."""
        tags = {"mtrec.date": day.isoformat(), "mtrec.checkpoint": checkpoint_url, "mtrec.run_id": run_id}

        def find_or_register():
            return self.version_of_run(run_id, retry=False) or mlflow.register_model(model_uri, self.name, tags=tags)

        version = str(self.call("registering the version", find_or_register).version)
        current = self.alias(CHALLENGER)
        if current is None or current.date <= day:  # a late re-registration of an older day does not move it back
            self.call("setting the challenger alias", self.client.set_registered_model_alias, self.name, CHALLENGER, version)
        self.set_tags(run_id, {"mtrec.model_version": version})
        self.end_run(run_id)
        return version

    def version_of_run(self, run_id: str, retry: bool = True):
        """The model version registered from run `run_id`, if any."""
        query = f"name = '{self.name}' and tags.`mtrec.run_id` = '{run_id}'"
        found = (self.call("searching versions", self.client.search_model_versions, query) if retry
                 else self.client.search_model_versions(query))
        return max(found, key=lambda v: int(v.version)) if found else None

    def ensure_registered(self, checkpoint_url: str, manifest: dict) -> str | None:
        """For a published checkpoint (a rerun that has nothing to train): its version, completing
        a registration that MLflow's failure interrupted after the publish. None when the
        checkpoint was trained without tracking or recorded in another tracking store."""
        run_id = manifest.get("mlflow_run_id")
        if not run_id:
            return None
        if manifest.get("tracking_uri") not in (None, self.uri):
            self.say(f"mlflow: {checkpoint_url} was recorded in {manifest['tracking_uri']}, not {self.uri}; not checking its version")
            return None
        mv = self.version_of_run(run_id)
        run = self.call("reading the run", self.client.get_run, run_id, absent_ok=True)
        if mv is not None and run is not None and run.info.status == "FINISHED":
            return str(mv.version)
        if run is None:
            self.say(f"mlflow: run {run_id} of {checkpoint_url} is not in {self.uri} (deleted?); not registering it")
            return str(mv.version) if mv is not None else None
        model_uri = run.data.tags.get("mtrec.model_uri")
        if not model_uri:
            raise TrackingError(f"run {run_id} of {checkpoint_url} has no logged model; retrain the day with --force")
        version = self.register(run_id, model_uri, checkpoint_url, dt.date.fromisoformat(manifest["date"]))
        self.say(f"mlflow: completed the registration of {checkpoint_url}: version {version} of {self.name}")
        return version

    def alias(self, alias: str) -> VersionInfo | None:
        mv = self.call(f"reading alias {alias}", self.client.get_model_version_by_alias, self.name, alias, absent_ok=True)
        return _info(mv) if mv is not None else None

    def version(self, version: str) -> VersionInfo:
        mv = self.call(f"reading version {version}", self.client.get_model_version, self.name, str(version), absent_ok=True)
        if mv is None:
            raise TrackingError(f"{self.name} has no version {version} in {self.uri}; see the registered versions in `mlflow ui`")
        return _info(mv)


def _info(mv) -> VersionInfo:
    tags = dict(mv.tags or {})
    if "mtrec.date" not in tags:
        raise TrackingError(f"version {mv.version} of {mv.name} has no `mtrec.date` tag: it was not registered by an mtrec job; "
                            "pass --version of one that was")
    return VersionInfo(str(mv.version), dt.date.fromisoformat(tags["mtrec.date"]), tags.get("mtrec.checkpoint", ""),
                       mv.run_id or tags.get("mtrec.run_id", ""), tags)


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _requirements() -> list[str]:
    reqs = []
    for name in _SERVING_DISTS:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


class MtrecPyfunc(mlflow.pyfunc.PythonModel):
    """The MLflow face of `ServedModel`: a pandas DataFrame of raw feature columns in, one column
    per task (probability; regression value) out (MLflow's schema check takes DataFrames; for
    Arrow batches use `load_served(uri).predict(table)`, the same model). Needs mtrec installed
    where it is loaded."""

    def load_context(self, context) -> None:
        self.served = ServedModel.load(context.artifacts["served"])

    def predict(self, context, model_input, params=None):
        return self.served.predict_pandas(model_input)


def load_served(model_uri: str) -> ServedModel:
    """The ServedModel inside a logged/registered model (`models:/<name>@champion`, `runs:/...`)."""
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - MLflow, network, a model logged by another version: one line
        raise TrackingError(f"cannot load {model_uri}: {first_line(e, limit=240)}; check the name, version or alias "
                            f"and the tracking URI ({mlflow.get_tracking_uri()})") from None
    inner = model.unwrap_python_model()
    if not isinstance(inner, MtrecPyfunc):
        raise TrackingError(f"{model_uri} is not an mtrec model ({type(inner).__name__}); point --model at one mtrec logged")
    return inner.served


# --------------------------------------------------------------------------------------------------
# what a job records


def example_rows(logs: str, day: dt.date, columns: list[str], n: int = 5):
    """The first `n` rows of a day's logs under `logs`, feature columns only (the model's input example)."""
    from mtrec.data.validate import iter_file_batches

    for f in list_day_files(logs, day):
        for rb in iter_file_batches(f, columns=columns, batch_rows=n):
            return rb.slice(0, n).to_pandas()
    raise MtrecError(f"no rows under {logs} for {day} to make the model's input example")


def record_job(tracker: Tracker, run_id: str, cfg: MtrecConfig, staged: str, manifest: dict, summary, reports: list,
               say: Callable[[str], None] = print) -> dict:
    """Everything a run holds about a trained (staged, not yet published) checkpoint: params,
    evaluation on the day after the last trained day (when its logs exist), artifacts, plots, the
    served model. Returns {"model_uri", "eval_day", "metrics"}."""
    from mtrec.eval import plots
    from mtrec.eval.evaluate import predict_day, read_truth, report
    from mtrec.train import checkpoint

    t0 = time.perf_counter()
    params = flatten(cfg.model_dump(mode="json"))
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
        (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        for r in reports:
            (out / "validation").mkdir(exist_ok=True)
            (out / "validation" / f"dt={r.date}.json").write_text(r.to_json())
        (out / "plots").mkdir()
        if eval_day in list_days(cfg.job.logs):
            pred = predict_day(served.model, served.spec, cfg.job.logs, eval_day)
            metrics = report(served.spec, pred, read_truth(cfg.job.logs, eval_day))
            tracker.log_metrics(run_id, {f"eval/{k}": v for k, v in metrics.items()})
            plots.calibration(served.spec, pred, out / "plots" / "calibration.png", title=f"{cfg.name}: trained to {last}, scored on {eval_day}")
            say(f"evaluated on {eval_day}: " + ", ".join(f"{m} {metrics[m]:.4f}" for m in cfg.gate_metrics() if m in metrics))
        else:
            say(f"no logs for {eval_day} yet: the run has no evaluation metrics (the promotion gate evaluates once they land)")
        bn_result = record_bn(tracker, run_id, served, cfg, eval_day if metrics else None, out, say)
        curve = plots.position_bias(cfg.spec, full, out / "plots" / "position_bias.png")
        if curve:
            tracker.log_metrics(run_id, {f"position_bias/{p}": v for p, v in enumerate(curve)})
        history = day_trend(tracker, cfg.gate_metrics())
        if history:
            plots.trend(history, out / "plots" / "metric_trend.png", title=f"{cfg.name}: next-day metrics per trained day")
        tracker.log_artifacts(run_id, tmp)
    example = example_rows(cfg.job.logs, eval_day if metrics else last, served.columns)
    model_uri = tracker.log_model(run_id, served, example)
    tracker.set_tags(run_id, {"mtrec.model_uri": model_uri, "mtrec.eval_day": eval_day.isoformat() if metrics else "", "mtrec.bn_check": bn_result})
    say(f"recorded run {run_id} in {tracker.uri} ({time.perf_counter() - t0:.1f}s)")
    return {"model_uri": model_uri, "eval_day": eval_day.isoformat() if metrics else None, "metrics": metrics, "gate": cfg.gate_metrics(),
            "bn": bn_result}


def record_bn(tracker: Tracker, run_id: str, served: ServedModel, cfg: MtrecConfig, day: dt.date | None, out: Path,
              say: Callable[[str], None] = print) -> str:
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
    report = bn.check(served.model, served.spec, cfg.job.logs, day, cfg.bn)
    tracker.log_metrics(run_id, report.metrics())
    (out / "bn" / "check.json").write_text(report.to_json())
    bn.drift_plot(report, out / "plots" / "bn_drift.png")
    say(f"{report.summary()} ({report.seconds:.1f}s)")
    return "passed" if report.passed else "failed"


def day_trend(tracker: Tracker, metrics: list[str]) -> dict[str, list[tuple[str, float]]]:
    """Per metric, (trained-through date, next-day value) of the experiment's finished and current
    runs, oldest first (one point per date: the newest run)."""
    runs = tracker.call("searching runs", tracker.client.search_runs, [tracker.experiment_id()],
                        "tags.`mtrec.date` != ''", max_results=1000, order_by=["attributes.start_time DESC"])
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


# --------------------------------------------------------------------------------------------------
# the promotion gate


@dataclass
class GateDecision:
    promoted: bool
    challenger: str
    champion: str | None
    slice: str | None
    reason: str
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {challenger, champion}
    bn: str = ""  # the challenger's BN check on the slice: passed | failed | no BN layers

    def tags(self) -> dict[str, str]:
        return {"mtrec.gate.decision": "promoted" if self.promoted else "refused", "mtrec.gate.reason": self.reason[:5000],
                "mtrec.gate.champion": self.champion or "", "mtrec.gate.slice": self.slice or "",
                "mtrec.gate.figures": json.dumps(self.figures)[:5000], "mtrec.gate.bn": self.bn}


def compare(cfg: MtrecConfig, challenger: dict[str, float], champion: dict[str, float]) -> tuple[bool, list[str], dict]:
    """(passes, reasons, figures): each gate metric of the challenger against the champion's within
    `gate.tolerance`, in the metric's direction (higher AUC, lower NE, calibration nearer 1)."""
    tol = cfg.gate.tolerance
    worse, figures = [], {}
    for m in cfg.gate_metrics():
        if m not in challenger or m not in champion:
            raise GateRefused(f"metric {m} is missing from the evaluation (computed: {', '.join(sorted(challenger))}); "
                              "fix `gate.metrics`, or pass the model's own --config")
        a, b = challenger[m], champion[m]
        figures[m] = {"challenger": a, "champion": b}
        if not (np.isfinite(a) and np.isfinite(b)):  # e.g. AUC of a slice with one class: cannot judge
            worse.append(f"{m} is not a number on this slice (challenger {a}, champion {b})")
            continue
        sign = GATE_METRICS[m.partition("/")[2]]
        gap = (a - b) if sign > 0 else (b - a) if sign < 0 else (abs(b - 1) - abs(a - 1))  # > 0: challenger better
        if gap < -tol:
            worse.append(f"{m} {a:.4f} vs champion {b:.4f} (worse by {-gap:.4f} > tolerance {tol:g})")
    return not worse, worse, figures


def seen_until(v: VersionInfo) -> dt.date:
    """The last day whose data shaped the version: trained on, or its BN statistics recalibrated on."""
    recal = v.tags.get("mtrec.bn_recalibrated_on")
    return max(v.date, dt.date.fromisoformat(recal)) if recal else v.date


def gate_slice(cfg: MtrecConfig, *versions: VersionInfo) -> dt.date | None:
    """The newest day with logs that none of the versions has seen (`seen_until`)."""
    after = max(seen_until(v) for v in versions)
    days = [d for d in list_days(cfg.job.logs) if d > after]
    return days[-1] if days else None


def _bn_check(served: ServedModel, cfg: MtrecConfig, day: dt.date, say: Callable[[str], None]):
    """The gate's BN check of a served model on the slice under `cfg`'s logs and limits (None without BN layers)."""
    from mtrec import bn

    if not bn.bn_layers(served.model):
        return None
    rep = bn.check(served.model, served.spec, cfg.job.logs, day, cfg.bn)
    say(rep.summary())
    return rep


def promote(cfg: MtrecConfig, version: str | None = None, day: dt.date | None = None,
            say: Callable[[str], None] = print) -> GateDecision:
    """The promotion gate: evaluate the challenger (`version`, default alias `challenger`) and the
    champion on the same unseen day with the served models, and move `champion` only if no gate
    metric is worse than the champion's by more than `gate.tolerance`. The decision and its
    figures are written as tags on the challenger's version.

    Raises:
        GateRefused: the challenger is worse (the reason names the metric and both values).
        GateDeferred: no day with logs yet that neither model trained on.
    """
    from mtrec.eval.evaluate import predict_day, read_truth, report

    tracker = Tracker(cfg, say)
    chal = tracker.version(version) if version else tracker.alias(CHALLENGER)
    if chal is None:
        raise GateRefused(f"{cfg.name} has no `challenger` version in {tracker.uri}; run a training job first or pass --version")
    champ = tracker.alias(CHAMPION)
    if champ is not None and champ.version == chal.version:
        say(f"version {chal.version} is already the champion of {cfg.name}")
        return GateDecision(True, chal.version, champ.version, None, "already champion")
    if champ is None:  # the first champion: nothing to compare with, but its BN statistics are checked when a day allows
        decision = GateDecision(True, chal.version, None, None, f"no champion yet: version {chal.version} becomes the first")
        first_day = day or gate_slice(cfg, chal)
        if first_day is not None:
            served = load_served(f"models:/{cfg.name}/{chal.version}")
            rep = _bn_check(served, cfg, first_day, say)
            if rep is not None:
                decision.bn, decision.slice = ("passed" if rep.passed else "failed"), first_day.isoformat()
                decision.promoted = rep.passed
                decision.reason = (f"{decision.reason}; BN check passed on {first_day}" if rep.passed
                                   else f"no champion yet, but its {rep.summary()}")
    else:
        day = day or gate_slice(cfg, chal, champ)
        seen = max(seen_until(chal), seen_until(champ))
        if day is None:
            raise GateDeferred(f"no day with logs after {seen} under {cfg.job.logs}: the gate compares both models "
                              f"on a day neither has seen; run `mtrec promote` again once the next day's logs land")
        if day <= seen:
            raise GateRefused(f"--date {day} is not after both models' data (challenger to {seen_until(chal)}, champion to "
                              f"{seen_until(champ)}); pass a later day")
        say(f"gate: challenger v{chal.version} (trained to {chal.date}) vs champion v{champ.version} (trained to {champ.date}) on {day}")
        truth = read_truth(cfg.job.logs, day)
        scores, bn_report = {}, None
        for who, v in (("challenger", chal), ("champion", champ)):
            served = load_served(f"models:/{cfg.name}/{v.version}")
            # both on the same slice (this config's logs), each with its own spec
            scores[who] = report(served.spec, predict_day(served.model, served.spec, cfg.job.logs, day), truth)
            if who == "challenger":
                bn_report = _bn_check(served, cfg, day, say)
        if chal.run_id:  # the challenger's run gets its evaluation on the slice (a nightly for yesterday had none)
            tracker.log_metrics(chal.run_id, {f"gate/{k}": v for k, v in scores["challenger"].items()}
                                | ({f"gate/{k}": v for k, v in bn_report.metrics().items()} if bn_report is not None else {}))
            tracker.set_tags(chal.run_id, {"mtrec.gate_slice": day.isoformat()})
        ok, worse, figures = compare(cfg, scores["challenger"], scores["champion"])
        bn_failed = bn_report is not None and not bn_report.passed  # statistics that do not match what serving sees
        summary = "; ".join(f"{m} {f['challenger']:.4f} vs {f['champion']:.4f}" for m, f in figures.items())
        reasons = ([f"worse than champion v{champ.version} on {day}: " + "; ".join(worse)] if worse else []) + (
            [f"its {bn_report.summary()}"] if bn_failed else [])
        ok = ok and not bn_failed
        reason = (f"every gate metric within {cfg.gate.tolerance:g} of the champion or better on {day}: {summary}"
                  + ("; BN check passed" if bn_report is not None else "") if ok else "; ".join(reasons))
        decision = GateDecision(ok, chal.version, champ.version, day.isoformat(), reason, figures,
                                bn="no BN layers" if bn_report is None else ("passed" if bn_report.passed else "failed"))
    for k, v in decision.tags().items():
        tracker.call("tagging the version", tracker.client.set_model_version_tag, cfg.name, chal.version, k, v)
    if not decision.promoted:
        stays = f"`champion` stays v{champ.version}" if champ is not None else "there is still no champion"
        raise GateRefused(f"challenger v{chal.version} of {cfg.name} refused: {decision.reason}; {stays}")
    tracker.call("moving the champion alias", tracker.client.set_registered_model_alias, cfg.name, CHAMPION, chal.version)
    say(f"promoted v{chal.version} of {cfg.name} to champion: {decision.reason}")
    return decision


def models_uri(cfg: MtrecConfig, alias: str = CHAMPION) -> str:
    return f"models:/{cfg.name}@{alias}"


__all__ = ["CHALLENGER", "CHAMPION", "GateDecision", "MtrecPyfunc", "Tracker", "compare", "load_served", "promote", "record_job",
           "tracking_uri"]
