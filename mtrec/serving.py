"""The served model: a checkpoint's weights in a plain CPU model, scoring raw feature columns.

What serving sees differs from training in three ways, all decided here once:

* no bias features: the shallow tower is not part of the served model (its weights are left out
  and the model is built without it), so scores rank by relevance alone; its logit counts as 0,
  so a pCTR speaks for the bias values whose logit is 0 (docs/models.md, served calibration);
* no labels, no process group: an unsharded model (TorchRec's EmbeddingBagCollection runs on CPU
  as is) built from the checkpoint's whole tables, whatever world size and sharding wrote them;
* outputs in label space: binary tasks and joints as probabilities, regression tasks as values
  (a `log1p: true` task is mapped back with expm1), a multiclass task as one probability column
  per class (`ModelSpec.served_columns`).

The MLflow pyfunc model (mtrec.tracking.pyfunc), `mtrec predict` and the promotion gate all score through
`ServedModel`, so what is evaluated is what is served. A served model is self-contained: its
artifact (and a checkpoint's manifest) carries the model spec and the score offsets of training-time
sampling, so it loads and scores from the artifact alone.

Example:
    >>> served = ServedModel.from_checkpoint("work/checkpoints/esmm_synth/dt=2026-01-03")
    >>> served.predict(table)["ctr"].shape          # N rows of raw feature columns
    (N,)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mtrec.data.columns import contract_view
from mtrec.data.kinds import COLUMN_TYPES, ids_to_int
from mtrec.errors import MtrecError, first_line
from mtrec.eval.scoring import score_batches
from mtrec.spec import FeatureKind, LabelKind, ModelSpec

WEIGHTS = "weights.pt"
SPEC = "spec.json"  # {"spec": ModelSpec, "score_offsets": {task: log-odds}}
LEGACY_CONFIG = "config.json"  # artifacts logged before the spec was split from the run config
_PREFIX = "model.model."  # checkpoint key of a model tensor: DMP(MultiTaskTrain(model)) state dict


class ServedModel:
    """A MultiTaskModel on CPU in eval mode, with the columns it reads and the outputs it returns.

    Args:
        spec (ModelSpec): the trained model's spec (the shallow tower, if any, is dropped).
        state (dict[str, Tensor]): the model's state dict without the shallow tower.
        score_offsets (dict[str, float] | None): per task, the log-odds training-time sampling
            added (`MtrecConfig.score_offsets()`), taken off every score.
    """

    def __init__(self, spec: ModelSpec, state: dict[str, torch.Tensor], score_offsets: dict[str, float] | None = None):
        from mtrec.models import build_model

        self.spec = spec.serving()
        self.score_offsets = dict(score_offsets or {})
        self.model = build_model(self.spec, "cpu", self.score_offsets)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MtrecError(
                f"the weights do not fit {spec.name}'s model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "they were written under another config - export them again from the right checkpoint"
            )
        self.model.eval()
        self.columns = self.spec.input_columns()
        roles = self.spec.column_roles()
        self._kinds = {col: roles[col][0] for col in self.columns}  # column -> kind, for `_typed`
        self.outputs = list(self.spec.served_columns())  # one column per output, per class of a multiclass task

    @classmethod
    def from_checkpoint(cls, url: str) -> ServedModel:
        """A published checkpoint's model (any world size, any sharding), built from the spec its
        manifest carries; the shallow tower is left out."""
        from mtrec.train import checkpoint

        spec, offsets = checkpoint.trained_spec(checkpoint.read_manifest(url), url)
        return cls.from_state(spec, checkpoint.read_full(url), offsets, url)

    @classmethod
    def from_state(
        cls,
        spec: ModelSpec,
        full: dict[str, torch.Tensor],
        score_offsets: dict[str, float] | None = None,
        url: str = "the checkpoint",
    ) -> ServedModel:
        """From `checkpoint.read_full`'s tensors (model, optimizers; only the model's are kept)."""
        state = {
            k.removeprefix(_PREFIX): v
            for k, v in full.items()
            if k.startswith(_PREFIX) and not k.startswith(f"{_PREFIX}shallow_tower.")
        }
        if not state:
            raise MtrecError(
                f"{url} holds no model tensors; it is not an mtrec checkpoint - pass a dt=YYYY-MM-DD folder"
            )
        return cls(spec, state, score_offsets)

    @classmethod
    def load(cls, path: str | Path) -> ServedModel:
        """A model saved with `save` (the MLflow model's artifact folder)."""
        path = Path(path)
        if (path / SPEC).exists():
            saved = json.loads((path / SPEC).read_text())
            spec, offsets = ModelSpec.from_json(saved["spec"], label=str(path / SPEC)), saved.get("score_offsets", {})
        else:
            from mtrec.config import parse_config

            cfg = parse_config(json.loads((path / LEGACY_CONFIG).read_text()), label=str(path / LEGACY_CONFIG))
            spec, offsets = cfg.spec, cfg.score_offsets()
        return cls(spec, torch.load(path / WEIGHTS, map_location="cpu", weights_only=True), offsets)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path / WEIGHTS)
        (path / SPEC).write_text(
            json.dumps({"spec": self.spec.model_dump(mode="json"), "score_offsets": self.score_offsets}, indent=2)
        )

    def _check(self, names: list[str]) -> None:
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise MtrecError(
                f"the input lacks feature column(s) {', '.join(missing)}; the model reads {', '.join(self.columns)}"
            )

    def _typed(self, table: pa.Table) -> pa.Table:
        """The model's columns with the contract's types (`typed_inputs`)."""
        return typed_inputs(table, self._kinds)

    def _input(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        """The model's columns of `batch` (under the contract's names or the log's, `columns:`),
        checked and typed (`_check`, `_typed`)."""
        batch = contract_view(batch, self.spec.columns)
        self._check(batch.schema.names)
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        return self._typed(batch)

    def _one_user(self, table: pa.Table) -> pa.Table:
        """A request's rows with the user side (`user_columns`) taken from its first row: the
        other rows may leave those columns null, so a client sends the history once."""
        cols = self.spec.model.user_columns(self.spec)
        if not cols:
            raise MtrecError(
                f"{self.spec.name} (arch {self.spec.model.arch}) has no user part to send once per request; "
                "send every column on every row and leave out request=True"
            )
        first = pa.array(np.zeros(table.num_rows, dtype=np.int64))
        for col in cols:
            table = table.set_column(table.schema.get_field_index(col), col, table.column(col).take(first))
        return table

    def predict(
        self, batch: pa.Table | pa.RecordBatch, batch_rows: int = 8192, request: bool = False
    ) -> dict[str, np.ndarray]:
        """Per served column (`self.outputs`), the scores of N rows (N float32 each) holding at least
        `self.columns` (other columns are ignored). With `request`, the rows are one request's
        candidates and the user side is read from the first row only (`_one_user`).

        Raises:
            MtrecError: a feature column is missing or of a type the data contract does not allow,
                or `request` is given to a model without a user part.
        """
        batch = self._input(batch)
        if request and batch.num_rows:
            batch = self._one_user(batch)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.outputs}
        for _, out in score_batches(self.model, self.spec, batch.to_batches(max_chunksize=batch_rows)):
            for col, v in served_scores(self.spec, out).items():
                parts[col].append(v)
        return {k: np.concatenate(v) if v else np.zeros(0, dtype=np.float32) for k, v in parts.items()}

    @torch.no_grad()
    def user_representations(self, batch: pa.Table | pa.RecordBatch) -> np.ndarray:
        """The user representation of each of N rows (N x D float32): the user part of a model
        that has one (DUPN), which no candidate feature reaches.

        Raises:
            MtrecError: the model has no user part, or a column is missing or mistyped.
        """
        from mtrec.data.batch import BatchConverter

        if not hasattr(self.model, "user_representation"):
            raise MtrecError(
                f"{self.spec.name} (arch {self.spec.model.arch}) has no user representation; only dupn models have one"
            )
        b = BatchConverter(self.spec)(self._input(batch), with_bias=False, with_labels=False)
        return self.model.user_representation(b).float().numpy()

    def from_pandas(self, df) -> pa.Table:
        """A DataFrame's model columns as the Arrow table `predict` takes, each column read by its
        kind (`_pandas_column`), so that a DataFrame is scored exactly as the same rows read from
        Parquet are (`mtrec predict`): from here on both take one path."""
        source = {c: c if c in df.columns else self.spec.columns.source(c) for c in self.columns}  # `columns:`
        self._check([c for c, src in source.items() if src in df.columns])
        return pa.table(
            [_pandas_column(df[source[col]], kind, col) for col, kind in self._kinds.items()], names=self.columns
        )

    def predict_pandas(self, df, request: bool = False):
        """A pandas DataFrame of raw feature columns -> a DataFrame with one column per output
        (`from_pandas`, then `predict`; `request`: one user's candidates, the user side on the first row)."""
        import pandas as pd

        return pd.DataFrame(self.predict(self.from_pandas(df), request=request))


