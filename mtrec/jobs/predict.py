"""`mtrec predict`: a logged model (`models:/<name>@champion`, a version, `runs:/...`) scores a day's
logs as served, into one Parquet file: the row's id (`row_id`, or its `file` and `row` ordinal when
the logs have none) and one column per task (probability; regression value).

Every row of the day is scored (labels are neither needed nor read, so request logs work too);
memory is bounded by one read batch. The file appears complete or not at all: it is written
beside its destination and moved into place at the end.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.data.io import filesystem, list_day_files
from mtrec.data.validate import iter_file_batches, read_schema
from mtrec.errors import DataValidationError

log = logging.getLogger(__name__)


def predict_to_parquet(model_uri: str, logs: str, day: dt.date, out: str) -> dict:
    """Score every row of `day` under `logs` with `model_uri` into the Parquet file `out`.

    Returns:
        dict: {"rows", "files", "seconds", "out", "columns"}.
    Raises:
        DataValidationError: no logs for the day, or a file lacks a feature column the model reads.
        TrackingError: the model cannot be loaded.
    """
    from mtrec.tracking import load_served

    t0 = time.perf_counter()
    served = load_served(model_uri)
    files = list_day_files(logs, day)
    if not files:
        raise DataValidationError(f"no Parquet files for {day} under {logs}; check --logs and --date")
    schemas = [read_schema(f) for f in files]
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
    fs, path = filesystem(out)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    rows = 0
    try:
        with fs.open(tmp, "wb") as fh, pq.ParquetWriter(fh, schema) as writer:
            for f in files:
                ordinal = 0
                cols = served.columns + (["row_id"] if has_row_id else [])
                for rb in iter_file_batches(f, columns=cols):
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
                    ordinal += n
                    rows += n
                log.info(f"  scored {f.name}: {ordinal:,} rows")
        if fs.exists(path):
            fs.rm(path)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return {"rows": rows, "files": len(files), "seconds": time.perf_counter() - t0, "out": out, "columns": schema.names}
