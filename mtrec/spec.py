"""The model spec: everything that shapes a model's weights and what it reads and returns.

A `ModelSpec` is the model's name, its labels, its features, its tasks and its architecture. It is
saved inside every checkpoint manifest and every served artifact, and it is all that models,
batch conversion, the data contract's row rules and the served model read: paths, training,
tracking and gate settings are the run spec (`mtrec.config.MtrecConfig`), which never reaches
them. An architecture is declared in one place: its config class below, listed in
`ARCH_CONFIGS`, names its model class and carries its own rules (`check`).

Example:
    >>> spec = load_config("esmm").spec
    >>> spec.task("cvr").given, spec.outputs()
    ('ctr', ['ctr', 'cvr', 'ctr_cvr'])
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The data contract's own columns (docs/data-contract.md): required when a feature reads them
# (ids) or a bias feature does (position); `columns:` says where a log keeps them.
ID_COLUMNS = ("user_id", "item_id")
POSITION_COLUMN = "position"


class Strict(BaseModel):
    """Unknown keys are errors; values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Pooling(StrEnum):
    SUM = "sum"
    MEAN = "mean"


class LabelKind(StrEnum):
    BINARY = "binary"
    REGRESSION = "regression"
    MULTICLASS = "multiclass"  # an integer class 0..K-1; its tasks say K (`classes`)


# --------------------------------------------------------------------------------------------------
# features and labels


class _FromColumn(Strict):
    """A feature read from the log column `column`, or the one named like the feature."""

    name: str
    column: str | None = None

    @property
    def source(self) -> str:
        return self.column or self.name


class FeatureKind(StrEnum):
    """What a feature column holds; `mtrec.data.kinds` defines, once per kind, how such a column is
    typed, checked, converted to model inputs and padded."""

    ID = "id"  # one id per row (a null is an empty bag)
    MULTI_HOT = "multi_hot"  # a list of ids, pooled into one vector
    SEQUENCE = "sequence"  # an ordered list of ids, one vector per element (a sequence group's column)
    DENSE = "dense"  # one number
    BIAS = "bias"  # a small integer seen only by the shallow tower


def _check_dim(dim: int) -> int:
    if dim % 4:  # TorchRec's fused (FBGEMM) tables assert it inside the training job otherwise
        raise ValueError(
            f"`dim: {dim}` is not a multiple of 4, which FBGEMM's embedding kernels need; "
            f"use {' or '.join(str(d) for d in (dim // 4 * 4, dim // 4 * 4 + 4) if d >= 4)}"
        )
    return dim