def _missing(v) -> bool:
    """A pandas missing value (None, NaN, pd.NA), without testing the truth of a list or array."""
    return v is None or type(v).__name__ == "NAType" or (isinstance(v, float) and v != v)  # NAType: pd.NA


def _pandas_column(values, kind: str, col: str) -> pa.Array:
    """One DataFrame column as Arrow, for `_typed` to check and type as it does a Parquet column.
    Arrow infers the type from the values; where pandas leaves nothing to infer a contract type
    from, the kind gives it: a column of nulls only (a one-row request with None, NaN or NA in a
    sparse column) and a list column holding no id at all become int64 (lists of int64: integer
    ids, a null dense value), and integer and string ids mixed in one column go through `_mixed_ids`."""
    ct = COLUMN_TYPES[kind]
    blank = pa.int64() if ct.accepts(pa.int64()) else pa.list_(pa.int64())  # the type a column of no values gets
    try:
        arr = pa.array(values, from_pandas=True)  # None, NaN and pd.NA -> null
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        if kind == FeatureKind.DENSE.value:
            raise MtrecError(f"input column `{col}` has values that are not all numbers ({first_line(e)})") from None
        return _mixed_ids(values, pa.types.is_list(blank), col)
    if pa.types.is_null(arr.type) or (
        pa.types.is_list(arr.type) and pa.types.is_null(arr.type.value_type) and pa.types.is_list(blank)
    ):
        return arr.cast(blank)
    return arr


