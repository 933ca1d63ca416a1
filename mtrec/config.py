"""The run spec: one YAML file with the model spec and how to run it.

The file's top level holds the model spec's keys (`name`, `labels`, `features`, `tasks`, `model`:
see `mtrec.spec`) beside the run's: `train`, `job` (paths), `tracking`, `gate`, `bn`. Jobs read
the whole `MtrecConfig`; models, batch conversion, row validation and the served model get only
`cfg.spec`. Every key is declared with its type, default and a one-line description; an unknown
key, a wrong type or an inconsistent value fails at load with one line naming the key, the value
received and the fix (`mtrec.configdoc`, which also generates ``docs/configuration.md``).

Example:
    >>> cfg = load_config("esmm")                      # a shipped example, or a path / fsspec URL
    >>> cfg.spec.task("cvr").given, cfg.train.batch_size
    ('ctr', 2048)
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from mtrec.configdoc import validate
from mtrec.errors import ConfigError
from mtrec.spec import SPEC_KEYS, LabelKind, ModelSpec, Strict, _SpecFields

EXAMPLES = ("esmm", "esm2", "mmoe", "esmm_seq", "dupn")


class ShardingType(StrEnum):
    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    ROW_WISE = "row_wise"  # GPU only
    TABLE_ROW_WISE = "table_row_wise"  # GPU only
    DATA_PARALLEL = "data_parallel"


class EmbeddingOptimizer(StrEnum):
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    SGD = "sgd"
    ADAM = "adam"  # GPU only: FBGEMM has no fused Adam on CPU


class Placement(StrEnum):
    PACK = "pack"
    SPREAD = "spread"


class DenseOptimizer(StrEnum):
    ADAM = "adam"
    ADAGRAD = "adagrad"
    SGD = "sgd"


# --------------------------------------------------------------------------------------------------
# training and job


class DenseOptimizerConfig(Strict):
    name: DenseOptimizer = Field(DenseOptimizer.ADAM, description="Optimizer of the dense (data-parallel) parameters.")
    lr: float = Field(1e-3, gt=0, description="Learning rate.")


class EmbeddingOptimizerConfig(Strict):
    name: EmbeddingOptimizer = Field(
        EmbeddingOptimizer.ROWWISE_ADAGRAD,
        description="TorchRec fused optimizer of the tables (rowwise_adagrad works on CPU and GPU).",
    )
    lr: float = Field(0.05, gt=0, description="Learning rate.")


class SamplingConfig(Strict):
    label: str | None = Field(
        None,
        description="Binary label that defines positives and negatives for sampling; default the first root "
        "(not `given`) binary task's label, e.g. click.",
    )
    negative_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of negative rows kept (1 = no down-sampling); scores are corrected back at serving.",
    )
    positive_repeat: int = Field(
        1,
        ge=1,
        description="Times each positive row is trained (1 = no over-sampling); scores are corrected back at serving.",
    )

    @property
    def odds_factor(self) -> float:
        """How much sampling multiplies the odds of a positive: positive_repeat / negative_rate."""
        return self.positive_repeat / self.negative_rate


class ShuffleConfig(Strict):
    buffer_rows: int = Field(
        32768,
        ge=0,
        description=(
            "Rows each worker holds to draw its training rows from in a random order, seeded by `train.seed` and the "
            "day (deterministic; a resumed day replays it); 0: rows in the order they are read. Memory: up to 1.5x "
            "this many rows of the columns training reads."
        ),
    )
    files: bool = Field(
        True,
        description=(
            "Read each day's files in a random order seeded by `train.seed` and the day, not by name, so logs "
            "written hour by hour reach the buffer mixed."
        ),
    )
    user_runs: bool = Field(
        True,
        description=(
            "Move a user's consecutive rows (one request's impressions, at most 64) together, so that DUPN computes "
            "a user's part once per batch; false: single rows, which logs sorted by label need (with buffer_rows at "
            "least the rows a worker trains in a job: docs/bn-consistency.md)."
        ),
    )


class TrainConfig(Strict):
    batch_size: int = Field(2048, gt=0, description="Rows per batch per worker.")
    seed: int = Field(0, description="Seed of parameter init and of any sampling.")
    epochs: int = Field(
        1,
        ge=1,
        description=(
            "Full passes over a full retrain's good rows (`mtrec train`), each in another order (the shuffle's seeds "
            "include the pass) and each training every good row once. Full retrains only; nightlies learn each new "
            "day once."
        ),
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (= torch.distributed world size).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="Logical CPUs each worker reserves (fractions leave room for Ray Data on small boxes)."
    )
    placement: Placement = Field(
        Placement.PACK,
        description="Where Ray puts the workers: pack (fewest nodes) or spread (one per node where possible).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description=(
            "Torch intra-op threads per worker; 0 = the node's cores divided by the workers on it "
            "(Ray would otherwise pin 1)."
        ),
    )
    sharding_types: list[ShardingType] = Field(
        default_factory=lambda: [ShardingType.TABLE_WISE],
        min_length=1,
        description="Sharding types the planner may use (CPU: table_wise, column_wise, data_parallel).",
    )
    dense_optimizer: DenseOptimizerConfig = Field(default_factory=DenseOptimizerConfig, description="Dense optimizer.")
    embedding_optimizer: EmbeddingOptimizerConfig = Field(
        default_factory=EmbeddingOptimizerConfig, description="Embedding (fused) optimizer."
    )
    ingest_buffer_mb: int = Field(
        512,
        gt=0,
        description=(
            "Object-store memory Ray Data may fill ahead of the workers: "
            "bounds the job's memory whatever the size of the range."
        ),
    )
    checkpoint_every_batches: int = Field(
        500,
        gt=0,
        description=(
            "Intra-day checkpoint period in steps: a failed job (or a restarted worker) "
            "resumes from the newest one instead of restarting the day."
        ),
    )
    max_failures: int = Field(
        1,
        ge=0,
        description=(
            "Worker-group restarts Ray Train may make within one job "
            "(each resumes from the newest intra-day checkpoint); 0 = fail at the first worker failure."
        ),
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="Training-time sampling (negative down-sampling, positive over-sampling), deterministic per row.",
    )
    shuffle: ShuffleConfig = Field(
        default_factory=ShuffleConfig,
        description="Row order within a day: logs are written in time order (or sorted), training wants a random one.",
    )
    init_from: str | None = Field(
        None,
        description="A cold start's initial weights: a published checkpoint (URL) or a registered version "
        "(`models:/NAME/N`, `models:/NAME@alias`) of another model. Every tensor whose name and shape match is "
        "copied (tables, encoder, towers); the rest starts fresh. Warm starts ignore it.",
    )
    start_at_base_rate: bool = Field(
        True,
        description="A fresh model (a cold start without `init_from`) starts each binary root task's output at the "
        "log-odds of its label's rate in the first training step's rows (all workers' together), not near p = 0.5, "
        "so one pass does not spend its first steps unlearning a 10-20x over-prediction (ESMM, one pass: +0.008 "
        "CTR AUC alone, +0.034 with `model.batch_norm`). Turn it off on small logs with a shallow tower, which "
        "then learns its position curve less well (docs/training.md, Small logs). Warm starts and resumed jobs "
        "keep their weights.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parts of the model whose weights do not train, e.g. `[user]`: DUPN's user representation "
        "(its encoder, attention, user tower and every table the user side reads, shared tables included).",
    )

    def shuffle_plan(self, key: int, rank: int) -> tuple[int, bool, list[int], str | None]:
        """`mtrec.train.stream.day_batches`'s `shuffle`: (buffer rows, shuffle files, the seed of a
        rank's buffer: train seed, the job's key (its last day's ordinal), rank; the column whose
        consecutive rows move together, or None). Epoch 0 uses these seeds as they are; epoch e > 0
        appends e to the buffer's and the file order's (`mtrec.train.stream.epoch_seed`)."""
        together = "user_id" if self.shuffle.user_runs else None
        return self.shuffle.buffer_rows, self.shuffle.files, [self.seed, key, rank], together


RESOURCE_KEYS = {
    "num_workers",
    "cpus_per_worker",
    "placement",
    "torch_threads",
    "ingest_buffer_mb",
    "checkpoint_every_batches",
    "max_failures",
    "sharding_types",
}


class JobConfig(Strict):
    logs: str = Field(
        "./world",
        description=(
            "Logs root (fsspec URL or path) holding one folder of Parquet files per day, named by `job.partition` "
            "(default dt=YYYY-MM-DD); a relative path is taken from the directory the command runs in."
        ),
    )
    workdir: str = Field(
        "./mtrec-work",
        description=(
            "Where checkpoints, the MLflow store, quarantine and reports go; "
            "a relative path is taken from the directory the command runs in."
        ),
    )
    serving_logs: str | None = Field(
        None,
        description=(
            "Root (fsspec URL or path) of serving-time feature logs, one folder per day like `job.logs` "
            "(`job.partition`): the candidates each "
            "request scored, with the features the model reads and no labels. When set, the BN statistics check "
            "(every job's, `mtrec bn-check`'s and the gate's) and `bn-check --recalibrate` use that day's "
            "candidates as the serving population instead of its impressions."
        ),
    )
    partition: str = Field(
        "dt=YYYY-MM-DD",
        description="How the logs name each day's folder, with YYYY, MM and DD: dt=YYYY-MM-DD, dt=YYYYMMDD, "
        "date=YYYY-MM-DD, ...; Parquet files anywhere inside it are read (hour=HH/ subfolders too).",
    )
    allow_gaps: bool = Field(
        False,
        description="Days without logs (no folder, or no rows) are skipped with a line saying so: a range trains "
        "the days that have logs, a nightly for such a day does nothing, and a warm start reaches back over them "
        "to the newest published day. Off: such a day is an error (a late or lost export).",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="A day fails validation when more than this fraction of rows is quarantined."
    )
    timezone: str = Field("UTC", description="Timezone in which `--date yesterday` is resolved.")
    lease_ttl_s: float = Field(
        300.0,
        ge=3,
        description=(
            "On an object store, how long the model's lock (a lease, renewed every third of it) outlives a job "
            "that died without releasing it: the next job waits that long. See docs/operations.md."
        ),
    )
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "fsspec options per protocol, for every process of a job (driver, Ray workers, read tasks), e.g. "
            "`{s3: {endpoint_url: 'http://minio:9000'}}` for an S3-compatible store; credentials are better left to "
            "the environment (AWS_ACCESS_KEY_ID, ..., or the node's role). See docs/operations.md."
        ),
    )

    @field_validator("storage_options")
    @classmethod
    def _storage_options(cls, opts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import fsspec

        for proto in opts:
            if proto not in fsspec.available_protocols():
                raise ValueError(
                    f"`job.storage_options` names protocol {proto!r}, which fsspec does not know; use the protocol of "
                    "the URLs (s3, gs, abfs, ...)"
                )
        return opts

    @field_validator("logs", "workdir", "serving_logs")
    @classmethod
    def _absolute(cls, url: str | None) -> str | None:
        return None if url is None else absolute_url(url)

    @model_validator(mode="after")
    def _logs_roots(self) -> JobConfig:
        """`logs` and `serving_logs` as `LogsRoot`s: whoever lists their days names folders by `partition`."""
        from mtrec.data.io import LogsRoot

        for key in ("logs", "serving_logs"):
            url = getattr(self, key)
            if url is not None:
                object.__setattr__(self, key, LogsRoot(str(url), self.partition))
        return self

    @field_validator("partition")
    @classmethod
    def _partition(cls, pattern: str) -> str:
        from mtrec.data.io import check_partition

        return check_partition(pattern)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder of zones, e.g. "Europe"
            raise ValueError(
                f"unknown timezone {name!r}; use an IANA name such as UTC, Europe/Berlin, America/New_York"
            ) from None
        return name


SECRET_KEY_RE = re.compile(r"key|secret|token|password|credential|sas|signature", re.IGNORECASE)


def _redact(value: Any, name: str = "") -> Any:
    """`value` with every leaf under a key matching SECRET_KEY_RE replaced by "<redacted>"."""
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, name) for v in value]
    return "<redacted>" if SECRET_KEY_RE.search(name) and value not in (None, "") else value


def absolute_url(url: str) -> str:
    """A relative local path made absolute against the current directory (where the config is
    loaded): Ray workers run in other directories, so every process must see the same path.
    URLs with a scheme (s3://, memory://, file://...) are left as they are."""
    if "://" in url or not url:
        return url
    return str(Path(url).expanduser().absolute())


class TrackingConfig(Strict):
    enabled: bool = Field(
        True,
        description=(
            "Record every job in MLflow (run, metrics, artifacts, model, registry version); "
            "false: train and publish checkpoints only."
        ),
    )
    uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI; default $MLFLOW_TRACKING_URI, else "
            "sqlite:///<workdir>/mlflow.db (embedded, no server)."
        ),
    )
    artifacts: str | None = Field(
        None,
        description=(
            "Artifact root of a new experiment in the embedded store; "
            "default <workdir>/mlartifacts (a server uses its own)."
        ),
    )
    retries: int = Field(
        4,
        ge=0,
        description=(
            "Retries of an MLflow call that fails to reach the store, with exponential backoff; "
            "then the job fails naming the URI."
        ),
    )
    backoff_s: float = Field(
        1.0,
        ge=0,
        description="First wait between retries, doubled after each (1 s: a restarting server has ~15 s to come back).",
    )
    timeout_s: int = Field(30, gt=0, description="Timeout of one HTTP request to an MLflow server.")
    max_pyfunc_mb: float | None = Field(
        8192.0,
        ge=0,
        description=(
            "Largest served model (its tensors: embedding tables and dense layers, float32, in MiB) a job logs "
            "as an MLflow pyfunc; above it the version is registered without one (tag mtrec.served_model: none) "
            "and is scored from its checkpoint with --workers N; null: no limit, 0: never a pyfunc."
        ),
    )

    @field_validator("artifacts")
    @classmethod
    def _absolute(cls, url: str | None) -> str | None:
        return absolute_url(url) if url else url