class _Embedded(_FromColumn):
    """A feature looked up in an embedding table: its own (`hash_size` x `dim`, named like the
    feature) or, with `table`, another feature's, whose weights it then shares."""

    table: str | None = Field(
        None,
        description="Embed with the table of the feature of this name (shared weights, e.g. `hist_item_id` -> "
        "`item_id`); omit `hash_size` and `dim` then.",
    )
    hash_size: int | None = Field(None, gt=0, description="Rows of the embedding table; ids are hashed into it.")
    dim: int | None = Field(
        None,
        gt=0,
        description="Embedding dimension, 16 if omitted; a multiple of 4 (FBGEMM's embedding kernels need it). "
        "Omitted with `table`.",
    )

    @field_validator("dim")
    @classmethod
    def _kernel_dim(cls, dim: int | None) -> int | None:
        return dim if dim is None else _check_dim(dim)

    @model_validator(mode="before")
    @classmethod
    def _default_dim(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("table") is None and data.get("dim") is None:
            return {**data, "dim": 16}  # a table of its own; a shared one's width is its owner's
        return data

    @model_validator(mode="after")
    def _own_or_shared(self) -> _Embedded:
        if self.table is None and self.hash_size is None:
            raise ValueError(
                f"feature `{self.name}` needs `hash_size` (rows of its embedding table), or `table` naming the "
                "feature whose table it shares"
            )
        if self.table is not None:
            given = [k for k in ("hash_size", "dim") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"feature `{self.name}` shares the table of `{self.table}` and takes its hash_size and dim; "
                    f"remove {' and '.join(f'`{k}`' for k in given)}"
                )
        return self

    @property
    def table_name(self) -> str:
        """The embedding table this feature is looked up in."""
        return self.table or self.name


class SparseFeature(_Embedded):
    name: str = Field(description="Feature name (also its embedding table's name, unless `table` is set).")
    column: str | None = Field(None, description="Log column holding the id(s); defaults to `name`.")
    multi_hot: bool = Field(False, description="The column is a list of ids (e.g. item tags), pooled into one vector.")
    pooling: Pooling = Field(Pooling.SUM, description="How a multi-hot bag is pooled: sum or mean.")
    fill: int | str | None = Field(
        None,
        description="Id a null entry (a null list, for multi_hot) takes, in training and serving alike, e.g. "
        "`unknown`; omit to embed a null as an empty bag (a zero vector). The contract columns `user_id` and "
        "`item_id` are never null (`null_id`).",
    )

    @property
    def kind(self) -> FeatureKind:
        return FeatureKind.MULTI_HOT if self.multi_hot else FeatureKind.ID


class SequenceFeature(_Embedded):
    name: str = Field(description="Feature name: one column of the sequence group (e.g. `hist_item_id`).")
    column: str | None = Field(None, description="Log column (a list of ids in the group's `order`); default `name`.")

    kind: ClassVar[FeatureKind] = FeatureKind.SEQUENCE


class SequenceOrder(StrEnum):
    NEWEST_LAST = "newest_last"
    NEWEST_FIRST = "newest_first"


class SequenceGroup(Strict):
    """One behaviour sequence: parallel list columns of equal length in every row, element k of
    each describing the same past behaviour (its item, category, type, age, ...)."""

    name: str = Field(description="Group name (e.g. `hist`): the key of the sequence in the model.")
    max_len: int = Field(gt=0, description="Behaviours kept per row: the newest `max_len`; longer lists are truncated.")
    order: SequenceOrder = Field(
        SequenceOrder.NEWEST_LAST,
        description="Order of the lists in the logs: `newest_last` (appended in time order) or `newest_first`. "
        "Models always see the oldest first.",
    )
    pooling: Pooling = Field(
        Pooling.MEAN,
        description="How an architecture without a sequence encoder reads the group: the per-behaviour "
        "vectors (the group's embeddings side by side) pooled over the sequence, masked.",
    )
    features: list[SequenceFeature] = Field(min_length=1, description="The group's list columns.")


class DenseFeature(_FromColumn):
    name: str = Field(description="Feature name.")
    column: str | None = Field(None, description="Log column (float); defaults to `name`.")
    log1p: bool = Field(False, description="Apply sign(x)*log1p(|x|) first (heavy-tailed counts, prices).")
    kind: ClassVar[FeatureKind] = FeatureKind.DENSE
    fill: float | None = Field(
        None,
        description="Value a null or NaN entry takes (before log1p), in training and serving alike; "
        "omit to quarantine such a row (`bad_feature:<column>`). An infinite value is quarantined either way.",
    )
    missing_indicator: bool = Field(
        False,
        description="Also give the model a 0/1 input saying the value was missing (null or NaN) and took `fill`, "
        "so it can tell a filled value from a real one. Needs `fill`.",
    )

    @model_validator(mode="after")
    def _indicator_needs_fill(self) -> DenseFeature:
        if self.missing_indicator and self.fill is None:
            raise ValueError(
                f"dense feature `{self.name}`: `missing_indicator: true` needs `fill` (the value a missing entry "
                "takes); without it a missing value quarantines the row"
            )
        return self


class BiasFeature(_FromColumn):
    name: str = Field(description="Bias feature name (position, device, ...): shallow tower only.")
    column: str | None = Field(None, description="Log column (integer); defaults to `name`.")
    num_values: int = Field(gt=0, description="Values 0..num_values-1 get their own logit; larger ones share the last.")
    kind: ClassVar[FeatureKind] = FeatureKind.BIAS


@dataclass(frozen=True)
class Table:
    """One embedding table: its rows and width, the features looked up in it (the owner first) and
    whether a sequence feature reads it (then it lives in an unpooled collection; docs/models.md)."""

    name: str
    hash_size: int
    dim: int
    features: tuple[str, ...]
    sequence: bool


class FeaturesConfig(Strict):
    sparse: list[SparseFeature] = Field(min_length=1, description="Categorical id features (embedding tables).")
    sequences: list[SequenceGroup] = Field(
        default_factory=list,
        description="Behaviour sequences: groups of parallel list columns (docs/data-contract.md#sequences).",
    )
    dense: list[DenseFeature] = Field(
        default_factory=list, description="Float features, concatenated to the embeddings."
    )
    bias: list[BiasFeature] = Field(
        default_factory=list, description="Features seen only by the shallow tower in training (absent at serving)."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> FeaturesConfig:
        seen: set[str] = set()
        for f in [*self.sparse, *self.sequence_features(), *self.dense, *self.bias]:
            if f.name in seen:
                raise ValueError(f"feature name `{f.name}` is declared twice; give each feature a unique name")
            seen.add(f.name)
        groups = [g.name for g in self.sequences]
        for g in self.sequences:
            if groups.count(g.name) > 1:
                raise ValueError(f"sequence group name `{g.name}` is used twice; give each group a unique name")
        owners = {f.name for f in self.embedded() if f.table is None}
        for f in self.embedded():
            if f.table is not None and f.table not in owners:
                shared = [x.name for x in self.embedded() if x.table is not None]
                hint = (
                    f"`{f.table}` itself shares a table; name the feature that owns it"
                    if f.table in shared
                    else f"no feature named `{f.table}` has a table of its own; use one of {', '.join(sorted(owners))}"
                )
                raise ValueError(f"feature `{f.name}`: `table: {f.table}`: {hint}")
        for t in self.tables().values():
            bags = self._bag_poolings(t.name)
            if len(bags) > 1 and not t.sequence:
                raise ValueError(
                    f"the multi-hot features sharing table `{t.name}` pool differently ({', '.join(sorted(bags))}); "
                    "a pooled table has one pooling: give them the same `pooling`"
                )
        return self

    def sequence_features(self) -> list[SequenceFeature]:
        return [f for g in self.sequences for f in g.features]

    def dense_inputs(self) -> list[tuple[DenseFeature, bool]]:
        """The model's dense input columns, in order: (feature, False) for each dense feature's
        value, then (feature, True) for each missing-indicator."""
        return [(f, False) for f in self.dense] + [(f, True) for f in self.dense if f.missing_indicator]

    def embedded(self) -> list[SparseFeature | SequenceFeature]:
        """Every feature looked up in an embedding table: the sparse ones, then the sequences'."""
        return [*self.sparse, *self.sequence_features()]

    def tables(self) -> dict[str, Table]:
        """The embedding tables by name, in the order their owners are declared."""
        embedded = self.embedded()
        in_sequence = {f.table_name for f in self.sequence_features()}
        return {
            f.name: Table(
                name=f.name,
                hash_size=f.hash_size,
                dim=f.dim,
                features=tuple(x.name for x in embedded if x.table_name == f.name),
                sequence=f.name in in_sequence,
            )
            for f in embedded
            if f.table is None
        }

    def table_of(self, feature: SparseFeature | SequenceFeature) -> Table:
        return self.tables()[feature.table_name]

    def _bag_poolings(self, table: str) -> set[Pooling]:
        """How the bag readers of a table pool it: its multi-hot features and its sequence features
        (as their group pools); a single id pools the same either way."""
        out = {f.pooling for f in self.sparse if f.table_name == table and f.multi_hot}
        return out | {g.pooling for g in self.sequences for f in g.features if f.table_name == table}

    def bag_pooling(self, table: str) -> Pooling:
        """How a table of the bag collection pools (SUM when only single ids read it)."""
        return next(iter(self._bag_poolings(table)), Pooling.SUM)

    def collections(self, unpooled_sequences: bool = False) -> dict[str, list[Table]]:
        """The embedding collections and their tables. ``ebc`` (an EmbeddingBagCollection, FBGEMM's
        pooled kernels) holds every table whose readers all pool it alike: ids, multi-hot bags, and
        sequences the architecture reads pooled. A table a sequence reads goes, unpooled, to the
        EmbeddingCollection of its width, ``ec<dim>`` (TorchRec needs one width per
        EmbeddingCollection), when the architecture encodes sequences (`unpooled_sequences`) or
        its readers pool it differently (the sparse arch then pools each reader itself).
        docs/models.md says why."""
        out: dict[str, list[Table]] = {}
        for t in self.tables().values():
            unpooled = t.sequence and (unpooled_sequences or len(self._bag_poolings(t.name)) > 1)
            out.setdefault(f"ec{t.dim}" if unpooled else "ebc", []).append(t)
        return out

    def collection_features(self, unpooled_sequences: bool = False) -> dict[str, list[str]]:
        """Per collection, the features looked up in it (its jagged input's keys), in declaration order."""
        collections = self.collections(unpooled_sequences)
        where = {t.name: key for key, tables in collections.items() for t in tables}
        out: dict[str, list[str]] = {key: [] for key in collections}
        for f in self.embedded():
            out[where[f.table_name]].append(f.name)
        return out

    def group_dim(self, group: SequenceGroup) -> int:
        """Width of one behaviour's vector: the dims of the group's tables side by side."""
        tables = self.tables()
        return sum(tables[f.table_name].dim for f in group.features)


class TaskConfig(Strict):
    name: str = Field(description="Task name (ctr, cvr, ...): keys of the model's outputs and metrics.")
    label: str = Field(description="Label column; must be declared under `labels`.")
    given: str | None = Field(None, description="Name of the task this one is conditioned on (cvr is `given: ctr`).")
    weight: float = Field(1.0, ge=0, description="Weight of this task's loss.")
    joint: str | None = Field(
        None,
        description=(
            "Name of the entire-space prediction p(given) x p(this), e.g. ctcvr; default `<given>_<name>`. "
            "Only with `given`."
        ),
    )
    log1p: bool = Field(
        False, description="Regression only: the model predicts log1p(label) (heavy-tailed targets such as watch time)."
    )
    classes: int | None = Field(
        None,
        ge=2,
        description=(
            "Multiclass labels only, and required there: the number of classes K; the label holds 0..K-1, the task "
            "predicts K probabilities (softmax), served as columns `<task>_0` .. `<task>_<K-1>`."
        ),
    )

    @property
    def joint_name(self) -> str | None:
        return None if self.given is None else (self.joint or f"{self.given}_{self.name}")


# --------------------------------------------------------------------------------------------------
# models


class ShallowTowerConfig(Strict):
    hidden: list[int] = Field(default_factory=lambda: [16], description="Hidden layer sizes over the bias features.")
    dim: int = Field(8, gt=0, description="Embedding dimension of each bias feature value.")
    feature_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description=(
            "Probability a row's bias features are dropped in training (YouTube paper), "
            "so the main towers cannot lean on them."
        ),
    )
    apply_to: list[str] | None = Field(
        None, description="Tasks whose logit gets the bias logit; default: the root (click) task only."
    )


class ArchConfig(Strict):
    """What every architecture shares. A subclass sets `arch` (its YAML name) and `model_class`
    (``module:Class`` of its nn.Module, imported only when a model is built) and may add rules of
    its own in `check`."""

    model_class: ClassVar[str]
    # reads behaviour sequences unpooled (a sequence encoder): their tables go to EmbeddingCollections
    sequence_encoder: ClassVar[bool] = False
    # parts `train.freeze` may name (the model's `frozen` says what each holds)
    parts: ClassVar[tuple[str, ...]] = ()
    tower: list[int] = Field(default_factory=lambda: [256, 128, 64], description="Hidden sizes of each task tower.")
    batch_norm: bool = Field(
        False,
        description="BatchNorm1d after each hidden layer of towers/experts (see docs/bn-consistency.md). One pass of "
        "ESMM or MMoE learns CTR markedly better with it (docs/models.md, quality vs peers) and the shipped "
        "examples turn it on; off by default because it changes the model's structure (its fingerprint) and a "
        "config that does not name it keeps the model it had. Needs batches of 2+ rows.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")
    shallow_tower: ShallowTowerConfig | None = Field(
        None, description="Position-bias shallow tower (training only); omit for none."
    )

    def user_columns(self, spec: _SpecFields) -> list[str]:
        """The columns of the user side, which a request sends once for all its candidates
        (`ServedModel.predict(..., request=True)`); empty for architectures without a user part."""
        return []

    def check(self, spec: _SpecFields) -> None:
        """Rules that tie this architecture to the tasks and features; raise ValueError."""
        st = self.shallow_tower
        if st is None:
            return
        if not spec.features.bias:
            raise ValueError(
                "`model.shallow_tower` is set but `features.bias` is empty; declare bias features (e.g. position) "
                "or drop the shallow tower"
            )
        names = [t.name for t in spec.tasks]
        for name in st.apply_to or []:
            if name not in names:
                raise ValueError(
                    f"`model.shallow_tower.apply_to` names unknown task `{name}`; use one of {', '.join(names)}"
                )
            if spec.label_kind(spec.task(name)) == LabelKind.MULTICLASS:
                raise ValueError(
                    f"`model.shallow_tower.apply_to` names multiclass task `{name}`; the bias logit is one number, "
                    "added to binary or regression tasks only"
                )


class SharedBottomModel(ArchConfig):
    arch: Literal["shared_bottom"] = Field(description="Model architecture.")
    model_class: ClassVar[str] = "mtrec.models.shared_bottom:SharedBottom"
    bottom: list[int] = Field(default_factory=lambda: [256, 128], description="Hidden sizes of the shared bottom MLP.")


class EsmmModel(ArchConfig):
    arch: Literal["esmm"] = Field(description="Model architecture.")
    model_class: ClassVar[str] = "mtrec.models.esmm:ESMM"


class Esm2Model(ArchConfig):
    arch: Literal["esm2"] = Field(description="Model architecture.")
    model_class: ClassVar[str] = "mtrec.models.esm2:ESM2"
    daction_task: str = Field(
        "dar", description="Task whose label is the deterministic action (add-to-cart / wishlist)."
    )

    def check(self, spec: _SpecFields) -> None:
        super().check(spec)
        names = [t.name for t in spec.tasks]
        dt_name = self.daction_task
        if dt_name not in names:
            raise ValueError(
                f"`model.daction_task` is `{dt_name}` but no task has that name; use one of {', '.join(names)}"
            )
        dar = spec.task(dt_name)
        if dar.given is None or spec.labels[dar.label] != LabelKind.BINARY:
            raise ValueError(
                f"`model.daction_task` `{dt_name}` must be a binary task `given` the click task "
                "(see mtrec/configs/esm2.yaml)"
            )
        buy = [
            t.name
            for t in spec.tasks
            if t.given == dar.given and t.name != dt_name and spec.labels[t.label] == LabelKind.BINARY
        ]
        if len(buy) != 1:
            raise ValueError(
                f"esm2 needs exactly one purchase task given `{dar.given}` besides `{dt_name}`, found {buy or 'none'}; "
                "see mtrec/configs/esm2.yaml"
            )
        st = self.shallow_tower
        if st is not None and buy[0] in (st.apply_to or []):
            raise ValueError(
                f"`model.shallow_tower.apply_to` names `{buy[0]}`, whose ESM2 probability is composed (no logit of its "
                f"own); apply it to `{dar.given}`"
            )


class NaiveCvrModel(ArchConfig):
    arch: Literal["naive_cvr"] = Field(description="Model architecture.")
    model_class: ClassVar[str] = "mtrec.models.naive_cvr:NaiveCVR"


class MmoeModel(ArchConfig):
    arch: Literal["mmoe"] = Field(description="Model architecture.")
    model_class: ClassVar[str] = "mtrec.models.mmoe:MMoE"
    num_experts: int = Field(4, gt=0, description="Number of shared experts.")
    expert: list[int] = Field(default_factory=lambda: [256, 128], description="Hidden sizes of each expert MLP.")


class PleModel(ArchConfig):
    arch: Literal["ple"] = Field(description="Model architecture.")
    model_class: ClassVar[str] = "mtrec.models.ple:PLE"
    levels: int = Field(2, ge=1, description="Extraction levels.")
    shared_experts: int = Field(2, gt=0, description="Shared experts per level.")
    task_experts: int = Field(1, gt=0, description="Task-specific experts per task per level.")
    expert: list[int] = Field(default_factory=lambda: [128], description="Hidden sizes of each expert MLP.")


class SequenceEncoder(StrEnum):
    LSTM = "lstm"
    TRANSFORMER = "transformer"


class SequenceReadout(StrEnum):
    ATTENTION = "attention"
    MEAN = "mean"
    LAST = "last"


class DupnModel(ArchConfig):
    """DUPN (Ni et al., KDD 2018): the behaviour sequence -> an LSTM (or a transformer layer) ->
    attention over its states, guided by the user/context features and never by the candidate, ->
    a user representation shared by every task, which the item side joins only in the heads."""

    arch: Literal["dupn"] = Field(description="Model architecture.")
    model_class: ClassVar[str] = "mtrec.models.dupn:DUPN"
    sequence_encoder: ClassVar[bool] = True
    parts: ClassVar[tuple[str, ...]] = ("user",)
    sequence: str | None = Field(
        None, description="The `features.sequences` group the encoder reads; may be omitted when there is one."
    )
    user_features: list[str] = Field(
        min_length=1,
        description="Sparse and dense features of the user and the request context (user id, segment, device, query): "
        "the user side, computed once per request at serving. Every other sparse and dense feature is the item side.",
    )
    encoder: SequenceEncoder = Field(
        SequenceEncoder.LSTM, description="Sequence encoder: `lstm` or a one-layer `transformer` (padding masked)."
    )
    hidden: int = Field(128, gt=0, description="Encoder width: LSTM hidden size, transformer model width.")
    heads: int = Field(4, gt=0, description="Attention heads of the transformer encoder (must divide `hidden`).")
    readout: SequenceReadout = Field(
        SequenceReadout.ATTENTION,
        description="How the encoder's states become one vector: `attention` (DUPN's), or `mean` / `last` (ablations).",
    )
    attention: list[int] = Field(
        default_factory=lambda: [64], description="Hidden sizes of the MLP that scores each behaviour for attention."
    )
    with_behaviours: bool = Field(
        True,
        description="The readout also weighs the behaviours' own embeddings (the candidate's embedding space) "
        "beside the encoder's states, so the heads can match the candidate against the history directly.",
    )
    user_tower: list[int] = Field(
        default_factory=lambda: [128], description="Hidden sizes of the user-profile tower over the user features."
    )
    item_tower: list[int] = Field(
        default_factory=lambda: [128], description="Hidden sizes of the item tower over the item features."
    )

    def user_columns(self, spec: _SpecFields) -> list[str]:
        """The user features' and every behaviour sequence's columns, less any column an item
        feature also reads."""
        f = spec.features
        user = set(self.user_features)
        item = {x.source for x in [*f.sparse, *f.dense] if x.name not in user}
        cols = [x.source for x in [*f.sparse, *f.dense] if x.name in user] + [x.source for x in f.sequence_features()]
        return [c for c in dict.fromkeys(cols) if c not in item]

    def group(self, spec: _SpecFields) -> SequenceGroup:
        groups = spec.features.sequences
        if self.sequence is None:
            return groups[0]
        return next(g for g in groups if g.name == self.sequence)

    def check(self, spec: _SpecFields) -> None:
        super().check(spec)
        f = spec.features
        groups = [g.name for g in f.sequences]
        if not groups:
            raise ValueError(
                "`arch: dupn` reads a behaviour sequence but `features.sequences` is empty; declare one "
                "(see mtrec/configs/dupn.yaml)"
            )
        if self.sequence is None and len(groups) > 1:
            raise ValueError(f"`model.sequence` must name the group DUPN encodes, one of {', '.join(groups)}")
        if self.sequence is not None and self.sequence not in groups:
            raise ValueError(f"`model.sequence` is `{self.sequence}`, no such group; use one of {', '.join(groups)}")
        known = [x.name for x in [*f.sparse, *f.dense]]
        for name in self.user_features:
            if name not in known:
                raise ValueError(
                    f"`model.user_features` names `{name}`, which is no sparse or dense feature; "
                    f"use some of {', '.join(known)}"
                )
        if len(set(self.user_features)) != len(self.user_features):
            raise ValueError("`model.user_features` lists a feature twice")
        if set(known) <= set(self.user_features):
            raise ValueError("`model.user_features` takes every feature: leave at least one for the item side")
        if self.encoder == SequenceEncoder.TRANSFORMER and self.hidden % self.heads:
            raise ValueError(f"`model.hidden` ({self.hidden}) must be a multiple of `model.heads` ({self.heads})")


# The architectures, in the order the docs list them: a new one is a config class above and an entry here.
ARCH_CONFIGS: tuple[type[ArchConfig], ...] = (
    SharedBottomModel,
    EsmmModel,
    Esm2Model,
    MmoeModel,
    PleModel,
    DupnModel,
    NaiveCvrModel,
)


def arch_name(cls: type[ArchConfig]) -> str:
    return cls.model_fields["arch"].annotation.__args__[0]


ARCH_NAMES: tuple[str, ...] = tuple(arch_name(c) for c in ARCH_CONFIGS)
ModelConfig = Annotated[Union[ARCH_CONFIGS], Field(discriminator="arch")]  # noqa: UP007


# --------------------------------------------------------------------------------------------------
# where the logs keep the contract's columns


class ColumnsConfig(Strict):
    """Where a log keeps the data contract's columns, when its names differ: each key names the log
    column read as that contract column (`user_id: uid` reads the log's `uid` as `user_id`). The
    mapping applies wherever logs are read (validation, training, evaluation, prediction, serving),
    so the rest of the config uses the contract's names."""

    user_id: str | None = Field(None, description="Log column of the user id; default `user_id`.")
    item_id: str | None = Field(None, description="Log column of the item id; default `item_id`.")
    position: str | None = Field(None, description="Log column of the slot an item was shown in; default `position`.")
    position_base: Literal[0, 1] = Field(
        0,
        description="The number of the first slot in the logs: 0, or 1 for logs that count from 1 (then 1 is read "
        "as 0, so the learned position curve starts at the top slot; a 0 in such a log is `bad_position`).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Label name (under `labels`) -> the log column holding it, e.g. `{click: is_click, purchase: "
        "booked}`; a label not listed is read from the column of its own name.",
    )

    def aliases(self) -> dict[str, str]:
        """Contract name -> log column, for every column read under another name."""
        out = {k: getattr(self, k) for k in (*ID_COLUMNS, POSITION_COLUMN) if getattr(self, k)}
        return {k: v for k, v in {**out, **self.labels}.items() if k != v}

    def source(self, name: str) -> str:
        """The log column a contract column or label `name` is read from."""
        return self.aliases().get(name, name)


# --------------------------------------------------------------------------------------------------
# the spec


class _SpecFields(Strict):
    """The model spec's keys and rules, shared by `ModelSpec` and the run spec's YAML (whose top
    level holds them beside `train`, `job`, ...)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Model name: experiment, registered model and checkpoint folder.",
    )
    labels: dict[str, LabelKind] = Field(
        min_length=1,
        description=(
            "Labels and their kind (binary, regression or multiclass), named as you like (click, purchase, ...); "
            "each is read from the log column of its name, or the one `columns.labels` maps it to."
        ),
    )
    features: FeaturesConfig = Field(description="Feature columns.")
    tasks: list[TaskConfig] = Field(min_length=1, description="Tasks the model predicts.")
    model: ModelConfig = Field(description="Model architecture and sizes; `arch` selects the other keys.")
    columns: ColumnsConfig = Field(
        default_factory=ColumnsConfig,
        description="Where the logs keep the contract's columns (ids, position, labels) when their names differ, "
        "and whether positions count from 0 or 1.",
    )

    @model_validator(mode="after")
    def _check_columns(self) -> _SpecFields:
        for label in self.columns.labels:
            if label not in self.labels:
                raise ValueError(
                    f"`columns.labels` maps `{label}`, which is not declared under `labels` "
                    f"(declared: {', '.join(self.labels)}); declare it or drop the mapping"
                )
        return self

    @model_validator(mode="after")
    def _check_tasks(self) -> _SpecFields:
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
                raise ValueError(
                    f"task `{t.name}`: `joint: {t.joint}` needs `given` (the joint is p(given) x p({t.name}))"
                )
            kind = self.labels[t.label]
            if t.log1p and kind != LabelKind.REGRESSION:
                raise ValueError(f"task `{t.name}`: `log1p: true` is for regression labels, `{t.label}` is {kind}")
            if kind == LabelKind.MULTICLASS:
                if t.classes is None:
                    raise ValueError(
                        f"task `{t.name}`: label `{t.label}` is multiclass; say how many classes it has "
                        f"(`classes: K`, the label holding 0..K-1)"
                    )
                if t.given is not None:
                    raise ValueError(
                        f"task `{t.name}`: a multiclass task cannot be `given` another (the joint is a probability "
                        "product of binary tasks); drop `given`"
                    )
                other = next((o for o in self.tasks if o.label == t.label and o.classes != t.classes), None)
                if other is not None:
                    raise ValueError(
                        f"tasks `{t.name}` and `{other.name}` read label `{t.label}` with {t.classes} and "
                        f"{other.classes} classes; give them the same `classes`"
                    )
            elif t.classes is not None:
                raise ValueError(
                    f"task `{t.name}`: `classes` is for multiclass labels, `{t.label}` is {kind}; drop it or declare "
                    f"`{t.label}: multiclass`"
                )
            if t.given is not None:
                if t.given not in names:
                    raise ValueError(
                        f"task `{t.name}`: `given: {t.given}` names no task; use one of {', '.join(names)}"
                    )
                parent = self.task(t.given)
                if self.labels[parent.label] != LabelKind.BINARY:
                    raise ValueError(
                        f"task `{t.name}`: `given: {t.given}` must name a binary task, `{t.given}` is "
                        f"{self.labels[parent.label]}"
                    )
                if parent.given is not None:
                    raise ValueError(
                        f"task `{t.name}`: chains are one level deep (`{t.given}` is itself given `{parent.given}`)"
                    )
        outputs = self.outputs()
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"task and joint names must be distinct, got {', '.join(outputs)}; rename a `joint`")
        served = [col for col, _ in self._served()]
        if len(set(served)) != len(served):
            raise ValueError(
                f"served column names must be distinct, got {', '.join(served)}; rename the task that clashes with a "
                "multiclass task's `<task>_<k>` columns"
            )
        self.model.check(self)
        return self

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def label_kind(self, task: TaskConfig) -> LabelKind:
        return self.labels[task.label]

    def outputs(self) -> list[str]:
        """The model's output names: every task, then every joint (ESMM's ctr_cvr)."""
        return [t.name for t in self.tasks] + [t.joint_name for t in self.tasks if t.joint_name]

    def classes(self) -> dict[str, int]:
        """Multiclass task -> its number of classes K (its output is B x K probabilities)."""
        return {t.name: t.classes for t in self.tasks if t.classes is not None}

    def served_columns(self) -> dict[str, tuple[str, int | None]]:
        """What a served model returns, one column each: column -> (output, class). A multiclass
        task's K probabilities become columns ``<task>_0`` .. ``<task>_<K-1>``; every other output
        is one column of its own name (class None)."""
        return dict(self._served())

    def _served(self) -> list[tuple[str, tuple[str, int | None]]]:
        classes = self.classes()
        return [
            (name if k is None else f"{name}_{k}", (name, k))
            for name in self.outputs()
            for k in (range(classes[name]) if name in classes else [None])
        ]

    def column_roles(self) -> dict[str, tuple[str, str]]:
        """Every column a day's logs must have, in order, as column -> (kind, what requires it).

        Kinds: the contract's ``position``, ``label`` (binary), ``regression`` and ``multiclass``, and the
        feature kinds (`FeatureKind`: ``id``, ``multi_hot``, ``sequence``, ``dense``, ``bias``);
        `mtrec.data.kinds.COLUMN_TYPES` says what each may be. Labels take precedence over a
        feature reading the same column; the schema check and the training stream's cast both read
        this one map.
        """
        f = self.features
        read = {x.source for x in [*f.embedded(), *f.dense, *f.bias]}
        # the contract's own columns, where something reads them: a feature an id, a bias feature the position
        roles = {c: (FeatureKind.ID.value, "the data contract") for c in ID_COLUMNS if c in read}
        if POSITION_COLUMN in {x.source for x in f.bias}:
            roles[POSITION_COLUMN] = ("position", "the data contract")
        for col, kind in self.labels.items():
            roles[col] = ("label" if kind == LabelKind.BINARY else kind.value, "`labels`")
        declared = [
            *((x, f"`features.sparse` ({x.name}{', multi_hot: true' if x.multi_hot else ''})") for x in f.sparse),
            *((x, f"`features.sequences` ({g.name}: {x.name})") for g in f.sequences for x in g.features),
            *((x, f"`features.dense` ({x.name})") for x in f.dense),
            *((x, f"`features.bias` ({x.name})") for x in f.bias),
        ]
        for x, by in declared:
            roles.setdefault(x.source, (x.kind.value, by))
        return roles

    def collection_features(self) -> dict[str, list[str]]:
        """`FeaturesConfig.collection_features` for this architecture (pooled or encoded sequences)."""
        return self.features.collection_features(self.model.sequence_encoder)

    def input_columns(self) -> list[str]:
        """The feature columns a served model reads: sparse, sequence and dense (bias features
        are training-only), each once."""
        f = self.features
        return list(dict.fromkeys(x.source for x in [*f.sparse, *f.sequence_features(), *f.dense]))

    def required_columns(self) -> list[str]:
        """Every column a day's logs must have for this spec (contract + labels + features)."""
        return list(self.column_roles())

    def default_gate_metrics(self) -> list[str]:
        """AUC of every binary task and joint, MSE of every regression task, macro AUC of every
        multiclass task."""
        out = []
        for t in self.tasks:
            if self.label_kind(t) == LabelKind.REGRESSION:
                out.append(f"{t.name}/mse")
            elif self.label_kind(t) == LabelKind.MULTICLASS:
                out.append(f"{t.name}/macro_auc")
            else:
                out += [f"{t.name}/auc"] + ([f"{t.joint_name}/auc"] if t.joint_name else [])
        return out


