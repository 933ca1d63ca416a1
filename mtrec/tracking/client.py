"""The retrying MLflow client: the tracking URI, the experiment, a job's run, the registry.

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
from collections.abc import Callable, Iterator
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
from mtrec.config import MtrecConfig
from mtrec.data.io import is_local, local_path
from mtrec.errors import ConfigError, MtrecError, TrackingError, first_line
from mtrec.log import quiet_libraries, verbose
from mtrec.retry import retry
from mtrec.serving import ServedModel
from mtrec.tracking.pyfunc import (
    LIMIT_TAG,
    MODEL_CODE,
    REGISTERED,
    SERVED_TAG,
    SIZE_TAG,
    served_signature,
    without_pyfunc,
)

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "model"
_RETRY_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_SERVING_DISTS = (
    "torch",
    "torchrec",
    "fbgemm-gpu-cpu",
    "fbgemm-gpu",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "fsspec",
    "mlflow",
)


def tracking_uri(cfg: MtrecConfig) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else the embedded sqlite store in the workdir."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    workdir = cfg.job.workdir
    if not is_local(workdir):
        raise ConfigError(
            f"the embedded MLflow store is a sqlite file in the workdir, and {workdir} is not a local path; "
            "set `tracking.uri` (or MLFLOW_TRACKING_URI) to an MLflow server, or `tracking.enabled: false`"
        )
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
    """MLflow's own lines (its INFO logs, progress bars, "Successfully registered model ...")
    would drown the job's progress: kept out unless --verbose (`mtrec.log`)."""
    from mlflow.utils.logging_utils import disable_logging, enable_logging

    quiet_libraries()
    (enable_logging if verbose() else disable_logging)()


def _transient(e: BaseException) -> bool:
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, MlflowException):
        # the REST client wraps a refused connection / timeout as "API request to ... failed with
        # exception ..." and a non-JSON 5xx as "... failed with error code 5xx"; INTERNAL_ERROR alone
        # is also what any locally raised MlflowException carries, so it is not a reason to retry
        text = str(e)
        return (
            e.error_code in _RETRY_CODES
            or ("API request to" in text and "failed with exception" in text)
            or re.search(r"error code 5\d\d", text) is not None
        )
    if type(e).__name__ == "OperationalError":  # sqlalchemy: sqlite locked / unreachable database
        return True
    return isinstance(e, requests.exceptions.HTTPError) and e.response is not None and e.response.status_code >= 500


def _absent(e: BaseException) -> bool:
    """MLflow answered that the thing does not exist (a missing alias is INVALID_PARAMETER_VALUE)."""
    if not isinstance(e, MlflowException):
        return False
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(e) and "not found" in str(e)
    )


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