GATE_METRICS = {
    "auc": 1,
    "gauc": 1,
    "pearson": 1,
    "auc_unbiased": 1,
    "auc_entire_space": 1,  # higher is better
    "accuracy": 1,
    "macro_auc": 1,
    "macro_auc_truth": 1,
    "ne": -1,
    "log_loss": -1,
    "mse": -1,
    "calibration": 0,
}  # lower is better; 0: |x - 1| lower is better


class BNCheckConfig(Strict):
    max_smd: float = Field(
        0.25,
        gt=0,
        description=(
            "A BN layer fails when the mean over its channels of |running mean - serving mean| "
            "/ serving std exceeds this."
        ),
    )
    max_abs_log_var_ratio: float = Field(
        0.5,
        gt=0,
        description=(
            "A BN layer fails when the mean over its channels of |log(running var / serving var)| exceeds this."
        ),
    )
    max_kl: float = Field(
        0.1,
        gt=0,
        description=(
            "A BN layer fails when the mean over its channels of KL(serving || running), two Gaussians, exceeds this."
        ),
    )
    batch_rows: int = Field(
        8192, gt=0, description="Rows per forward pass of the check and of recalibration (memory bound)."
    )


class GateConfig(Strict):
    metrics: list[str] | None = Field(
        None,
        description=(
            "Metrics the promotion gate compares, `<task>/<metric>`; default: auc of every binary task and joint, "
            "mse of regression tasks, macro_auc of multiclass tasks."
        ),
    )
    tolerance: float = Field(
        0.002,
        ge=0,
        description=(
            "How much worse than the champion a metric may be (absolute) and still pass; "
            "~the day-to-day noise of AUC on 100k rows."
        ),
    )
    min_auc: float = Field(
        0.52,
        ge=0,
        le=1,
        description=(
            "Floor, for every challenger including the first champion: each gated AUC-like metric (auc, gauc, "
            "auc_unbiased, auc_entire_space, macro_auc, macro_auc_truth) on the gate's day must reach this (0.5 is "
            "a coin)."
        ),
    )
    max_calibration_factor: float = Field(
        3.0,
        gt=1,
        description=(
            "Floor: the calibration (sum of predictions / sum of labels) of each gated root binary task (ctr) on the "
            "gate's day must lie within [1/x, x]. Generous by default: a first model of a few hundred thousand rows "
            "still over-predicts ~2x (its output starts at p = 0.5)."
        ),
    )
    floor_z: float = Field(
        2.0,
        ge=0,
        description=(
            "A floor refuses only when the figure lies beyond it by more than this many standard errors of the "
            "gate's slice (AUC: Hanley & McNeil from its positives and negatives; calibration: 1/sqrt(positives)), "
            "so a small slice cannot condemn a sound model. 0 judges the raw figures."
        ),
    )
    max_loss_growth: float = Field(
        1.5,
        gt=0,
        description=(
            "Floor: the mean training loss over the job's last tenth of batches must not exceed this times its mean "
            "over the first tenth (a loss that climbed: logs sorted by label, a diverging learning rate). Not judged "
            "for a job that resumed mid-day (its attempt did not see the first tenth)."
        ),
    )
    days: int = Field(
        1,
        ge=1,
        description=(
            "Days the gate's slice pools: the newest this many days with logs that neither model has seen, scored "
            "together as one slice. 1 judges on the newest day; more gives a sparse task (conversions) enough "
            "positives to judge. The gate defers (exit 10) until that many such days have logs."
        ),
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str] | None) -> list[str] | None:
        for m in metrics or []:
            task, _, name = m.partition("/")
            if not task or name not in GATE_METRICS:
                raise ValueError(
                    f"gate metric `{m}` is not `<task>/<metric>` with metric one of {', '.join(GATE_METRICS)}"
                )
        return metrics


