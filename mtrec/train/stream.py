"""A day's good rows as fixed-size Arrow batches, streamed file by file (bounded memory)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec.data.io import DataFile, list_day_files
from mtrec.data.kinds import COLUMN_TYPES
from mtrec.data.validate import RowValidator, iter_file_batches
from mtrec.spec import ModelSpec
from mtrec.train.position import FILE_COL, ROW_COL, Position, skip_trained


@dataclass
class StreamCounts:
    """Rows read, rows kept (good) and rows left out by the contract (counted, never silent)."""

    read: int = 0
    good: int = 0
    bad: int = 0
    files: list[str] = field(default_factory=list)


def canonical(batch: pa.RecordBatch, roles: dict[str, tuple[str, str]]) -> pa.RecordBatch:
    """Only the columns training reads (`ModelSpec.column_roles`, plus row_id), in a fixed
    order, with fixed types, so batches from files that differ in column order, extra columns,
    integer widths or nullability can be concatenated. Validation has already accepted each
    file's types."""
    cols = [(col, role) for col, (role, _) in roles.items()]
    if "row_id" in batch.schema.names:
        cols.append(("row_id", "position"))  # an int64 like position
    arrays, fields = [], []
    for col, role in cols:
        arr = batch.column(col)
        t = COLUMN_TYPES[role].canonical(arr.type)
        arrays.append(arr if arr.type == t else pc.cast(arr, t, safe=False))
        fields.append(pa.field(col, t))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def rebatch(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Exact `size`-row batches; the day's last batch takes the remainder (merged into the one
    before it when under half a batch, so BatchNorm never sees a 1-row batch)."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    held: pa.RecordBatch | None = None
    for b in batches:
        if not b.num_rows:
            continue
        pending.append(b)
        rows += b.num_rows
        if rows < size:
            continue
        table = pa.Table.from_batches(pending).combine_chunks()  # one copy; the slices below are views
        full = rows // size
        for k in range(full):
            if held is not None:
                yield held
            held = table.slice(k * size, size).to_batches()[0]
        rest = table.slice(full * size)
        pending = rest.to_batches() if rest.num_rows else []
        rows = rest.num_rows
    tail = pa.Table.from_batches(pending).combine_chunks().to_batches()[0] if rows else None
    if held is not None and tail is not None and tail.num_rows < size // 2:
        yield pa.Table.from_batches([held, tail]).combine_chunks().to_batches()[0]
        return
    if held is not None:
        yield held
    if tail is not None:
        yield tail


def good_file_batches(
    f: DataFile,
    validator: RowValidator,
    roles: dict[str, tuple[str, str]],
    counts: StreamCounts | None = None,
    file_index: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """One file's good rows, canonical (`canonical`), batch by batch as read. The one reader of
    training data: the single-process stream below and the Ray Data read tasks both use it.
    With `file_index`, each row also carries its position (`mtrec.train.position`): `_file` =
    file_index, `_row` = its ordinal among the file's good rows."""
    if counts is not None:
        counts.files.append(f.url)
    ordinal = 0
    for batch in iter_file_batches(f):  # every column: the bad-row rules need them
        split = validator.split(batch)
        if counts is not None:
            counts.read += batch.num_rows
            counts.good += split.good.num_rows
            counts.bad += split.bad.num_rows
        out = canonical(split.good, roles)
        if file_index is not None:
            n = out.num_rows
            out = pa.RecordBatch.from_arrays(
                [
                    *out.columns,
                    pa.array(np.full(n, file_index, dtype=np.int32)),
                    pa.array(np.arange(ordinal, ordinal + n, dtype=np.int64)),
                ],
                schema=out.schema.append(pa.field(FILE_COL, pa.int32())).append(pa.field(ROW_COL, pa.int64())),
            )
            ordinal += n
        yield out


def day_batches(
    spec: ModelSpec, logs: str, days: Iterable[dt.date], batch_size: int, counts: StreamCounts | None = None
) -> Iterator[pa.RecordBatch]:
    """Good rows of `days` under the logs root `logs`, in file order, as `batch_size`-row batches,
    with positions (file index within these days' files); `counts` is filled as it goes."""
    validator = RowValidator(spec)
    roles = spec.column_roles()  # once per stream, not per batch
    files = [f for day in days for f in list_day_files(logs, day)]
    good = (b for i, f in enumerate(files) for b in good_file_batches(f, validator, roles, counts, file_index=i))
    return rebatch(good, batch_size)


def read_good_rows(files: pa.Table, spec: dict, done: dict | None = None) -> Iterator[pa.Table]:
    """Ray Data UDF (no Ray import needed): the files of this block (index, url, name, size) ->
    their good rows, canonical, with positions, one Arrow table per read batch. Rows inside
    `done` (a resumed job's trained rows, `Position.to_json()`) are not emitted. Lives here, away
    from torch, so the Ray Data read workers import only pyarrow and the model spec (`spec`, dumped)."""
    model_spec = ModelSpec.model_validate(spec)
    validator, roles = RowValidator(model_spec), model_spec.column_roles()
    trained = Position.from_json(done)
    for row in files.to_pylist():
        f = DataFile(row["url"], row["name"], row["size"])
        for b in skip_trained(good_file_batches(f, validator, roles, file_index=row["index"]), trained):
            if b.num_rows:
                yield pa.Table.from_batches([b])
