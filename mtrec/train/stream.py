"""A day's good rows as fixed-size Arrow batches, streamed file by file (bounded memory), in
training order: each day's files in a seeded random order (`read_order`) and the rows through a
seeded shuffle buffer (`shuffle_rows`), both deterministic for a given seed."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec.data.io import DataFile, list_day_files
from mtrec.data.kinds import COLUMN_TYPES
from mtrec.data.validate import FileCounts, RowValidator, checked_batches
from mtrec.spec import ModelSpec
from mtrec.train.position import FILE_COL, ROW_COL, Position, batch_positions, skip_trained


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


def epoch_seed(seed: list[int], epoch: int) -> list[int]:
    """The seed of one pass (`train.epochs`) over a job's rows: epoch 0 keeps `seed`, so a 1-pass
    job reads in the order it read before epochs existed; epoch e > 0 appends e."""
    return list(seed) if epoch == 0 else [*seed, epoch]


def read_order(files: list[DataFile], seed: int, day: dt.date, shuffle: bool, epoch: int = 0) -> list[DataFile]:
    """A day's files in the order training reads them: by name, or (`shuffle`) in a random order
    drawn from (seed, day, epoch). Logs written hour by hour then reach the shuffle buffer mixed."""
    if not shuffle or len(files) < 2:
        return list(files)
    perm = np.random.default_rng(epoch_seed([seed, day.toordinal(), 1], epoch)).permutation(len(files))
    return [files[i] for i in perm]


def job_reads(
    listed: list[tuple[dt.date, list[DataFile]]], seed: int, shuffle: bool, epochs: int = 1
) -> tuple[list[DataFile], list[int]]:
    """A job's files and the order it reads them in over `epochs` passes, from each day's files
    (`list_day_files`). Returns (files: every day's files in epoch 0's order, the job's file list;
    reads: one entry per file read, in reading order, each the index a position gives that read:
    epoch x len(files) + the file's index in `files`). Each pass reads the days in order, each
    day's files in `read_order` of that epoch.

    Example: one day of files [a, b], epochs=2, files read b, a then a, b -> ([b, a], [0, 1, 3, 2])."""
    per_epoch = [[f for day, fs in listed for f in read_order(fs, seed, day, shuffle, e)] for e in range(epochs)]
    files = per_epoch[0]
    index = {f.url: i for i, f in enumerate(files)}
    return files, [e * len(files) + index[f.url] for e, fs in enumerate(per_epoch) for f in fs]


# rows the shuffle moves together: a run of consecutive rows of one user (one request's
# impressions, which a model with a user part computes once), at most this long
SHUFFLE_RUN = 64


def _run_starts(users: pa.ChunkedArray) -> np.ndarray:
    """The first row of each run: consecutive rows of one user, at most SHUFFLE_RUN long."""
    u = users.to_numpy()
    n = len(u)
    start = np.ones(n, dtype=bool)
    start[1:] = u[1:] != u[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    start |= (np.arange(n) - first) % SHUFFLE_RUN == 0
    return np.flatnonzero(start)


def shuffle_rows(
    batches: Iterable[pa.RecordBatch], buffer_rows: int, seed: list[int], together: str | None = "user_id"
) -> Iterator[pa.RecordBatch]:
    """The rows of `batches` in a random order drawn from `seed`, holding at most ~1.5 x
    `buffer_rows` rows (0: unchanged). Consecutive rows with one value of `together` (a request's
    impressions: one user) move as one run of at most SHUFFLE_RUN rows, so a model that computes a
    user's part once per distinct context (DUPN) keeps that saving. The input is cut into chunks
    of half the buffer, so the order depends on the rows and the seed only, not on how the input
    was batched; each chunk joins the buffer, and once the buffer is full a random half of it
    leaves. A row can leave early or stay long (a geometric number of rounds), so rows from many
    buffers apart mix. Deterministic: the same rows in the same order and seed give the same
    output, which a resumed day relies on (it replays the stream and drops the trained rows after
    this)."""
    if buffer_rows <= 0:
        yield from batches
        return
    rng = np.random.default_rng(seed)
    half = max(buffer_rows // 2, 1)
    held: pa.Table | None = None

    def mixed(t: pa.Table) -> pa.Table:
        """`t`'s runs in a random order, each run's rows in their order."""
        if not together or together not in t.column_names:  # no user column read: single rows
            return t.take(rng.permutation(t.num_rows))
        starts = _run_starts(t.column(together))
        lengths = np.diff(np.append(starts, t.num_rows))
        perm = rng.permutation(len(starts))
        first = np.repeat(starts[perm], lengths[perm])  # each row's run start, runs permuted
        within = np.arange(t.num_rows) - np.repeat(np.cumsum(lengths[perm]) - lengths[perm], lengths[perm])
        return t.take(first + within)

    for chunk in rebatch(batches, half):
        t = pa.Table.from_batches([chunk])
        held = t if held is None else pa.concat_tables([held, t])
        if held.num_rows >= buffer_rows:
            held = mixed(held)
            yield from held.slice(0, half).combine_chunks().to_batches()
            held = held.slice(half)
    if held is not None and held.num_rows:
        yield from mixed(held).combine_chunks().to_batches()


def _epoch_runs(batches: Iterable[pa.RecordBatch], files: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(epoch, rows) pieces of a stream with positions: each batch cut where its epoch (file index
    // `files`) changes; empty batches are left out (one would split an epoch in two). Batches
    without positions (or `files` 0) are epoch 0."""
    for rb in batches:
        if not rb.num_rows:
            continue
        pos = batch_positions(rb)
        if pos is None or files <= 0:
            yield 0, rb
            continue
        epoch = pos[0] // files
        cuts = [0, *(np.flatnonzero(np.diff(epoch)) + 1).tolist(), rb.num_rows]
        for lo, hi in itertools.pairwise(cuts):
            yield int(epoch[lo]), rb.slice(lo, hi - lo)


def shuffle_epochs(
    batches: Iterable[pa.RecordBatch], files: int, buffer_rows: int, seed: list[int], together: str | None = "user_id"
) -> Iterator[pa.RecordBatch]:
    """`shuffle_rows` pass by pass: a stream of several passes over a job's `files` files (a
    position's file index is epoch x `files` + the file's index, `job_reads`) is cut where the
    epoch changes, and each pass goes through a buffer of its own seeded by `epoch_seed(seed,
    epoch)`. Every pass is ordered differently, no row mixes into another pass, and one pass's
    order does not depend on the passes before it (a resumed job need not read the passes it
    finished). A 1-pass stream comes out exactly as from `shuffle_rows(batches, buffer_rows, seed)`."""
    for epoch, pieces in itertools.groupby(_epoch_runs(batches, files), key=lambda p: p[0]):
        yield from shuffle_rows((rb for _, rb in pieces), buffer_rows, epoch_seed(seed, epoch), together)


def good_file_batches(
    f: DataFile,
    validator: RowValidator,
    roles: dict[str, tuple[str, str]],
    counts: StreamCounts | None = None,
    file_index: int | None = None,
    fill: dict[str, pa.DataType] | None = None,
    check: FileCounts | None = None,
    quarantine: str | None = None,
) -> Iterator[pa.RecordBatch]:
    """One file's good rows, canonical (`canonical`), batch by batch as read. The one reader of
    training data: the single-process stream below and the Ray Data read tasks both use it.
    With `file_index`, each row also carries its position (`mtrec.train.position`): `_file` =
    file_index, `_row` = its ordinal among the file's good rows. Columns of `fill` that the file
    lacks are added as zeros of their type before the row rules (`feature_batches`). The same
    pass validates (`validate.checked_batches`): `check` receives the file's counts, and with
    `quarantine` (a folder URL) its bad rows are written there as logged."""
    if counts is not None:
        counts.files.append(f.url)
    check = check if check is not None else FileCounts(f.name, f.size)
    ordinal = 0
    for good in checked_batches(f, validator, check, quarantine, fill):
        if counts is not None:
            counts.good += good.num_rows
        out = canonical(good, roles)
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
    if counts is not None:
        counts.read += check.rows
        counts.bad += check.bad


def day_batches(
    spec: ModelSpec,
    logs: str,
    days: Iterable[dt.date],
    batch_size: int,
    counts: StreamCounts | None = None,
    shuffle: tuple[int, bool, list[int], str | None] | None = None,
    epochs: int = 1,
) -> Iterator[pa.RecordBatch]:
    """Good rows of `days` under the logs root `logs`, in file order, as `batch_size`-row batches,
    with positions (file index within these days' files); `counts` is filled as it goes (per file
    read). With `shuffle` = (buffer rows, shuffle files, seed: [train seed, job key, rank], the
    column whose consecutive rows move together), in training order (`read_order`, `shuffle_rows`),
    as a training job's worker reads them (`TrainConfig.shuffle_plan`). `epochs` passes over the
    days, each in its own order (`job_reads`, `shuffle_epochs`), as a full retrain's worker reads them."""
    validator = RowValidator(spec)
    roles = spec.column_roles()  # once per stream, not per batch
    buffer_rows, shuffle_files, seed, together = shuffle or (0, False, [0], None)
    files, reads = job_reads([(day, list_day_files(logs, day)) for day in days], seed[0], shuffle_files, epochs)
    n = len(files)
    good = (b for v in reads for b in good_file_batches(files[v % n], validator, roles, counts, file_index=v))
    return rebatch(shuffle_epochs(good, n, buffer_rows, seed, together), batch_size)


# the roles a served model does not read: serving-time feature logs (candidates) hold none of them
UNSERVED_ROLES = frozenset({"position", "label", "regression", "multiclass", "bias"})


def feature_batches(
    spec: ModelSpec, root: str, day: dt.date, batch_size: int, counts: StreamCounts | None = None
) -> Iterator[pa.RecordBatch]:
    """The good rows of a day of serving-time feature logs under `root` (the candidates each
    request scored: the features a served model reads, and no labels, position or bias features),
    as `batch_size`-row canonical batches. Columns of those kinds that a file lacks are added with
    neutral values (0) before the contract's row rules, so a batch has training's layout; served
    scoring reads none of them. A file that lacks a feature column is refused in one line."""
    from mtrec.data.io import day_url, filesystem
    from mtrec.errors import DataValidationError

    fs, path = filesystem(day_url(root, day))
    if not fs.isdir(path):
        raise DataValidationError(
            f"no serving logs for {day} under {root} (expected {day_url(root, day)}/*.parquet); log that day's "
            "candidates there, or check job.serving_logs / --serving-logs"
        )
    validator, roles = RowValidator(spec), spec.column_roles()
    fill = unserved_fill(spec)
    files = check_serving_files(spec, list_day_files(root, day))
    good = (b for f in files for b in good_file_batches(f, validator, roles, counts, fill=fill))
    return rebatch(good, batch_size)


def unserved_fill(spec: ModelSpec) -> dict[str, pa.DataType]:
    """The columns serving logs need not hold (labels, positions, bias features) and the type each
    is filled with (zeros) so that their rows pass the contract as training's do."""
    roles = spec.column_roles()
    return {c: COLUMN_TYPES[role].canonical(pa.int64()) for c, (role, _) in roles.items() if role in UNSERVED_ROLES}


def check_serving_files(spec: ModelSpec, files: list[DataFile]) -> list[DataFile]:
    """`files` of serving logs, each holding every feature the model reads (one footer read per
    file); one line naming the file and the columns otherwise."""
    from mtrec.data.validate import read_schema
    from mtrec.errors import DataValidationError

    fill = unserved_fill(spec)
    for f in files:
        names = set(read_schema(f, spec.columns).names)
        missing = [c for c in spec.column_roles() if c not in fill and c not in names]
        if missing:
            raise DataValidationError(
                f"{f.url} lacks {', '.join(f'`{c}`' for c in missing)}: serving logs need every feature the model "
                "reads (not labels or positions); log them at serving time, or check job.serving_logs"
            )
    return files


def read_good_rows(
    files: pa.Table,
    spec: dict,
    done: dict | None = None,
    storage: dict | None = None,
    serving: bool = False,
    report=None,
) -> Iterator[pa.Table]:
    """Ray Data UDF: the files of this block (index, url, name, size, and for a training job's
    files `file`, the file's index in an epoch, and `quarantine`, its day's folder) -> their good
    rows, canonical, with positions, one Arrow table per read batch. Rows inside `done` (a resumed
    job's trained rows, `Position.to_json()`) are not emitted, but still counted; `storage` is the
    job's `job.storage_options`; `serving`: the files are serving logs (`feature_batches`: the
    columns a served model does not read are filled). With `report` (an actor with
    `file_counts(file, FileCounts)`: the job's RunCollector), this read is the file's validation:
    its bad rows go to its quarantine folder and its counts to `report` once the file is read to
    its end, before the task ends. Lives here, away from torch, so the Ray Data read workers
    import only pyarrow and the model spec (`spec`, dumped)."""
    from mtrec.data.io import apply_storage_options

    apply_storage_options(storage or {})
    model_spec = ModelSpec.model_validate(spec)
    validator, roles = RowValidator(model_spec), model_spec.column_roles()
    fill = unserved_fill(model_spec) if serving else None
    trained = Position.from_json(done)
    for row in files.to_pylist():
        f = DataFile(row["url"], row["name"], row["size"])
        check = FileCounts(f.name, f.size)
        quarantine = row.get("quarantine") if report is not None else None
        good = good_file_batches(f, validator, roles, None, row["index"], fill, check, quarantine)
        for b in skip_trained(good, trained):
            if b.num_rows:
                yield pa.Table.from_batches([b])
        if report is not None:
            import ray

            ray.get(report.file_counts.remote(row["file"], check))  # recorded before this task can end