SPEC_KEYS = frozenset(_SpecFields.model_fields)
# spec keys outside the shape hash: a dense feature's fill value is data handling, not a weight
HASH_EXCLUDE: dict = {"features": {"dense": {"__all__": {"fill"}}, "sparse": {"__all__": {"fill"}}}, "columns": True}


def _drop_unset_new_keys(shape: dict) -> None:
    """Keys that came after checkpoints were in use shape weights only when set (shared tables,
    sequences, a task's classes): left out of the hash while unset, so existing checkpoints keep
    their fingerprint."""
    for t in shape["tasks"]:
        if t.get("classes") is None:
            t.pop("classes", None)
    features = shape["features"]
    if not features.get("sequences"):
        features.pop("sequences", None)
    for f in features["sparse"]:
        if f.get("table") is None:
            f.pop("table", None)
    for f in features["dense"]:
        if not f.get("missing_indicator"):
            f.pop("missing_indicator", None)


class ModelSpec(_SpecFields):
    """What shapes the weights: name, labels, features, tasks, architecture. Self-contained: a
    checkpoint or a served artifact carries it, and nothing else is needed to rebuild the model."""

    def serving(self) -> ModelSpec:
        """The spec of the served model: the same, without the shallow tower (training only)."""
        if self.model.shallow_tower is None:
            return self
        return self.model_copy(update={"model": self.model.model_copy(update={"shallow_tower": None})})

    def shape_hash(self, extra: Any = None) -> str:
        """Hash of the spec (and `extra`, e.g. the optimizer kinds): equal for equal weights' shapes.
        Keys that shape no weight and came after checkpoints were in use (`HASH_EXCLUDE`) are left
        out, so adding them does not refuse every existing checkpoint's warm start."""
        shape = self.model_dump(mode="json", exclude=HASH_EXCLUDE)
        _drop_unset_new_keys(shape)
        if extra is not None:
            shape["optimizers"] = extra
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: dict[str, Any], label: str = "model spec") -> ModelSpec:
        """A spec saved with `model_dump(mode="json")`; a full run-spec dump (older artifacts) works too.

        Raises:
            ConfigError: one line naming the key and the fix.
        """
        from mtrec.configdoc import validate

        return validate(cls, {k: v for k, v in data.items() if k in SPEC_KEYS}, label)