def _set_uris(uri: str) -> None:
    """`uri` as this process's MLflow tracking and registry URI, without MLflow's export of it to
    `os.environ`: the next config of the process (a library caller's second job, a test session)
    would read that export as the user's MLFLOW_TRACKING_URI and send its runs to this store, and
    `mtrec submit` would forward it to a cluster job. Child processes get the URI explicitly."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Tracker:
    """MLflow for one job or command: the URI, the retrying client, the experiment.

    Args:
        cfg (MtrecConfig): model name (experiment and registered model), tracking settings.
        experiment (str | None): another experiment than the model's name (`mtrec tune`'s
            searches: `<name>-tune`); the registered model keeps the model's name.
    """

    def __init__(self, cfg: MtrecConfig, experiment: str | None = None):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.name = cfg.name
        self.experiment = experiment or cfg.name
        # mtrec retries (below) with its own backoff; MLflow's HTTP layer would otherwise retry 7
        # times over minutes before the first failure surfaces
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.tracking.timeout_s))
        quiet_mlflow()
        _set_uris(self.uri)
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
            raise TrackingError(
                f"MLflow at {self.uri} is unreachable: {what} failed {tries} time(s) over "
                f"{time.monotonic() - t0:.0f}s ({first_line(e, limit=240)}); check that the tracking server is up "
                "and that tracking.uri / MLFLOW_TRACKING_URI point at it"
            ) from None

    def experiment_id(self) -> str:
        if self._experiment is None:
            exp = self.call("reading the experiment", self.client.get_experiment_by_name, self.experiment)
            if exp is None:
                exp_id = self.call(
                    "creating the experiment",
                    self.client.create_experiment,
                    self.experiment,
                    artifact_location=_artifact_root(self.cfg, self.uri),
                )
            else:
                exp_id = exp.experiment_id
            self._experiment = exp_id
        return self._experiment

    # ---- one run per job --------------------------------------------------------------------------
    @contextlib.contextmanager
    def job_run(
        self,
        kind: str,
        days: list[dt.date],
        checkpoint_url: str,
        parent: str | None = None,
        parent_run_id: str | None = None,
        keep_open: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """The job's run for the block: opened with its tags (`start_run`: MLflow down fails the
        job here, before its work), its id yielded, marked FAILED when the block raises, unless
        `keep_open()` then says the run is complete (a training job's published checkpoint: only
        its registration may lag, and the rerun of the job completes it, `ensure_registered`).
        `register` ends the run FINISHED."""
        run_id = self.start_run(kind, days, checkpoint_url, parent, parent_run_id)
        try:
            yield run_id
        except BaseException:
            if keep_open is None or not keep_open():
                self.fail_run(run_id)
            raise

    def start_run(
        self, kind: str, days: list[dt.date], checkpoint_url: str, parent: str | None, parent_run_id: str | None
    ) -> str:
        """Open the job's run (status RUNNING) with its tags (the parent checkpoint and its run); returns the run id."""
        tags = {
            "mtrec.date": days[-1].isoformat(),
            "mtrec.first_day": days[0].isoformat(),
            "mtrec.kind": kind,
            "mtrec.checkpoint": checkpoint_url,
            "mtrec.parent_checkpoint": parent or "",
            "mtrec.parent_run_id": parent_run_id or "",
            "mtrec.version": __version__,
            "mtrec.git": _git_commit(),
            "mlflow.runName": f"{kind} {days[0]}" + (f"..{days[-1]}" if len(days) > 1 else ""),
        }
        stale = self.call(
            "searching unfinished runs",
            self.client.search_runs,
            [self.experiment_id()],
            f"attributes.status = 'RUNNING' and tags.`mtrec.date` = '{days[-1]}' and tags.`mtrec.kind` = '{kind}'",
        )
        for r in stale:  # a job killed (or cut off from MLflow) before it could mark its run FAILED
            self.call("closing a stale run", self.client.set_terminated, r.info.run_id, "FAILED")
            log.info(
                "mlflow: marked run %s of an earlier, unfinished %s job for %s FAILED", r.info.run_id, kind, days[-1]
            )
        run = self.call("starting the run", self.client.create_run, self.experiment_id(), tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.call("logging params", self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.call("logging metrics", self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def log_progress(self, run_id: str, records: list[dict]) -> None:
        """Rank 0's progress records as per-step training metrics."""
        now = int(time.time() * 1000)
        items = []
        for r in records:
            items += [
                Metric("train/loss", r["loss"], now, r["step"]),
                Metric("train/rows_per_s", r["rows_per_s"], now, r["step"]),
            ]
            items += [Metric(f"train/loss/{t}", v, now, r["step"]) for t, v in (r.get("task_losses") or {}).items()]
        for i in range(0, len(items), 1000):
            self.call("logging training metrics", self.client.log_batch, run_id, metrics=items[i : i + 1000])

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
        with tempfile.TemporaryDirectory() as tmp:
            served.save(tmp)
            signature = served_signature(served)

            def log() -> str:  # Model.log with run_id: no fluent active run (whose exit would end the run)
                # the logged model's home (default: experiment 0, ./mlruns)
                mlflow.set_experiment(experiment_id=self.experiment_id())
                info = Model.log(
                    artifact_path=None,
                    name=MODEL_ARTIFACT,
                    flavor=mlflow.pyfunc,
                    run_id=run_id,
                    python_model=MODEL_CODE,
                    artifacts={"served": tmp},
                    signature=signature,
                    input_example=example,
                    pip_requirements=_requirements(),
                )
                return info.model_uri

            return self.call("logging the model", log)

    # ---- registry ----------------------------------------------------------------------------------
    def register(
        self, run_id: str, model_uri: str, checkpoint_url: str, day: dt.date, tags: dict[str, str] | None = None
    ) -> str:
        """The version of the registered model for the published checkpoint of run `run_id`;
        alias `challenger` -> it unless a newer day's version holds it; the run ends FINISHED.
        Idempotent: a rerun after a partial registration finds the version (by run id) and
        completes the rest; a retry after a timeout does not register twice. An empty `model_uri`:
        the run logged no pyfunc (above `tracking.max_pyfunc_mb`, its tags say), and the version
        is registered without one (`_register_without_pyfunc`). `tags`: more version tags, set
        as the version is created (what readers must never see it without)."""
        tags = {
            "mtrec.date": day.isoformat(),
            "mtrec.checkpoint": checkpoint_url,
            "mtrec.run_id": run_id,
            **(tags or {}),
        }
        if not model_uri:
            tags.update(self._no_pyfunc_tags(run_id))

        def find_or_register():
            found = self.version_of_run(run_id, retry=False)
            if found is not None:
                return found
            if not model_uri:
                return self._register_without_pyfunc(run_id, tags)
            return mlflow.register_model(model_uri, self.name, tags=tags)

        version = str(self.call("registering the version", find_or_register).version)
        current = self.alias(CHALLENGER)
        if current is None or current.date <= day:  # a late re-registration of an older day does not move it back
            self.call(
                "setting the challenger alias", self.client.set_registered_model_alias, self.name, CHALLENGER, version
            )
        self.set_tags(run_id, {"mtrec.model_version": version})
        self.end_run(run_id)
        return version

    def _no_pyfunc_tags(self, run_id: str) -> dict[str, str]:
        """The tags of a run recorded without a pyfunc that its version carries too (what was
        decided, the size, the limit), so that every reader of the version can tell.

        Raises:
            TrackingError: the run has neither a logged model nor those tags.
        """
        run_tags = self.call("reading the run", self.client.get_run, run_id).data.tags
        if not without_pyfunc(run_tags):
            raise TrackingError(f"run {run_id} has no logged model; retrain the day with --force")
        return {k: run_tags.get(k, "") for k in (SERVED_TAG, SIZE_TAG, LIMIT_TAG)}

    def _register_without_pyfunc(self, run_id: str, tags: dict[str, str]):
        """A model version with no pyfunc behind it (called inside `register`'s retried step, which
        looked for the run's version first). Its source is the run's artifacts (`runs:/<run_id>`:
        the manifest, reports and plots of a job; no model), not the checkpoint: an `mlflow server`
        refuses a local path outside the run's artifacts as a source, and a client that downloads
        the source (`mlflow.pyfunc.load_model`) fetches a few small files, not the tables. The
        checkpoint is the `mtrec.checkpoint` tag, as on every version."""
        try:
            self.client.create_registered_model(self.name)
        except MlflowException as e:  # the model's first version creates it; later ones find it
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        return self.client.create_model_version(self.name, f"runs:/{run_id}", run_id=run_id, tags=tags)

    def version_of_run(self, run_id: str, retry: bool = True):
        """The model version registered from run `run_id`, if any."""
        query = f"name = '{self.name}' and tags.`mtrec.run_id` = '{run_id}'"
        found = (
            self.call("searching versions", self.client.search_model_versions, query)
            if retry
            else self.client.search_model_versions(query)
        )
        return max(found, key=lambda v: int(v.version)) if found else None

    def ensure_registered(self, checkpoint_url: str, manifest: dict) -> str | None:
        """For a published checkpoint (a rerun that has nothing to train): its version, completing
        a registration that MLflow's failure interrupted after the publish. None when the
        checkpoint was trained without tracking or recorded in another tracking store."""
        run_id = manifest.get("mlflow_run_id")
        if not run_id:
            return None
        if manifest.get("tracking_uri") not in (None, self.uri):
            log.info(
                "mlflow: %s was recorded in %s, not %s; not checking its version",
                checkpoint_url,
                manifest["tracking_uri"],
                self.uri,
            )
            return None
        mv = self.version_of_run(run_id)
        run = self.call("reading the run", self.client.get_run, run_id, absent_ok=True)
        if mv is not None and run is not None and run.info.status == "FINISHED":
            return str(mv.version)
        if run is None:
            log.info(
                "mlflow: run %s of %s is not in %s (deleted?); not registering it", run_id, checkpoint_url, self.uri
            )
            return str(mv.version) if mv is not None else None
        model_uri = run.data.tags.get("mtrec.model_uri")
        if not model_uri and not without_pyfunc(run.data.tags):
            raise TrackingError(f"run {run_id} of {checkpoint_url} has no logged model; retrain the day with --force")
        version = self.register(run_id, model_uri or "", checkpoint_url, dt.date.fromisoformat(manifest["date"]))
        log.info("mlflow: completed the registration of %s: version %s of %s", checkpoint_url, version, self.name)
        return version

    def tag_version(self, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.call("tagging the version", self.client.set_model_version_tag, self.name, version, k, v)

    def alias(self, alias: str) -> VersionInfo | None:
        mv = self.call(
            f"reading alias {alias}", self.client.get_model_version_by_alias, self.name, alias, absent_ok=True
        )
        return _info(mv) if mv is not None else None

    def version(self, version: str) -> VersionInfo:
        mv = self.call(
            f"reading version {version}", self.client.get_model_version, self.name, str(version), absent_ok=True
        )
        if mv is None:
            raise TrackingError(
                f"{self.name} has no version {version} in {self.uri}; see the registered versions in `mlflow ui`"
            )
        return _info(mv)

    def versions(self) -> list[VersionInfo]:
        """Every version an mtrec job registered (others are left out), newest data first: by the
        last day trained on, then by version number (a retrain of the same day is the newer)."""
        found, token = [], None
        while True:
            page = self.call(
                "listing the versions",
                self.client.search_model_versions,
                f"name = '{self.name}'",
                page_token=token,
            )
            found += [_info(mv) for mv in page if "mtrec.date" in (mv.tags or {})]
            token = page.token
            if not token:
                return sorted(found, key=lambda v: (v.date, int(v.version)), reverse=True)


def registered_version(cfg: MtrecConfig, model_uri: str) -> VersionInfo | None:
    """The mtrec version a `models:/NAME/N` or `models:/NAME@alias` URI names, in `cfg`'s tracking
    store (None: another kind of URI, or an alias that is not set).

    Raises:
        TrackingError: no such version, or one an mtrec job did not register.
    """
    m = REGISTERED.fullmatch(model_uri)
    if not m:
        return None
    tracker = Tracker(cfg.model_copy(update={"name": m.group(1)}))
    return tracker.version(m.group(2)) if m.group(2) else tracker.alias(m.group(3))


def _info(mv) -> VersionInfo:
    tags = dict(mv.tags or {})
    if "mtrec.date" not in tags:
        raise TrackingError(
            f"version {mv.version} of {mv.name} has no `mtrec.date` tag: it was not registered by an mtrec job; "
            "pass --version of one that was"
        )
    return VersionInfo(
        str(mv.version),
        dt.date.fromisoformat(tags["mtrec.date"]),
        tags.get("mtrec.checkpoint", ""),
        mv.run_id or tags.get("mtrec.run_id", ""),
        tags,
    )


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
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
