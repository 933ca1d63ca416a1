"""Column kinds, each defined once: the Arrow types a log column of that kind may have, the type
the training stream casts it to, and (feature kinds) how its values become model inputs.

The kinds are the data contract's own columns (``position``, ``label``, ``regression``) and the
feature kinds of the model spec (`mtrec.spec.FeatureKind`): ``id`` (one id), ``multi_hot`` (a list
of ids, pooled), ``sequence`` (an ordered list of ids, one vector each), ``dense`` (a number) and
``bias`` (a small integer). The schema check (`mtrec.data.validate`), the stream's cast
(`mtrec.train.stream`) and the batch converter (`mtrec.data.batch`) all read these definitions;
nothing else branches on a feature's kind. Torch-free: Ray Data's read workers import it.

Ids (integer or string) are hashed into their table by `hash_ids` (splitmix64 of the int64 id,
modulo the table's rows); string ids are first mapped to int64 with blake2b, once per distinct
value in the batch.

Example:
    >>> ids, lengths = sparse_inputs(spec.features.sparse[0], batch.column("user_id"), table_rows=200_000)
    >>> lengths.sum() == len(ids)
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec.data.hashing import splitmix64
from mtrec.spec import (
    BiasFeature,
    DenseFeature,
    FeatureKind,
    SequenceFeature,
    SequenceGroup,
    SequenceOrder,
    SparseFeature,
)

# A null element inside a sequence keeps its place (the lists stay parallel) and is embedded as
# this id: one "unknown" row per table, shared with whatever real id hashes there.
NULL_ELEMENT_ID = -0x6E756C6C  # "null"
_NULL_ELEMENT_STR = "\x00null"


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_boolean(t)


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_id_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_id(t.value_type)


def _id_type(t: pa.DataType) -> pa.DataType:
    return pa.int64() if pa.types.is_integer(t) else pa.string()


@dataclass(frozen=True)
class ColumnType:
    """What a column of one kind may be in the logs (`accepts`, `wanted` for the error), the type
    the training stream casts it to (`canonical` of the file's type) and how the served model's
    input signature lists it (`served`: an MLflow type name; ``any`` where the contract allows more
    than one type or nulls, e.g. integer or string ids; None for columns serving never reads)."""

    accepts: Callable[[pa.DataType], bool]
    wanted: str
    canonical: Callable[[pa.DataType], pa.DataType]
    served: str | None = None


COLUMN_TYPES: dict[str, ColumnType] = {
    # the data contract's own columns
    "position": ColumnType(_is_int, "an integer (int32, 0-based slot)", lambda t: pa.int64()),
    "label": ColumnType(_is_int, "an integer label (int8 0/1)", lambda t: pa.int8()),
    "regression": ColumnType(_is_num, "a numeric label (float32)", lambda t: pa.float32()),
    "multiclass": ColumnType(_is_int, "an integer class label (0..K-1)", lambda t: pa.int64()),
    # the feature kinds
    FeatureKind.ID: ColumnType(_is_id, "an integer or string id (int64)", _id_type, "any"),
    FeatureKind.MULTI_HOT: ColumnType(
        _is_id_list, "a list of integer or string ids", lambda t: pa.list_(_id_type(t.value_type)), "any"
    ),
    FeatureKind.SEQUENCE: ColumnType(
        _is_id_list,
        "a list of integer or string ids (list<int64>)",
        lambda t: pa.list_(_id_type(t.value_type)),
        "any",
    ),
    FeatureKind.DENSE: ColumnType(_is_num, "a number (float32)", lambda t: pa.float32(), "double"),
    FeatureKind.BIAS: ColumnType(_is_int, "an integer (bias feature value)", lambda t: pa.int64()),
}


# --------------------------------------------------------------------------------------------------
# ids


def hash_ids(ids: np.ndarray, size: int) -> np.ndarray:
    """splitmix64(id) mod size, as int64 (vectorized). Shape unchanged."""
    z = splitmix64(ids.astype(np.int64).view(np.uint64))
    return (z % np.uint64(size)).astype(np.int64)


def ids_to_int(values: pa.Array) -> np.ndarray:
    """Non-null ids (integer or string) -> int64 numpy, strings via blake2b of each distinct value."""
    if pa.types.is_integer(values.type):
        return values.cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False)  # uint64 ids wrap, stay distinct
    enc = pc.dictionary_encode(values)
    table = np.array(
        [
            int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little", signed=True)
            for s in enc.dictionary.to_pylist()
        ],
        dtype=np.int64,
    )
    return table[enc.indices.to_numpy(zero_copy_only=False)]


def _chunk(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def list_lengths(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row, the length of a list column; a null list is empty. int64, shape B."""
    return pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def fill_id(value: int | str) -> int:
    """A feature's `fill` id as `ids_to_int` maps it: an integer as itself, a string by its hash."""
    return int(value) if isinstance(value, int) else int(ids_to_int(pa.array([value], pa.string()))[0])


def _single(col: pa.Array, fill: int | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One id per row; a null one is an empty bag, or the `fill` id."""
    if fill is not None and col.null_count:
        ids = np.full(len(col), fill_id(fill), dtype=np.int64)
        valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        ids[valid] = ids_to_int(col.filter(pa.array(valid)))
        return ids, np.ones(len(col), dtype=np.int64)
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    return ids_to_int(col.filter(pa.array(valid)) if col.null_count else col), valid.astype(np.int64)


def _multi_hot(col: pa.Array, fill: int | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A bag of ids per row; a null list is empty (or the bag [`fill`]), a null id inside a list
    is left out of its bag."""
    flat = pc.list_flatten(col)  # a null list contributes nothing (whatever lies under it)
    lens = list_lengths(col)
    if flat.null_count:
        keep = pc.is_valid(flat).to_numpy(zero_copy_only=False)
        lens = np.bincount(np.repeat(np.arange(len(col)), lens)[keep], minlength=len(col)).astype(np.int64)
        flat = flat.filter(pa.array(keep))
    ids = ids_to_int(flat)
    if fill is not None and col.null_count:
        null = pc.is_null(col).to_numpy(zero_copy_only=False)
        starts = np.cumsum(lens) - lens
        ids = np.insert(ids, starts[null], fill_id(fill))  # before the next row's ids: in row order
        lens = lens + null
    return ids, lens


def sequence_take(lens: np.ndarray, max_len: int, order: SequenceOrder) -> tuple[np.ndarray, np.ndarray]:
    """Which elements of a flattened list column a sequence keeps, oldest first: the newest
    `max_len` of each row.

    Args:
        lens: B list lengths (null = 0).
        max_len: elements kept per row.
        order: how the logs order each list.

    Returns:
        (index into the flattened values, kept lengths B).
    """
    starts = np.cumsum(lens) - lens
    keep = np.minimum(lens, max_len)
    within = np.arange(int(keep.sum()), dtype=np.int64) - np.repeat(np.cumsum(keep) - keep, keep)
    if order == SequenceOrder.NEWEST_LAST:  # keep the tail, as is
        index = np.repeat(starts + lens - keep, keep) + within
    else:  # keep the head, reversed so that the oldest comes first
        index = np.repeat(starts + keep - 1, keep) - within
    return index, keep


def _sequence(col: pa.Array, group: SequenceGroup) -> tuple[pa.Array, np.ndarray]:
    flat = pc.list_flatten(col)
    index, keep = sequence_take(list_lengths(col), group.max_len, group.order)
    flat = flat.take(pa.array(index))
    if flat.null_count:  # the element keeps its place: an "unknown" id
        flat = pc.fill_null(flat, NULL_ELEMENT_ID if pa.types.is_integer(flat.type) else _NULL_ELEMENT_STR)
    return flat, keep


def sparse_inputs(
    feature: SparseFeature | SequenceFeature,
    col: pa.Array | pa.ChunkedArray,
    table_rows: int,
    group: SequenceGroup | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A sparse or sequence column -> (hashed row ids, lengths B), the jagged input of its table.

    Args:
        feature: the feature (its kind decides how the column is read).
        col: its column (B rows).
        table_rows: rows of the table it is looked up in.
        group: the sequence group of a sequence feature (its `max_len` and `order`).
    """
    col = _chunk(col)
    fill = getattr(feature, "fill", None)  # sequence features have none: a null element has its own id
    if feature.kind == FeatureKind.SEQUENCE:
        values, lens = _sequence(col, group)
        return hash_ids(ids_to_int(values), table_rows), lens
    ids, lens = _multi_hot(col, fill) if feature.kind == FeatureKind.MULTI_HOT else _single(col, fill)
    return hash_ids(ids, table_rows), lens


def dense_input(feature: DenseFeature, col: pa.Array | pa.ChunkedArray, indicator: bool = False) -> np.ndarray:
    """A dense column -> float32 B: null/NaN take `fill` (validation quarantined them otherwise),
    then the optional signed log1p; with `indicator`, 1 where the value was missing, else 0."""
    x = _chunk(col).to_numpy(zero_copy_only=False).astype(np.float32)  # a null is NaN here
    if indicator:
        return np.isnan(x).astype(np.float32)
    if feature.fill is not None:
        x = np.where(np.isnan(x), np.float32(feature.fill), x)
    return np.sign(x) * np.log1p(np.abs(x)) if feature.log1p else x


def bias_input(feature: BiasFeature, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A bias column -> int64 B, values past the last clipped to it (they share its logit)."""
    return np.clip(_chunk(col).to_numpy(zero_copy_only=False).astype(np.int64), 0, feature.num_values - 1)
