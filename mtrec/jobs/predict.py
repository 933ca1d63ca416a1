"""`mtrec predict`: a logged model (`models:/<name>@champion`, a version, `runs:/...`) scores a day's
logs as served, into one Parquet file: the row's id (`row_id`, or its `file` and `row` ordinal when
the logs have none) and one column per task (probability; regression value).

Every row of the day is scored (labels are neither needed nor read, so request logs work too);
memory is bounded by one read batch. The file appears complete or not at all: it is written
beside its destination and moved into place at the end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.data.io import filesystem, list_day_files
from mtrec.data.validate import iter_file_batches, read_schema
from mtrec.errors import DataValidationError, MtrecError
from mtrec.spec import ColumnsConfig

log = logging.getLogger(__name__)


def predict_to_parquet(
    model_uri: str, logs: str, day: dt.date, out: str, users_out: str | None = None, view: ColumnsConfig | None = None
) -> dict:
    """Score every row of `day` under `logs` with `model_uri` into the Parquet file `out`; with
    `users_out`, also each user's representation at their last row of the day (a model with a
    user part: DUPN), one row per user, into that Parquet file. The logs are read under `view`
    (the config's `columns:`; default the model's own: the log's names may have changed since).

    Returns:
        dict: {"rows", "files", "seconds", "out", "columns"} (and "users" with `users_out`).
    Raises:
        DataValidationError: no logs for the day, or a file lacks a feature column the model reads.
        TrackingError: the model cannot be loaded.
    """
    from mtrec.tracking import load_served

    t0 = time.perf_counter()
    served = load_served(model_uri)
    view = view or served.spec.columns
    files = list_day_files(logs, day)
    if not files:
        raise DataValidationError(f"no Parquet files for {day} under {logs}; check --logs and --date")
    schemas = [read_schema(f, view) for f in files]  # as the contract names them (`columns:`)
    for f, schema in zip(files, schemas, strict=True):
        missing = [c for c in served.columns if c not in schema.names]
        if missing:
            raise DataValidationError(
                f"{f.url} lacks feature column(s) {', '.join(missing)} that {model_uri} reads; "
                "score logs written under the model's data contract"
            )
    has_row_id = all("row_id" in s.names for s in schemas)
    id_fields = (
        [pa.field("row_id", pa.int64())] if has_row_id else [pa.field("file", pa.string()), pa.field("row", pa.int64())]
    )
    schema = pa.schema(id_fields + [pa.field(k, pa.float32()) for k in served.outputs])
    rows = 0
    latest: dict = {}  # user id -> (row id, representation) of their last row so far
    if users_out and not hasattr(served.model, "user_representation"):
        raise MtrecError(
            f"--user-representations: {model_uri} (arch {served.spec.model.arch}) has no user representation; "
            "only dupn models have one"
        )
    with _whole_file(out) as fh:
        with pq.ParquetWriter(fh, schema) as writer:
            for f in files:
                ordinal = 0
                cols = served.columns + (["row_id"] if has_row_id else [])
                wanted = list(dict.fromkeys(cols + (["user_id"] if users_out else [])))
                for rb in iter_file_batches(f, columns=wanted, view=view):
                    scores = served.predict(rb)
                    n = rb.num_rows
                    ids = (
                        [rb.column("row_id").cast(pa.int64())]
                        if has_row_id
                        else [
                            pa.array([f.name] * n, pa.string()),
                            pa.array(np.arange(ordinal, ordinal + n, dtype=np.int64)),
                        ]
                    )
                    writer.write_table(
                        pa.Table.from_arrays(ids + [pa.array(scores[k]) for k in served.outputs], schema=schema)
                    )
                    if users_out:
                        reps = served.user_representations(rb)
                        for u, r, v in zip(rb.column("user_id").to_pylist(), ids[-1].to_pylist(), reps, strict=True):
                            latest[u] = (r if has_row_id else f"{f.name}:{r}", v)
                    ordinal += n
                    rows += n
                log.info(f"  scored {f.name}: {ordinal:,} rows")
        if users_out:  # written before the scores are moved into place
            _write_users(latest, users_out)
    done = {"rows": rows, "files": len(files), "seconds": time.perf_counter() - t0, "out": out, "columns": schema.names}
    return {**done, "users": len(latest)} if users_out else done


def _write_users(latest: dict, out: str) -> None:
    """One row per user: `user_id`, `as_of` (the row whose context it is) and `representation`
    (list<float>), written beside `out` and moved into place."""
    users = list(latest)
    table = pa.table(
        {
            "user_id": pa.array(users),
            "as_of": pa.array([str(latest[u][0]) for u in users], pa.string()),
            "representation": pa.array([latest[u][1].tolist() for u in users], pa.list_(pa.float32())),
        }
    )
    with _whole_file(out) as fh:
        pq.write_table(table, fh)


@contextlib.contextmanager
def _whole_file(out: str) -> Iterator[IO[bytes]]:
    """A file written beside `out` and moved into place when the block ends without an error, so
    `out` appears complete or not at all (an earlier file there is replaced)."""
    fs, path = filesystem(out)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open(tmp, "wb") as fh:
            yield fh
        if fs.exists(path):
            fs.rm(path)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