class MtrecConfig(_SpecFields):
    """The run spec: the model spec's keys (see `mtrec.spec`) and how to train, where, and how to
    track and judge it."""

    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    job: JobConfig = Field(default_factory=JobConfig, description="Paths and job settings.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    gate: GateConfig = Field(default_factory=GateConfig, description="The promotion gate (`mtrec promote`).")
    bn: BNCheckConfig = Field(
        default_factory=BNCheckConfig, description="BatchNorm statistics consistency check (`mtrec bn-check`)."
    )

    @model_validator(mode="before")
    @classmethod
    def _sampling_label(cls, data: Any) -> Any:
        """`train.sampling.label` left out: the first root binary task's label."""
        if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
            return data
        train = data.get("train") if isinstance(data.get("train"), dict) else {}
        sampling = train.get("sampling") if isinstance(train.get("sampling"), dict) else {}
        if sampling.get("label") is not None:
            return data
        roots = [
            t.get("label")
            for t in data.get("tasks") or []
            if isinstance(t, dict) and t.get("given") is None and data["labels"].get(t.get("label")) == "binary"
        ]
        if not roots:
            return data
        return {**data, "train": {**train, "sampling": {**sampling, "label": roots[0]}}}

    @model_validator(mode="after")
    def _check_run(self) -> MtrecConfig:
        sl = self.train.sampling.label
        if sl is None and self.train.sampling.odds_factor == 1:
            pass  # no root binary task and no sampling: nothing to sample on
        elif sl not in self.labels or self.labels[sl] != LabelKind.BINARY:
            raise ValueError(
                f"`train.sampling.label` is `{sl}`, not a binary label; use one of "
                f"{', '.join(k for k, v in self.labels.items() if v == LabelKind.BINARY)}"
            )
        if self.train.sampling.odds_factor != 1:
            if not any(t.label == sl and t.given is None for t in self.tasks):
                raise ValueError(
                    f"`train.sampling` changes the rate of `{sl}` but no root task (without `given`) predicts it, so "
                    "scores could not be corrected; sample on the root task's label"
                )
            others = [t.name for t in self.tasks if t.given is None and t.label != sl]
            if others:
                raise ValueError(
                    f"`train.sampling` on `{sl}` would skew root task(s) {', '.join(others)}, "
                    "whose scores mtrec cannot correct back; drop the sampling or train those tasks in another model"
                )
        if self.model.batch_norm and self.train.batch_size < 2:
            raise ValueError(
                f"`model.batch_norm: true` with `train.batch_size: {self.train.batch_size}`: BatchNorm needs at least "
                "2 rows per batch to train; raise the batch size or drop batch_norm"
            )
        parts = self.model.parts
        for part in self.train.freeze:
            if part not in parts:
                raise ValueError(
                    f"`train.freeze` names `{part}`, which `arch: {self.model.arch}` does not have; "
                    + (
                        f"use one of {', '.join(parts)}"
                        if parts
                        else "only models with a user part (dupn) can freeze one"
                    )
                )
        outputs = self.outputs()
        for m in self.gate.metrics or []:
            if m.partition("/")[0] not in outputs:
                raise ValueError(f"gate metric `{m}` names no task; use one of {', '.join(outputs)}")
        return self

    @property
    def spec(self) -> ModelSpec:
        """The model spec: what shapes the weights, and all models and data code may read."""
        return ModelSpec.model_construct(**{k: getattr(self, k) for k in SPEC_KEYS})

    def score_offsets(self) -> dict[str, float]:
        """Per task, the log-odds `train.sampling` added in training, subtracted when scoring: a
        model trained with negatives down-sampled at rate r and positives repeated k times learns
        odds k/r too high for the root task of the sampled label."""
        import math

        s = self.train.sampling
        if s.odds_factor == 1:
            return {}
        return {t.name: math.log(s.odds_factor) for t in self.tasks if t.given is None and t.label == s.label}

    def redacted(self) -> dict[str, Any]:
        """The config as JSON data for what others read (MLflow params and artifacts, checkpoint
        manifests): `job.storage_options` values whose key names a secret are replaced."""
        data = self.model_dump(mode="json")
        data["job"]["storage_options"] = _redact(data["job"]["storage_options"])
        return data

    def fingerprint(self) -> str:
        """Hash of everything that shapes the saved state: the model spec and the kind of each
        optimizer (not paths, not learning rates). A checkpoint loads only under an equal one."""
        return self.spec.shape_hash([self.train.embedding_optimizer.name.value, self.train.dense_optimizer.name.value])

    def training_settings(self) -> dict[str, Any]:
        """The `train` keys that change what training computes (learning rates, batch size, seed),
        without the resources it runs on (workers, CPUs, threads, buffers, checkpoint period,
        sharding types: a checkpoint reshards)."""
        # init_from, start_at_base_rate: a start, not a setting; epochs: how long a retrain ran, which the
        # nightlies that warm-start from it (one pass each) do not share (the job id tells retrains apart by it)
        settings = self.train.model_dump(
            mode="json", exclude=RESOURCE_KEYS | {"init_from", "epochs", "start_at_base_rate"}
        )
        if not settings["freeze"]:
            del settings["freeze"]  # as before the key existed: earlier checkpoints keep their fingerprint
        if settings["shuffle"] == ShuffleConfig().model_dump(mode="json"):
            del settings["shuffle"]  # likewise: a checkpoint from before shuffling warm-starts under the default
        elif settings["shuffle"]["user_runs"]:
            del settings["shuffle"]["user_runs"]  # likewise: as before the key existed
        return settings

    def training_fingerprint(self) -> str:
        """Hash of `training_settings()`: a warm start under another one needs --allow-config-change."""
        return hashlib.sha256(json.dumps(self.training_settings(), sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(
        self, logs: str | None = None, workdir: str | None = None, serving_logs: str | None = None
    ) -> MtrecConfig:
        """A copy with the CLI's overrides of `job` paths applied (`--logs`, `--workdir`, `--serving-logs`)."""
        paths = {"logs": logs, "workdir": workdir, "serving_logs": serving_logs}
        job = JobConfig.model_validate({**self.job.model_dump(), **{k: v for k, v in paths.items() if v}})
        return self.model_copy(update={"job": job})

    def gate_metrics(self) -> list[str]:
        """The metrics the promotion gate compares (`gate.metrics`, or the default per task)."""
        return list(self.gate.metrics) if self.gate.metrics else self.spec.default_gate_metrics()

    def with_train(self, **values: Any) -> MtrecConfig:
        """A copy with `train` keys replaced (CLI flags such as --workers), validated like the YAML."""
        data = self.model_dump(mode="json")
        data["train"].update(values)
        return parse_config(data, label="command-line train overrides")


# --------------------------------------------------------------------------------------------------
# loading


def example_path(name: str) -> Path:
    """Path of a shipped example config (`EXAMPLES`: ``esmm``, ``esm2``, ``mmoe``, ``esmm_seq``, ``dupn``)."""
    return Path(str(resources.files("mtrec.configs").joinpath(f"{name}.yaml")))


def load_config(source: str | Path, logs: str | None = None, workdir: str | None = None) -> MtrecConfig:
    """Load and validate a config.

    Args:
        source (str | Path): a YAML path or fsspec URL, or the name of a shipped example
            (``esmm``, ``esm2``, ``mmoe``).
        logs, workdir (str | None): the CLI's `--logs` / `--workdir` overrides.

    Returns:
        MtrecConfig: the validated config.

    Raises:
        ConfigError: one line naming the key, the value received and the fix.

    This process's fsspec file systems take the config's `job.storage_options` from then on (a
    job applies them again when it starts, `mtrec.jobs.protocol.check_stores`).
    """
    from mtrec.data.io import apply_storage_options

    data, label = read_config_dict(source)
    cfg = parse_config(data, label).with_overrides(logs=logs, workdir=workdir)
    apply_storage_options(cfg.job.storage_options)
    return cfg


def read_config_dict(source: str | Path) -> tuple[dict[str, Any], str]:
    """(the config file's keys as written, not validated; its file name): what `load_config`
    validates, for tools that change keys before validating (`set_key`, `mtrec tune`).

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping.
    """
    src = str(source)
    if src in EXAMPLES:
        src = str(example_path(src))
    label = Path(src).name
    try:
        import fsspec

        with fsspec.open(src, "r") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(
            f"config file `{src}` not found; pass --config PATH or one of the shipped examples: {', '.join(EXAMPLES)}"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"config {label}: not valid YAML{where} ({getattr(e, 'problem', e)}); fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {label}: the top level must be a mapping of keys (name, labels, features, ...), "
            f"got {type(data).__name__}"
        )
    return data, label


def parse_config(data: dict[str, Any], label: str = "config") -> MtrecConfig:
    """Validate a config given as a dict (already parsed YAML); see `load_config`."""
    return validate(MtrecConfig, data, label)


# --------------------------------------------------------------------------------------------------
# dotted keys: changing a config dict before it is validated (`mtrec tune`'s search space, bench --set)


def set_key(config: dict[str, Any], key: str, value: Any) -> int:
    """Set a dotted `key` of a config dict (parsed YAML, not validated yet) to `value`, in place.

    `*` stands for every item of a list (or every value of a mapping), a number for one list item;
    missing mappings on the way are created, so an unknown key is caught by `parse_config`
    afterwards with its usual one-line error (did you mean ...).

    Args:
        config (dict): the config's keys, as `read_config_dict` returns them.
        key (str): e.g. ``train.dense_optimizer.lr``, ``features.sparse.*.dim``, ``tasks.1.weight``.
        value: the new value (any YAML value: number, string, list, mapping).

    Returns:
        int: the number of places set (a `*` key sets one per item).

    Raises:
        ConfigError: the key runs through something that is not a mapping or list, or a `*` matches
            nothing.

    Example:
        >>> d = {"features": {"sparse": [{"name": "a", "dim": 16}, {"name": "b", "dim": 8}]}}
        >>> set_key(d, "features.sparse.*.dim", 4), [f["dim"] for f in d["features"]["sparse"]]
        (2, [4, 4])
    """
    places = key_places(config, key)
    for node, leaf in places:
        node[leaf] = copy.deepcopy(value)
    return len(places)


def apply_override(config: dict[str, Any], item: str) -> None:
    """``KEY=VALUE`` (a command line's ``--set``): `set_key` with VALUE read as YAML; a VALUE ``xN``
    multiplies the number each place holds by N (ints stay ints): ``features.sparse.*.hash_size=x8``.

    Raises:
        ConfigError: not ``KEY=VALUE``, a bad key (`set_key`), or ``xN`` where no number is set.
    """
    key, eq, text = item.partition("=")
    if not key or not eq:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.embedding_optimizer.lr=0.1")
    scale = re.fullmatch(r"x(\d+(?:\.\d*)?|\.\d+)", text.strip())
    if scale is None:
        set_key(config, key, yaml.safe_load(text))
        return
    factor = float(scale.group(1))
    for node, leaf in key_places(config, key):
        current = node.get(leaf) if isinstance(node, dict) else node[leaf]
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ConfigError(
                f"override {item!r}: {text} multiplies a number, but `{key}` holds {current!r} there; "
                "set the key to a value instead"
            )
        node[leaf] = int(current * factor) if isinstance(current, int) else current * factor


def key_places(config: dict[str, Any], key: str) -> list[tuple[Any, Any]]:
    """(container, key or index) of every place a dotted `key` names in `config` (see `set_key`);
    mappings missing on the way are created."""
    parts = key.split(".")
    if not key or any(not p for p in parts) or parts[-1] == "*":
        raise ConfigError(f"key `{key}`: expected a dotted config key such as train.dense_optimizer.lr")
    nodes: list[Any] = [config]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i]) or "(top level)"
        found: list[Any] = []
        for node in nodes:
            if part == "*":
                if not isinstance(node, (list, dict)) or not node:
                    raise ConfigError(
                        f"key `{key}`: `*` needs a non-empty list or mapping at `{where}`, which holds {node!r}; "
                        "name the key without `*`"
                    )
                found += list(node) if isinstance(node, list) else list(node.values())
            elif isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"key `{key}`: `{where}` is a list of {len(node)}; use an index 0..{len(node) - 1} or `*`"
                    )
                found.append((node, int(part)) if last else node[int(part)])
            elif isinstance(node, dict):
                if last:
                    found.append((node, part))
                else:
                    child = node.setdefault(part, {})
                    if child is None:
                        child = node[part] = {}
                    found.append(child)
            else:
                raise ConfigError(f"key `{key}`: `{where}` holds {node!r}, not a mapping or list; check the key")
        nodes = found
    return nodes
