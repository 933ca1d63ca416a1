"""The contract's view of a log: its columns under the names the config's `columns:` maps them
to, and positions counted from 0 (`ColumnsConfig`). Every reader of logs applies it (validation,
training, evaluation, prediction) and so does the served model, so a request may use the log's
names. Light: the served model imports it.

Example:
    >>> view = contract_view(batch, spec.columns)     # `uid` also as `user_id`, `rank` - 1 as `position`
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from mtrec.spec import POSITION_COLUMN, ColumnsConfig


def contract_schema(schema: pa.Schema, columns: ColumnsConfig) -> pa.Schema:
    """A file's schema as the contract sees it (`contract_view`): each mapped column also under
    its contract name."""
    for name, src in columns.aliases().items():
        if src in schema.names:
            field = pa.field(name, schema.field(src).type)
            i = schema.get_field_index(name)
            schema = schema.set(i, field) if i >= 0 else schema.append(field)
    return schema


def contract_view(batch: pa.RecordBatch, columns: ColumnsConfig) -> pa.RecordBatch:
    """A batch as read from a log -> as the contract names it: each column `columns:` maps is also
    there under its contract name (the same array, no copy; a log column already called so is
    replaced), and positions counted from 1 (`columns.position_base`) count from 0."""
    for name, src in columns.aliases().items():
        if src in batch.schema.names:
            batch = _put(batch, name, batch.column(src))
    if columns.position_base and POSITION_COLUMN in batch.schema.names:
        pos = batch.column(POSITION_COLUMN)
        batch = _put(batch, POSITION_COLUMN, pc.subtract(pc.cast(pos, pa.int64(), safe=False), columns.position_base))
    return batch


def _put(batch: pa.RecordBatch, name: str, arr: pa.Array) -> pa.RecordBatch:
    i = batch.schema.get_field_index(name)
    if i >= 0:
        return batch.set_column(i, name, arr)
    return batch.append_column(name, arr)


def log_columns(columns: list[str], spec_columns: ColumnsConfig) -> list[str]:
    """The log columns to read for these contract columns (a projection before `contract_view`)."""
    return list(dict.fromkeys(spec_columns.source(c) for c in columns))
