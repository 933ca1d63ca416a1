"""`mtrec predict`: a logged model (`models:/<name>@champion`, a version, `runs:/...`) scores a day's
logs as served, into one Parquet file: the row's id (`row_id`, or its `file` and `row` ordinal when
the logs have none) and one column per task (probability; regression value).

Every row of the day is scored (labels are neither needed nor read, so request logs work too);
memory is bounded by one read batch. The file appears complete or not at all: it is written
beside its destination and moved into place at the end.

`predict_on_workers` (`mtrec predict --workers N`) does the same on Ray Train workers with the
model sharded, into a folder of Parquet parts (one set per worker) and `_SUCCESS`.
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


def read_for_scoring(
    files: pa.Table, kinds: dict, view: dict, storage: dict | None = None, row_id: bool = True
) -> Iterator[pa.Table]:
    """Ray Data UDF of `predict_on_workers`: every row of these files (index, url, name, size; no
    contract rule: labels are not read), the model's input columns typed as served and cast to
    one type per kind (`serving.typed_inputs`), with `row_id`, or the file index and the row's
    ordinal in the file (`_file`, `_row`) when the logs have none."""
    from mtrec.data.io import DataFile, apply_storage_options
    from mtrec.serving import typed_inputs
    from mtrec.train.position import FILE_COL, ROW_COL

    apply_storage_options(storage or {})
    columns = ColumnsConfig.model_validate(view)
    for item in files.to_pylist():
        f = DataFile(item["url"], item["name"], item["size"])
        ordinal = 0
        for rb in iter_file_batches(f, columns=list(kinds) + (["row_id"] if row_id else []), view=columns):
            t = typed_inputs(pa.Table.from_batches([rb]), kinds, canonical=True)
            n = rb.num_rows
            if row_id:
                t = t.append_column("row_id", rb.column("row_id").cast(pa.int64()))
            else:
                t = t.append_column(FILE_COL, pa.array(np.full(n, item["index"], dtype=np.int32)))
                t = t.append_column(ROW_COL, pa.array(np.arange(ordinal, ordinal + n, dtype=np.int64)))
            ordinal += n
            yield t


def predict_on_workers(cfg, model_uri: str, day: dt.date, out: str, address: str | None = None) -> dict:
    """Score every row of `day` under `cfg`'s logs with a registered version (`models:/NAME/N`,
    `models:/NAME@alias`) or a published checkpoint's URL, by `train.num_workers` Ray Train workers:
    the checkpoint loaded sharded (any size: no process holds the whole model), the rows read by
    Ray Data, each worker writing its rows' scores as Parquet parts into the folder `out`
    (`part-<rank>-<k>.parquet`: `row_id`, or `file` and `row`, and one column per served output).
    An earlier output in `out` is replaced; `_SUCCESS` (JSON: rows, parts, checkpoint) is written
    last, so a reader that waits for it never sees a half-written day.

    Returns:
        dict: {"rows", "files", "parts", "seconds", "out", "columns", "checkpoint"}.
    Raises:
        DataValidationError: no logs for the day, or a file lacks a feature column the model reads.
        ConfigError: `model_uri` names neither a registered mtrec version nor a checkpoint.
        MtrecError: a worker failed (named).
    """
    import json

    from mtrec.data.columns import contract_schema
    from mtrec.data.validate import _read_footer
    from mtrec.errors import ConfigError
    from mtrec.jobs.cluster import ray_session
    from mtrec.jobs.protocol import run_scoring
    from mtrec.tracking import registered_version
    from mtrec.tracking.gate import version_bn_stats, version_config
    from mtrec.train import checkpoint
    from mtrec.train.worker import PredictJob, RunCollector, predict_loop_per_worker

    t0 = time.perf_counter()
    url, bn_stats = model_uri, None
    if model_uri.startswith("models:/"):
        v = registered_version(cfg, model_uri)
        if v is None or not v.checkpoint:
            raise ConfigError(f"{model_uri} names no registered mtrec version with a checkpoint; pass one that does")
        url, bn_stats = v.checkpoint, version_bn_stats(cfg, v)  # a recalibrated version: its own BN statistics
    elif model_uri.startswith("runs:/"):
        raise ConfigError(
            f"--workers scores a checkpoint: pass models:/NAME/N, models:/NAME@alias or its URL, not {model_uri}"
        )
    checkpoint.read_manifest(url)  # published, or one line saying it is not
    vcfg = version_config(cfg, url)
    if vcfg is None:
        raise ConfigError(f"{url}'s manifest does not say its sampling offsets; score it without --workers")
    spec = vcfg.spec.serving()
    kinds = {c: spec.column_roles()[c][0] for c in spec.input_columns()}
    files = list_day_files(cfg.job.logs, day)
    if not files:
        raise DataValidationError(f"no Parquet files for {day} under {cfg.job.logs}; check --logs and --date")
    footers = [_read_footer(f) for f in files]  # one footer read per file: its columns and rows
    schemas = [contract_schema(m.schema.to_arrow_schema(), spec.columns) for m in footers]
    for f, schema in zip(files, schemas, strict=True):
        missing = [c for c in kinds if c not in schema.names]
        if missing:
            raise DataValidationError(
                f"{f.url} lacks feature column(s) {', '.join(missing)} that {model_uri} reads; "
                "score logs written under the model's data contract"
            )
    row_id = all("row_id" in s.names for s in schemas)
    fs, root = filesystem(out)
    if fs.exists(root):
        if not fs.isdir(root) or (fs.ls(root, detail=False) and not fs.exists(f"{root}/_SUCCESS")):
            raise ConfigError(
                f"--out {out} exists and is not an earlier output of mtrec predict --workers (no _SUCCESS in it); "
                "pass a new or empty folder"
            )
        if fs.exists(f"{root}/_SUCCESS"):
            fs.rm(f"{root}/_SUCCESS")  # an earlier output is replaced: first it stops being complete
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    with ray_session(cfg, address):
        import ray.data

        collector = RunCollector.remote()
        items = [{"index": i, "url": f.url, "name": f.name, "size": f.size} for i, f in enumerate(files)]
        rows_ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_for_scoring,
            fn_kwargs={
                "kinds": kinds,
                "view": spec.columns.model_dump(mode="json"),
                "storage": cfg.job.storage_options,
                "row_id": row_id,
            },
            batch_size=1,
            batch_format="pyarrow",
        )
        job = PredictJob(
            cfg=vcfg.model_dump(mode="json"),
            checkpoint=url,
            out=out,
            names=tuple(f.name for f in files),
            row_id=row_id,
            bn_stats=bn_stats,
            collector=collector,
        )
        result = run_scoring(cfg, predict_loop_per_worker, job, {"rows": rows_ds}, f"{cfg.name}-predict-{day}")
    ranks = result.get("ranks") or []
    rows = sum(r["rows"] for r in ranks)
    if rows != sum(m.num_rows for m in footers):  # every row scored once: no _SUCCESS otherwise
        raise MtrecError(
            f"the workers scored {rows:,} rows but the day's files hold {sum(m.num_rows for m in footers):,}; "
            f"{out} has no _SUCCESS - rerun the command"
        )
    parts = sorted(p for r in ranks for p in r["parts"])
    columns = (["row_id"] if row_id else ["file", "row"]) + list(spec.served_columns())
    with fs.open(f"{root}/_SUCCESS", "w") as fh:
        fh.write(json.dumps({"rows": rows, "parts": parts, "checkpoint": url, "day": day.isoformat()}))
    return {
        "rows": rows,
        "files": len(files),
        "parts": len(parts),
        "seconds": time.perf_counter() - t0,
        "out": out,
        "columns": columns,
        "checkpoint": url,
    }
