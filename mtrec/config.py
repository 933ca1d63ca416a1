"""Typed, validated job configuration, loaded from one YAML file.

Every key is declared here with its type, default and a one-line description; an unknown key, a
wrong type or an inconsistent value (a task whose label is not declared, ...) fails at load with
one line naming the key, the value received and the fix. ``docs/configuration.md`` is generated
from these models (``python -m mtrec.config``) and a test keeps it in sync.

Example:
    >>> cfg = load_config("esmm")                      # a shipped example, or a path / fsspec URL
    >>> cfg.tasks[1].name, cfg.tasks[1].given
    ('cvr', 'ctr')
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from enum import Enum, StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtrec.errors import ConfigError

# The data contract's required columns (docs/data-contract.md). Labels and features add more.
ID_COLUMNS = ("user_id", "item_id")
POSITION_COLUMN = "position"
REQUIRED_LABELS = ("click", "conversion")
EXAMPLES = ("esmm", "esm2", "mmoe")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Pooling(StrEnum):
    SUM = "sum"
    MEAN = "mean"


class LabelKind(StrEnum):
    BINARY = "binary"
    REGRESSION = "regression"


class Arch(StrEnum):
    SHARED_BOTTOM = "shared_bottom"
    ESMM = "esmm"
    ESM2 = "esm2"
    MMOE = "mmoe"
    PLE = "ple"
    NAIVE_CVR = "naive_cvr"


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
# features and labels


class SparseFeature(_Strict):
    name: str = Field(description="Feature name (also the embedding table name).")
    column: str | None = Field(None, description="Log column holding the id(s); defaults to `name`.")
    hash_size: int = Field(gt=0, description="Rows of the embedding table; ids are hashed into it.")
    dim: int = Field(16, gt=0, description="Embedding dimension.")
    multi_hot: bool = Field(False, description="The column is a list of ids (e.g. item tags).")
    pooling: Pooling = Field(Pooling.SUM, description="How a multi-hot bag is pooled: sum or mean.")

    @property
    def source(self) -> str:
        return self.column or self.name


class DenseFeature(_Strict):
    name: str = Field(description="Feature name.")
    column: str | None = Field(None, description="Log column (float); defaults to `name`.")
    log1p: bool = Field(False, description="Apply sign(x)*log1p(|x|) first (heavy-tailed counts, prices).")

    @property
    def source(self) -> str:
        return self.column or self.name


class BiasFeature(_Strict):
    name: str = Field(description="Bias feature name (position, device, ...): shallow tower only.")
    column: str | None = Field(None, description="Log column (integer); defaults to `name`.")
    num_values: int = Field(gt=0, description="Values 0..num_values-1 get their own logit; larger ones share the last.")

    @property
    def source(self) -> str:
        return self.column or self.name


class FeaturesConfig(_Strict):
    sparse: list[SparseFeature] = Field(min_length=1, description="Categorical id features (embedding tables).")
    dense: list[DenseFeature] = Field(default_factory=list, description="Float features, concatenated to the embeddings.")
    bias: list[BiasFeature] = Field(default_factory=list, description="Features seen only by the shallow tower in training (absent at serving).")

    @model_validator(mode="after")
    def _unique_names(self) -> FeaturesConfig:
        seen: set[str] = set()
        for f in [*self.sparse, *self.dense, *self.bias]:
            if f.name in seen:
                raise ValueError(f"feature name `{f.name}` is declared twice; give each feature a unique name")
            seen.add(f.name)
        return self


class TaskConfig(_Strict):
    name: str = Field(description="Task name (ctr, cvr, ...): keys of the model's outputs and metrics.")
    label: str = Field(description="Label column; must be declared under `labels`.")
    given: str | None = Field(None, description="Name of the task this one is conditioned on (cvr is `given: ctr`).")
    weight: float = Field(1.0, ge=0, description="Weight of this task's loss.")
    joint: str | None = Field(None, description="Name of the entire-space prediction p(given) x p(this), e.g. ctcvr; default `<given>_<name>`. Only with `given`.")
    log1p: bool = Field(False, description="Regression only: the model predicts log1p(label) (heavy-tailed targets such as watch time).")

    @property
    def joint_name(self) -> str | None:
        return None if self.given is None else (self.joint or f"{self.given}_{self.name}")


# --------------------------------------------------------------------------------------------------
# models


class ShallowTowerConfig(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [16], description="Hidden layer sizes over the bias features.")
    dim: int = Field(8, gt=0, description="Embedding dimension of each bias feature value.")
    feature_dropout: float = Field(0.1, ge=0, lt=1, description="Probability a row's bias features are dropped in training (YouTube paper), so the main towers cannot lean on them.")
    apply_to: list[str] | None = Field(None, description="Tasks whose logit gets the bias logit; default: the root (click) task only.")


class _ModelBase(_Strict):
    tower: list[int] = Field(default_factory=lambda: [256, 128, 64], description="Hidden sizes of each task tower.")
    batch_norm: bool = Field(False, description="BatchNorm1d after each hidden layer of towers/experts (see docs/bn-consistency.md).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")
    shallow_tower: ShallowTowerConfig | None = Field(None, description="Position-bias shallow tower (training only); omit for none.")


class SharedBottomModel(_ModelBase):
    arch: Literal[Arch.SHARED_BOTTOM] = Field(description="Model architecture.")
    bottom: list[int] = Field(default_factory=lambda: [256, 128], description="Hidden sizes of the shared bottom MLP.")


class EsmmModel(_ModelBase):
    arch: Literal[Arch.ESMM] = Field(description="Model architecture.")


class Esm2Model(_ModelBase):
    arch: Literal[Arch.ESM2] = Field(description="Model architecture.")
    daction_task: str = Field("dar", description="Task whose label is the deterministic action (add-to-cart / wishlist).")


class NaiveCvrModel(_ModelBase):
    arch: Literal[Arch.NAIVE_CVR] = Field(description="Model architecture.")


class MmoeModel(_ModelBase):
    arch: Literal[Arch.MMOE] = Field(description="Model architecture.")
    num_experts: int = Field(4, gt=0, description="Number of shared experts.")
    expert: list[int] = Field(default_factory=lambda: [256, 128], description="Hidden sizes of each expert MLP.")


class PleModel(_ModelBase):
    arch: Literal[Arch.PLE] = Field(description="Model architecture.")
    levels: int = Field(2, ge=1, description="Extraction levels.")
    shared_experts: int = Field(2, gt=0, description="Shared experts per level.")
    task_experts: int = Field(1, gt=0, description="Task-specific experts per task per level.")
    expert: list[int] = Field(default_factory=lambda: [128], description="Hidden sizes of each expert MLP.")


ModelConfig = Annotated[
    Union[SharedBottomModel, EsmmModel, Esm2Model, NaiveCvrModel, MmoeModel, PleModel],  # noqa: UP007
    Field(discriminator="arch"),
]


# --------------------------------------------------------------------------------------------------
# training and job


class DenseOptimizerConfig(_Strict):
    name: DenseOptimizer = Field(DenseOptimizer.ADAM, description="Optimizer of the dense (data-parallel) parameters.")
    lr: float = Field(1e-3, gt=0, description="Learning rate.")


class EmbeddingOptimizerConfig(_Strict):
    name: EmbeddingOptimizer = Field(EmbeddingOptimizer.ROWWISE_ADAGRAD, description="TorchRec fused optimizer of the tables (rowwise_adagrad works on CPU and GPU).")
    lr: float = Field(0.05, gt=0, description="Learning rate.")


class SamplingConfig(_Strict):
    label: str = Field("click", description="Binary label that defines positives and negatives for sampling.")
    negative_rate: float = Field(1.0, gt=0, le=1, description="Fraction of negative rows kept (1 = no down-sampling); scores are corrected back at serving.")
    positive_repeat: int = Field(1, ge=1, description="Times each positive row is trained (1 = no over-sampling); scores are corrected back at serving.")

    @property
    def odds_factor(self) -> float:
        """How much sampling multiplies the odds of a positive: positive_repeat / negative_rate."""
        return self.positive_repeat / self.negative_rate


class TrainConfig(_Strict):
    batch_size: int = Field(2048, gt=0, description="Rows per batch per worker.")
    seed: int = Field(0, description="Seed of parameter init and of any sampling.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (= torch.distributed world size).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves (fractions leave room for Ray Data on small boxes).")
    placement: Placement = Field(Placement.PACK, description="Where Ray puts the workers: pack (fewest nodes) or spread (one per node where possible).")
    torch_threads: int = Field(0, ge=0, description="Torch intra-op threads per worker; 0 = the node's cores divided by the workers on it (Ray would otherwise pin 1).")
    sharding_types: list[ShardingType] = Field(default_factory=lambda: [ShardingType.TABLE_WISE], min_length=1, description="Sharding types the planner may use (CPU: table_wise, column_wise, data_parallel).")
    dense_optimizer: DenseOptimizerConfig = Field(default_factory=DenseOptimizerConfig, description="Dense optimizer.")
    embedding_optimizer: EmbeddingOptimizerConfig = Field(default_factory=EmbeddingOptimizerConfig, description="Embedding (fused) optimizer.")
    ingest_buffer_mb: int = Field(512, gt=0, description="Object-store memory Ray Data may fill ahead of the workers: bounds the job's memory whatever the size of the range.")
    checkpoint_every_batches: int = Field(500, gt=0, description="Intra-day checkpoint period in steps: a failed job (or a restarted worker) resumes from the newest one instead of restarting the day.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts Ray Train may make within one job (each resumes from the newest intra-day checkpoint); 0 = fail at the first worker failure.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Training-time sampling (negative down-sampling, positive over-sampling), deterministic per row.")


RESOURCE_KEYS = {"num_workers", "cpus_per_worker", "placement", "torch_threads", "ingest_buffer_mb",
                 "checkpoint_every_batches", "max_failures", "sharding_types"}


class JobConfig(_Strict):
    logs: str = Field("./world", description="Logs root (fsspec URL or path) holding dt=YYYY-MM-DD/*.parquet; a relative path is taken from the directory the command runs in.")
    workdir: str = Field("./mtrec-work", description="Where checkpoints, the MLflow store, quarantine and reports go; a relative path is taken from the directory the command runs in.")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="A day fails validation when more than this fraction of rows is quarantined.")
    timezone: str = Field("UTC", description="Timezone in which `--date yesterday` is resolved.")

    @field_validator("logs", "workdir")
    @classmethod
    def _absolute(cls, url: str) -> str:
        return absolute_url(url)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder of zones, e.g. "Europe"
            raise ValueError(f"unknown timezone {name!r}; use an IANA name such as UTC, Europe/Berlin, America/New_York") from None
        return name


def absolute_url(url: str) -> str:
    """A relative local path made absolute against the current directory (where the config is
    loaded): Ray workers run in other directories, so every process must see the same path.
    URLs with a scheme (s3://, memory://, file://...) are left as they are."""
    if "://" in url or not url:
        return url
    return str(Path(url).expanduser().absolute())


class TrackingConfig(_Strict):
    enabled: bool = Field(True, description="Record every job in MLflow (run, metrics, artifacts, model, registry version); false: train and publish checkpoints only.")
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db (embedded, no server).")
    artifacts: str | None = Field(None, description="Artifact root of a new experiment in the embedded store; default <workdir>/mlartifacts (a server uses its own).")
    retries: int = Field(4, ge=0, description="Retries of an MLflow call that fails to reach the store, with exponential backoff; then the job fails naming the URI.")
    backoff_s: float = Field(1.0, ge=0, description="First wait between retries, doubled after each (1 s: a restarting server has ~15 s to come back).")
    timeout_s: int = Field(30, gt=0, description="Timeout of one HTTP request to an MLflow server.")

    @field_validator("artifacts")
    @classmethod
    def _absolute(cls, url: str | None) -> str | None:
        return absolute_url(url) if url else url


GATE_METRICS = {"auc": 1, "gauc": 1, "pearson": 1, "auc_unbiased": 1, "auc_entire_space": 1,  # higher is better
                "ne": -1, "log_loss": -1, "mse": -1, "calibration": 0}  # lower is better; 0: |x - 1| lower is better


class BNCheckConfig(_Strict):
    max_smd: float = Field(0.25, gt=0, description="A BN layer fails when the mean over its channels of |running mean - serving mean| / serving std exceeds this.")
    max_abs_log_var_ratio: float = Field(0.5, gt=0, description="A BN layer fails when the mean over its channels of |log(running var / serving var)| exceeds this.")
    max_kl: float = Field(0.1, gt=0, description="A BN layer fails when the mean over its channels of KL(serving || running), two Gaussians, exceeds this.")
    batch_rows: int = Field(8192, gt=0, description="Rows per forward pass of the check and of recalibration (memory bound).")


class GateConfig(_Strict):
    metrics: list[str] | None = Field(None, description="Metrics the promotion gate compares, `<task>/<metric>`; default: auc of every binary task and joint, mse of regression tasks.")
    tolerance: float = Field(0.002, ge=0, description="How much worse than the champion a metric may be (absolute) and still pass; ~the day-to-day noise of AUC on 100k rows.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str] | None) -> list[str] | None:
        for m in metrics or []:
            task, _, name = m.partition("/")
            if not task or name not in GATE_METRICS:
                raise ValueError(f"gate metric `{m}` is not `<task>/<metric>` with metric one of {', '.join(GATE_METRICS)}")
        return metrics


class MtrecConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Model name: experiment, registered model and checkpoint folder.")
    labels: dict[str, LabelKind] = Field(description="Label columns in the logs and their kind (binary or regression); must include click and conversion.")
    features: FeaturesConfig = Field(description="Feature columns.")
    tasks: list[TaskConfig] = Field(min_length=1, description="Tasks the model predicts.")
    model: ModelConfig = Field(description="Model architecture and sizes; `arch` selects the other keys.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    job: JobConfig = Field(default_factory=JobConfig, description="Paths and job settings.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    gate: GateConfig = Field(default_factory=GateConfig, description="The promotion gate (`mtrec promote`).")
    bn: BNCheckConfig = Field(default_factory=BNCheckConfig, description="BatchNorm statistics consistency check (`mtrec bn-check`).")

    @field_validator("labels")
    @classmethod
    def _required_labels(cls, labels: dict[str, LabelKind]) -> dict[str, LabelKind]:
        for col in REQUIRED_LABELS:
            if labels.get(col) != LabelKind.BINARY:
                raise ValueError(f"the data contract requires binary label `{col}`; add `{col}: binary` under `labels`")
        return labels

    @model_validator(mode="after")
    def _check_tasks(self) -> MtrecConfig:
        names = [t.name for t in self.tasks]
        for t in self.tasks:
            if names.count(t.name) > 1:
                raise ValueError(f"task name `{t.name}` is used twice; give each task a unique name")
            if t.label not in self.labels:
                declared = ", ".join(self.labels)
                raise ValueError(
                    f"task `{t.name}`: label `{t.label}` is not declared under `labels` (declared: {declared}); "
                    f"add `{t.label}: binary` (or regression) under `labels` or use a declared label"
                )
            if t.joint is not None and t.given is None:
                raise ValueError(f"task `{t.name}`: `joint: {t.joint}` needs `given` (the joint is p(given) x p({t.name}))")
            if t.log1p and self.labels[t.label] != LabelKind.REGRESSION:
                raise ValueError(f"task `{t.name}`: `log1p: true` is for regression labels, `{t.label}` is binary")
            if t.given is not None:
                if t.given not in names:
                    raise ValueError(f"task `{t.name}`: `given: {t.given}` names no task; use one of {', '.join(names)}")
                parent = self.task(t.given)
                if self.labels[parent.label] != LabelKind.BINARY:
                    raise ValueError(f"task `{t.name}`: `given: {t.given}` must name a binary task, `{t.given}` is regression")
                if parent.given is not None:
                    raise ValueError(f"task `{t.name}`: chains are one level deep (`{t.given}` is itself given `{parent.given}`)")
        outputs = names + [t.joint_name for t in self.tasks if t.joint_name]
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"task and joint names must be distinct, got {', '.join(outputs)}; rename a `joint`")
        sl = self.train.sampling.label
        if sl not in self.labels or self.labels[sl] != LabelKind.BINARY:
            raise ValueError(f"`train.sampling.label` is `{sl}`, not a binary label; use one of "
                             f"{', '.join(k for k, v in self.labels.items() if v == LabelKind.BINARY)}")
        if self.train.sampling.odds_factor != 1:
            if not any(t.label == sl and t.given is None for t in self.tasks):
                raise ValueError(f"`train.sampling` changes the rate of `{sl}` but no root task (without `given`) predicts it, so "
                                 "scores could not be corrected; sample on the root task's label")
            others = [t.name for t in self.tasks if t.given is None and t.label != sl]
            if others:
                raise ValueError(f"`train.sampling` on `{sl}` would skew root task(s) {', '.join(others)}, whose scores mtrec cannot "
                                 "correct back; drop the sampling or train those tasks in another model")
        for m in self.gate.metrics or []:
            if m.partition("/")[0] not in outputs:
                raise ValueError(f"gate metric `{m}` names no task; use one of {', '.join(outputs)}")
        st = self.model.shallow_tower
        if st is not None:
            if not self.features.bias:
                raise ValueError("`model.shallow_tower` is set but `features.bias` is empty; declare bias features (e.g. position) or drop the shallow tower")
            for name in st.apply_to or []:
                if name not in names:
                    raise ValueError(f"`model.shallow_tower.apply_to` names unknown task `{name}`; use one of {', '.join(names)}")
        if isinstance(self.model, Esm2Model):
            dt_name = self.model.daction_task
            if dt_name not in names:
                raise ValueError(f"`model.daction_task` is `{dt_name}` but no task has that name; use one of {', '.join(names)}")
            dar = self.task(dt_name)
            if dar.given is None or self.labels[dar.label] != LabelKind.BINARY:
                raise ValueError(f"`model.daction_task` `{dt_name}` must be a binary task `given` the click task (see mtrec/configs/esm2.yaml)")
            buy = [t.name for t in self.tasks if t.given == dar.given and t.name != dt_name and self.labels[t.label] == LabelKind.BINARY]
            if len(buy) != 1:
                raise ValueError(f"esm2 needs exactly one purchase task given `{dar.given}` besides `{dt_name}`, found {buy or 'none'}; see mtrec/configs/esm2.yaml")
            if st is not None and buy[0] in (st.apply_to or []):
                raise ValueError(f"`model.shallow_tower.apply_to` names `{buy[0]}`, whose ESM2 probability is composed (no logit of its own); apply it to `{dar.given}`")
        return self

    # ---- helpers used across the package -------------------------------------------------------
    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def label_kind(self, task: TaskConfig) -> LabelKind:
        return self.labels[task.label]

    def column_roles(self) -> dict[str, tuple[str, str]]:
        """Every column a day's logs must have, in order, as column -> (role, what requires it).

        Roles: ``id``, ``ids`` (multi-hot), ``position``, ``label`` (binary), ``regression``,
        ``dense``, ``bias``. Labels take precedence over a feature reading the same column; the
        schema check and the training stream's cast both read this one map.
        """
        roles = {c: ("id", "the data contract") for c in ID_COLUMNS}
        roles[POSITION_COLUMN] = ("position", "the data contract")
        for col, kind in self.labels.items():
            roles[col] = ("label" if kind == LabelKind.BINARY else "regression", "`labels`")
        for f in self.features.sparse:
            role, by = ("ids", f"`features.sparse` ({f.name}, multi_hot: true)") if f.multi_hot else ("id", f"`features.sparse` ({f.name})")
            roles.setdefault(f.source, (role, by))
        for f in self.features.dense:
            roles.setdefault(f.source, ("dense", f"`features.dense` ({f.name})"))
        for f in self.features.bias:
            roles.setdefault(f.source, ("bias", f"`features.bias` ({f.name})"))
        return roles

    def required_columns(self) -> list[str]:
        """Every column a day's logs must have for this config (contract + labels + features)."""
        return list(self.column_roles())

    def fingerprint(self) -> str:
        """Hash of everything that shapes the saved state: the model's parameters and the kind of
        each optimizer (not paths, not learning rates). A checkpoint loads only under an equal one."""
        shape = self.model_dump(mode="json", include={"name", "labels", "features", "tasks", "model"})
        shape["optimizers"] = [self.train.embedding_optimizer.name.value, self.train.dense_optimizer.name.value]
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]

    def training_settings(self) -> dict[str, Any]:
        """The `train` keys that change what training computes (learning rates, batch size, seed),
        without the resources it runs on (workers, CPUs, threads, buffers, checkpoint period,
        sharding types: a checkpoint reshards)."""
        return self.train.model_dump(mode="json", exclude=RESOURCE_KEYS)

    def training_fingerprint(self) -> str:
        """Hash of `training_settings()`: a warm start under another one needs --allow-config-change."""
        return hashlib.sha256(json.dumps(self.training_settings(), sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, logs: str | None = None, workdir: str | None = None) -> MtrecConfig:
        """A copy with the CLI's common overrides applied (`--logs`, `--workdir`)."""
        job = self.job.model_copy(update={k: absolute_url(v) for k, v in {"logs": logs, "workdir": workdir}.items() if v})
        return self.model_copy(update={"job": job})

    def gate_metrics(self) -> list[str]:
        """The metrics the promotion gate compares (`gate.metrics`, or the default per task)."""
        if self.gate.metrics:
            return list(self.gate.metrics)
        out = []
        for t in self.tasks:
            if self.label_kind(t) == LabelKind.REGRESSION:
                out.append(f"{t.name}/mse")
            else:
                out += [f"{t.name}/auc"] + ([f"{t.joint_name}/auc"] if t.joint_name else [])
        return out

    def with_train(self, **values: Any) -> MtrecConfig:
        """A copy with `train` keys replaced (CLI flags such as --workers), validated like the YAML."""
        data = self.model_dump(mode="json")
        data["train"].update(values)
        return parse_config(data, label="command-line train overrides")


# --------------------------------------------------------------------------------------------------
# loading and error messages


def example_path(name: str) -> Path:
    """Path of a shipped example config (``esmm``, ``esm2``, ``mmoe``)."""
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
        raise ConfigError(f"config {label}: not valid YAML{where} ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {label}: the top level must be a mapping of keys (name, labels, features, ...), got {type(data).__name__}")
    return parse_config(data, label).with_overrides(logs=logs, workdir=workdir)


def parse_config(data: dict[str, Any], label: str = "config") -> MtrecConfig:
    """Validate a config given as a dict (already parsed YAML); see `load_config`."""
    try:
        return MtrecConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, label)) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic puts the discriminator value into the location: ('model', 'esmm', 'tower') -> model.tower
    arch_values = {a.value for a in Arch} | {f"Literal[{a!s}]" for a in Arch}
    return tuple(p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "model" and p in arch_values))