def _mixed_ids(values, listed: bool, col: str) -> pa.Array:
    """Integer and string ids in one column (a JSON request may send "123" in one row and 456 in
    the next), which no Arrow type holds: each string becomes the int64 `ids_to_int` makes of it in
    a string column, each integer stays itself, so every id is hashed to the row its own type gives
    it (the string "123" and the integer 123 are different ids, as in the logs). int64 (lists)."""
    rows = []
    for v in values:
        if not _missing(v) and listed and not isinstance(v, list | tuple | np.ndarray):
            raise MtrecError(f"input column `{col}` holds {v!r} where a list of ids belongs; send a list per row")
        rows.append(None if _missing(v) else list(v) if listed else [v])
    strings = sorted({x for r in rows if r for x in r if isinstance(x, str)})
    as_int = dict(zip(strings, ids_to_int(pa.array(strings, pa.string())).tolist(), strict=True))

    def one(x):
        if _missing(x):
            return None
        if isinstance(x, str):
            return as_int[x]
        if isinstance(x, int | np.integer) or (isinstance(x, float) and x.is_integer()):
            return (int(x) + 2**63) % 2**64 - 2**63  # past int64: wrapped, as `ids_to_int` casts uint64 ids
        raise MtrecError(f"input column `{col}` holds {x!r} ({type(x).__name__}); send integer or string ids")

    out = [None if r is None else [one(x) for x in r] for r in rows]
    if listed:
        return pa.array(out, pa.list_(pa.int64()))
    return pa.array([None if r is None else r[0] for r in out], pa.int64())


def typed_inputs(table: pa.Table, kinds: dict[str, str], canonical: bool = False) -> pa.Table:
    """The columns of `kinds` (column -> kind) with the contract's types. Ids that arrive as floats
    (pandas turns an integer column with a null into float64) are taken back to int64 when whole;
    any other type the contract does not allow is refused with one line. With `canonical`, each
    column is also cast to its kind's one type (`COLUMN_TYPES[kind].canonical`), so that tables of
    files that differ in integer widths concatenate."""
    out = []
    for col, kind in kinds.items():
        arr = table.column(col)
        t = arr.type
        listed = pa.types.is_list(t) or pa.types.is_large_list(t)
        if kind != FeatureKind.DENSE.value and pa.types.is_floating(t.value_type if listed else t):
            arr = _whole_ids(arr, col, listed)
        ct = COLUMN_TYPES[kind]
        if not ct.accepts(arr.type):
            raise MtrecError(f"input column `{col}` has type {arr.type}, expected {ct.wanted}")
        if canonical and arr.type != ct.canonical(arr.type):
            arr = arr.cast(ct.canonical(arr.type), safe=False)
        out.append(arr)
    return pa.table(out, names=list(kinds))


def served_scores(spec: ModelSpec, out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per served column (`ModelSpec.served_columns`) of `spec` (a served spec), the scores of one
    batch's model outputs: probabilities, regression values in label space (expm1 of a `log1p`
    task), one column per class of a multiclass task."""
    expm1 = {t.name for t in spec.tasks if t.log1p and spec.label_kind(t) == LabelKind.REGRESSION}
    scores = {}
    for col, (k, cls) in spec.served_columns().items():
        v = out[k].float() if cls is None else out[k][:, cls].float()
        scores[col] = (torch.expm1(v) if k in expm1 else v).cpu().numpy()
    return scores


def _whole_ids(arr: pa.ChunkedArray, col: str, listed: bool) -> pa.ChunkedArray:
    """Float ids (or lists of them) -> int64, when every value is whole."""
    target = pa.list_(pa.int64()) if listed else pa.int64()
    try:
        return arr.cast(target)  # a safe cast: refuses 1.5, keeps nulls
    except pa.ArrowInvalid:
        raise MtrecError(
            f"input column `{col}` holds ids that are not whole numbers ({arr.type}); send integer or string ids"
        ) from None