def _model_at(loc: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The config model class that owns the last key of `loc` (for listing allowed keys)."""
    cls: Any = MtrecConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        if part == "model":
            arch = data.get("model", {}).get("arch") if isinstance(data, dict) else None
            cls = {m.model_fields["arch"].annotation.__args__[0].value: m for m in _ARCH_MODELS}.get(arch)
            continue
        cls = _unwrap(ann)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    """list[X] -> X, X | None -> X."""
    for _ in range(3):
        origin = typing.get_origin(ann)
        if origin in (list, dict):
            ann = typing.get_args(ann)[-1]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0] if len(args) == 1 else ann
            if len(args) != 1:
                break
        else:
            break
    return ann


def _one_line(err: ValidationError, label: str) -> str:
    errors = err.errors()
    first = errors[0]
    loc = _strip_union_tags(tuple(first["loc"]))
    key = _dotted(loc)
    more = f" (+{len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    value = first.get("input")
    kind = first["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc, _root_input(err))
        allowed = sorted(owner.model_fields) if owner else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{guess[0]}`? " if guess else ""
        allowed_txt = f"allowed keys here: {', '.join(allowed)}; " if allowed else ""
        return f"config {label}: unknown key `{key}`; {hint}{allowed_txt}remove or rename it{more}"
    if kind == "missing":
        return f"config {label}: missing required key `{key}`; add it (see docs/configuration.md){more}"
    if kind == "union_tag_not_found":
        return f"config {label}: missing required key `{key}.arch`; use one of {', '.join(a.value for a in Arch)}{more}"
    if kind == "union_tag_invalid":
        choices = ", ".join(a.value for a in Arch)
        got = first.get("ctx", {}).get("tag", value)
        return f"config {label}: `{key}.arch` is {got!r}; use one of {choices}{more}"
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        where = f"`{key}`: " if loc else ""
        return f"config {label}: {where}{msg}{more}"
    return f"config {label}: `{key}` got {_short(value)} ({msg}); fix the value (see docs/configuration.md){more}"


def _root_input(err: ValidationError) -> Any:
    # ValidationError does not keep the root input; the owner lookup only needs `model.arch`.
    for e in err.errors():
        if tuple(e["loc"][:1]) == ("model",) and isinstance(e.get("input"), dict) and "arch" in e["input"]:
            return {"model": e["input"]}
    for e in err.errors():
        loc = e["loc"]
        if len(loc) >= 2 and loc[0] == "model" and loc[1] in {a.value for a in Arch}:
            return {"model": {"arch": loc[1]}}
    return {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ARCH_MODELS = (SharedBottomModel, EsmmModel, Esm2Model, NaiveCvrModel, MmoeModel, PleModel)


# --------------------------------------------------------------------------------------------------
# reference documentation (docs/configuration.md is this function's output)


def reference_markdown() -> str:
    """Every config key with its type, default and description, as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m mtrec.config > docs/configuration.md`; a test keeps it in sync. -->",
        "",
        "One YAML file configures a model and its jobs. Unknown keys are errors. Shipped examples:",
        "`mtrec/configs/esmm.yaml`, `esm2.yaml`, `mmoe.yaml` (use `--config esmm` to refer to one).",
        "CLI overrides: `--logs` sets `job.logs`, `--workdir` sets `job.workdir`.",
        "",
    ]

    done: set[str] = set()

    def section(title: str, cls: type[BaseModel], prefix: str) -> None:
        if title in done:  # e.g. model.shallow_tower, shared by every arch
            return
        done.add(title)
        lines.extend([f"## `{title}`", "", "| key | type | default | description |", "|---|---|---|---|"])
        nested: list[tuple[str, type[BaseModel], str]] = []
        for name, field in cls.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            sub = _unwrap(ann)
            lines.append(f"| `{key}` | {_type_name(ann)} | {_default(field)} | {field.description or ''} |")
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                is_list = typing.get_origin(ann) is list
                nested.append((f"{key}[]" if is_list else key, sub, f"{key}[]." if is_list else f"{key}."))
        lines.append("")
        for t, c, p in nested:
            section(t, c, p)

    section("(top level)", MtrecConfig, "")
    for m in _ARCH_MODELS:
        arch = m.model_fields["arch"].annotation.__args__[0].value
        section(f"model (arch: {arch})", m, "model.")
    return "\n".join(lines).rstrip() + "\n"


def _type_name(ann: Any) -> str:
    if isinstance(ann, type) and issubclass(ann, Enum):
        return " \\| ".join(m.value for m in ann)
    if isinstance(ann, type):
        return ann.__name__ if not issubclass(ann, BaseModel) else "mapping"
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is Literal:
        return " \\| ".join(str(getattr(a, "value", a)) for a in args)
    if origin in (Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        if all(isinstance(p, type) and issubclass(p, BaseModel) for p in parts) and len(parts) > 1:
            return "mapping (by `arch`)"
        return " or ".join(_type_name(p) for p in parts) + (" or null" if type(None) in args else "")
    if origin is Annotated:
        return _type_name(args[0])
    return str(ann)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list):
        value = [getattr(v, "value", v) for v in value]
    return f"`{json.dumps(value)}`"


def reference_keys() -> set[str]:
    """Every documented key path (as in the reference tables), for the docs-sync test."""
    return {line.split("`")[1] for line in reference_markdown().splitlines() if line.startswith("| `")}


if __name__ == "__main__":
    print(reference_markdown(), end="")
