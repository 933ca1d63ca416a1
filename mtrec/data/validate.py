"""The data contract, checked: schema per file, rules per row, quarantine with counts.

Schema problems (a missing or wrongly-typed column) stop the day with one line naming the file,
the column and the fix: nothing is trained on a day whose schema is wrong. Row problems send the
row to ``<workdir>/quarantine/dt=D/`` with a ``reason`` column (plus ``source_file`` and
``source_row`` so it can be traced); every input row is either good or quarantined, never dropped.
The same `RowValidator.split` filters batches in the training stream.

Example:
    >>> report = validate_day(spec, "./world", date(2026, 1, 1), "./mtrec-work")     # doctest: +SKIP
    >>> report.input_rows == report.good_rows + report.bad_rows
    True
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrec.data.columns import contract_schema, contract_view, log_columns
from mtrec.data.io import DataFile, day_url, filesystem, join, list_day_files
from mtrec.data.kinds import COLUMN_TYPES, list_lengths
from mtrec.errors import DataValidationError
from mtrec.spec import ID_COLUMNS, POSITION_COLUMN, ColumnsConfig, LabelKind, ModelSpec

log = logging.getLogger(__name__)

# The contract's own label rules (docs/data-contract.md), applied when the columns are declared.
CONTRACT_IMPLIES = (("conversion", "click"), ("daction", "click"), ("oaction", "click"))
CONTRACT_EXCLUSIVE = (("daction", "oaction"),)
BATCH_ROWS = 65_536  # rows per Arrow batch read: bounded memory whatever the day's size
QUARANTINE_EXTRA = ("source_file", "source_row", "reason")

Mask = Callable[[pa.RecordBatch], np.ndarray]


class Split(NamedTuple):
    """A batch split by the contract: `good` rows, `bad` rows (+ `reason`), `bad_index` (the row
    numbers of the bad rows in the batch)."""

    good: pa.RecordBatch
    bad: pa.RecordBatch
    bad_index: np.ndarray


def _i64(col: pa.Array) -> pa.Array:
    """Integer or boolean column as int64 (rules compare against 0/1 and bounds)."""
    return pc.cast(col, pa.int64(), safe=False)


def _np(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrow boolean (nulls = False) -> numpy bool."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


@dataclass
class ValidationReport:
    """What validation found in one day. ``input_rows == good_rows + bad_rows`` always."""

    date: str
    logs: str
    quarantine: str
    input_rows: int = 0
    good_rows: int = 0
    bad_rows: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)  # sequence group -> good rows cut to max_len
    warnings: list[str] = field(default_factory=list)  # what looks wrong without breaking a rule
    files: list[dict] = field(default_factory=list)
    max_bad_fraction: float = 0.01
    seconds: float = 0.0

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.input_rows if self.input_rows else 0.0

    @property
    def passed(self) -> bool:
        return self.bad_fraction <= self.max_bad_fraction

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "bad_fraction": self.bad_fraction, "passed": self.passed}, indent=2)

    def summary(self) -> str:
        """Human-readable lines for the console."""
        lines = [
            f"day {self.date}: {self.input_rows:,} rows in {len(self.files)} files, "
            f"{self.good_rows:,} good, {self.bad_rows:,} quarantined ({self.bad_fraction:.3%}, "
            f"limit {self.max_bad_fraction:.2%}) in {self.seconds:.1f}s",
        ]
        for reason, n in self.by_reason.items():
            if n:
                lines.append(f"  {reason:<28} {n:>10,}")
        for group, n in self.truncated.items():
            if n:
                lines.append(f"  {'truncated:' + group:<28} {n:>10,}  (good rows; the newest max_len kept)")
        if self.bad_rows:
            lines.append(f"  quarantine: {self.quarantine}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _dense_rule(col: str, missing_is_bad: bool) -> Mask:
    """A dense feature's bad rows: infinite, and (without `fill`) null or NaN too (with `fill`
    they take the fill value in the batch converter)."""

    def bad(b: pa.RecordBatch) -> np.ndarray:
        x = pc.cast(b.column(col), pa.float64())
        if missing_is_bad:  # is_finite of a null is null, hence the explicit is_null
            return _np(pc.or_kleene(pc.is_null(x), pc.invert(pc.is_finite(x))))
        return _np(pc.is_inf(x))

    return bad


def _parallel_rule(cols: list[str]) -> Mask:
    """A sequence group's rows whose lists differ in length (a null list has length 0)."""

    def bad(b: pa.RecordBatch) -> np.ndarray:
        first = list_lengths(b.column(cols[0]))
        out = np.zeros(b.num_rows, dtype=bool)
        for c in cols[1:]:
            out |= list_lengths(b.column(c)) != first
        return out

    return bad


def _named(col: str, columns: ColumnsConfig) -> str:
    """`col`, or `src` (read as `col`, `columns.…`) for a mapped one."""
    src = columns.source(col)
    return f"`{col}`" if src == col else f"`{src}` (read as `{col}`)"


def _missing(missing: list[str], roles: dict[str, tuple[str, str]], columns: ColumnsConfig) -> str:
    """One line naming every missing column, what requires it and how to fix each."""
    parts, hints = [], []
    for col in missing:
        role, by = roles[col]
        parts.append(f"{_named(col, columns)} (required by {by})")
        if by == "the data contract":
            hints.append(
                f"map `{col}` to the log's column with `columns.{col}: <name>`, or drop the "
                + ("bias feature that reads it" if role == "position" else "feature that reads it")
            )
        elif by == "`labels`":
            hints.append(
                f"map label `{col}` with `columns.labels: {{{col}: <name>}}`, or drop it from `labels` and its tasks"
            )
        else:
            hints.append("add the column to the export, name it with the feature's `column:`, or remove the feature")
    hint = "; ".join(dict.fromkeys(hints))
    return f"column(s) missing: {', '.join(parts)}; {hint}"


class RowValidator:
    """Schema check and per-row rules of the data contract for one config.

    Args:
        spec (ModelSpec): declares the label, feature and bias columns to check.

    Example:
        >>> v = RowValidator(spec)
        >>> good, bad, _ = v.split(batch)       # bad has a `reason` column
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.rules: list[tuple[str, Mask]] = self._rules()
        self.reasons: list[str] = list(dict.fromkeys(r for r, _ in self.rules))

    # ---- schema ---------------------------------------------------------------------------------
    def check_schema(self, schema: pa.Schema, where: str) -> None:
        """Raise DataValidationError (one line) on missing or wrongly-typed columns, naming every
        missing column at once. `schema` is the file's own (its column names as logged)."""
        columns = self.spec.columns
        schema = contract_schema(schema, columns)
        names = set(schema.names)
        roles = self.spec.column_roles()
        missing = [col for col in roles if col not in names]
        if missing:
            raise DataValidationError(f"{where}: {_missing(missing, roles, columns)}")
        for col, (role, by) in roles.items():
            ct = COLUMN_TYPES[role]
            t = schema.field(col).type
            if not ct.accepts(t):
                raise DataValidationError(
                    f"{where}: column {_named(col, columns)} has type {t}, expected {ct.wanted} (required by {by}); "
                    "fix the export's type or the config"
                )

    # ---- row rules ------------------------------------------------------------------------------
    def _rules(self) -> list[tuple[str, Mask]]:
        spec = self.spec
        rules: list[tuple[str, Mask]] = []
        roles = spec.column_roles()
        for col in ID_COLUMNS:
            if col in roles:
                rules.append(("null_id", lambda b, c=col: _np(pc.is_null(b.column(c)))))
        if POSITION_COLUMN in roles:
            rules.append(
                (
                    "bad_position",
                    lambda b: _np(
                        pc.or_kleene(pc.is_null(b.column(POSITION_COLUMN)), pc.less(_i64(b.column(POSITION_COLUMN)), 0))
                    ),
                )
            )
        for col in spec.labels:
            rules.append(("null_label", lambda b, c=col: _np(pc.is_null(b.column(c), nan_is_null=True))))
        for col, kind in spec.labels.items():
            if kind == LabelKind.BINARY:
                rules.append(
                    (
                        "label_out_of_range",
                        lambda b, c=col: _np(pc.invert(pc.is_in(_i64(b.column(c)), pa.array([0, 1], pa.int64())))),
                    )
                )
            elif kind == LabelKind.MULTICLASS:
                # a class outside 0..K-1 (K of the tasks that read it; none: only negatives are bad)
                k = next((t.classes for t in spec.tasks if t.label == col), None)
                rules.append(
                    (
                        "label_out_of_range",
                        lambda b, c=col, k=k: _np(
                            pc.or_kleene(
                                pc.less(_i64(b.column(c)), 0),
                                pc.greater_equal(_i64(b.column(c)), k if k is not None else 2**62),
                            )
                        ),
                    )
                )
            else:
                # infinite; or <= -1 where a task trains on log1p(label)
                floor = -1.0 if any(t.log1p and t.label == col for t in spec.tasks) else -np.inf
                rules.append(
                    (
                        "label_out_of_range",
                        lambda b, c=col, lo=floor: _np(
                            pc.or_kleene(
                                pc.is_inf(pc.cast(b.column(c), pa.float64())),
                                pc.less_equal(pc.cast(b.column(c), pa.float64()), lo),
                            )
                        ),
                    )
                )
        implies = [(c, p) for c, p in CONTRACT_IMPLIES if c in spec.labels and p in spec.labels]
        for t in spec.tasks:
            if t.given is not None:
                pair = (t.label, spec.task(t.given).label)
                if pair not in implies and pair[0] != pair[1]:
                    implies.append(pair)
        for child, parent in implies:
            # a non-zero child label (conversion=1, watch_time>0) requires parent=1
            rules.append(
                (
                    f"{child}_without_{parent}",
                    lambda b, c=child, p=parent: _np(
                        pc.and_kleene(
                            pc.not_equal(pc.cast(b.column(c), pa.float64()), 0), pc.not_equal(_i64(b.column(p)), 1)
                        )
                    ),
                )
            )
        for a, b_ in CONTRACT_EXCLUSIVE:
            if a in spec.labels and b_ in spec.labels:
                rules.append(
                    (
                        f"{a}_and_{b_}",
                        lambda b, x=a, y=b_: _np(
                            pc.and_kleene(pc.equal(_i64(b.column(x)), 1), pc.equal(_i64(b.column(y)), 1))
                        ),
                    )
                )
        for g in spec.features.sequences:
            if len(g.features) > 1:
                rules.append(("sequence_length_mismatch", _parallel_rule([f.source for f in g.features])))
        for f in spec.features.dense:
            rules.append((f"bad_feature:{f.source}", _dense_rule(f.source, f.fill is None)))
        for f in spec.features.bias:
            if f.source != POSITION_COLUMN:
                rules.append(
                    (
                        f"bad_feature:{f.source}",
                        lambda b, c=f.source: _np(pc.or_kleene(pc.is_null(b.column(c)), pc.less(_i64(b.column(c)), 0))),
                    )
                )
        return rules

    def truncated(self, good: pa.RecordBatch) -> dict[str, int]:
        """Per sequence group, the rows of `good` whose lists are longer than `max_len` (training
        keeps their newest `max_len`): counted, not quarantined."""
        return {
            g.name: int((list_lengths(good.column(g.features[0].source)) > g.max_len).sum())
            for g in self.spec.features.sequences
        }

    def reason_codes(self, batch: pa.RecordBatch) -> np.ndarray:
        """Per row: index into `self.reasons` of the first rule it breaks, or -1 (good). Shape B."""
        codes = np.full(batch.num_rows, -1, dtype=np.int16)
        for reason, rule in self.rules:
            hit = rule(batch) & (codes < 0)
            codes[hit] = self.reasons.index(reason)
        return codes

    def split(self, batch: pa.RecordBatch) -> Split:
        """Good rows, and bad rows with a `reason` column appended. Together they are the batch."""
        codes = self.reason_codes(batch)
        bad = codes >= 0
        index = np.flatnonzero(bad)
        if not index.size:
            return Split(batch, batch.slice(0, 0).append_column("reason", pa.array([], pa.string())), index)
        reasons = np.asarray(self.reasons, dtype=object)[codes[bad]]
        bad_b = batch.filter(pa.array(bad)).append_column("reason", pa.array(reasons, pa.string()))
        return Split(batch.filter(pa.array(~bad)), bad_b, index)


def iter_file_batches(
    f: DataFile, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS, view: ColumnsConfig | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream one Parquet file as Arrow batches (bounded memory). With `view` (a spec's
    `columns`), as the contract names them (`contract_view`); `columns` then names contract
    columns."""
    fs, path = filesystem(f.url)
    if view is not None and columns is not None:
        columns = log_columns(columns, view)
    with fs.open(path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns):
            yield batch if view is None else contract_view(batch, view)


def read_schema(f: DataFile, view: ColumnsConfig | None = None) -> pa.Schema:
    """A file's schema, from its footer; with `view`, as the contract names it (`contract_schema`)."""
    schema = _read_footer(f).schema.to_arrow_schema()
    return schema if view is None else contract_schema(schema, view)


def check_day(spec: ModelSpec, logs: str, day: dt.date) -> list[DataFile]:
    """The cheap checks of a day to train, from the files' footers alone (no row is read): the
    day's folder exists and holds Parquet files, they hold rows, and every file has the spec's
    columns with accepted types. Jobs run it before starting Ray, so a missing, empty or
    column-less day fails in a second with one line.

    Returns:
        The day's files.

    Raises:
        DataValidationError: one line naming the day or file and the fix.
    """
    files = list_day_files(logs, day)
    validator = RowValidator(spec)
    rows = 0
    for f in files:
        meta = _read_footer(f)
        validator.check_schema(meta.schema.to_arrow_schema(), f"logs {day} file {f.name}")
        rows += meta.num_rows
    if rows == 0:
        raise DataValidationError(_empty_day(day, logs, len(files)))
    return files


def _empty_day(day: dt.date, logs: str, files: int) -> str:
    return (
        f"the logs of {day} hold no rows ({files} empty file(s) under {logs}); the export is empty or truncated - "
        "re-export the day, or set `job.allow_gaps: true` to skip days without logs; nothing was trained"
    )


def footer_rows(files: list[DataFile]) -> int:
    """Rows of these files, from their footers."""
    return sum(_read_footer(f).num_rows for f in files)


def day_rows(root: str, day: dt.date) -> int:
    """Rows of a day's logs under `root`, from the files' footers (no row is read): 0 for a day
    without logs (no folder, no Parquet file in it, or files with no row). What a gap is, for every
    command that skips days without logs (`job.allow_gaps`, evaluation ranges, the gate's slice,
    serving logs).

    Raises:
        DataValidationError: the root itself does not exist (a typo, a missing mount: not a gap),
            or a file of the day is not readable Parquet (a broken export: not a gap).
    """
    fs, path = filesystem(day_url(root, day))
    if not fs.isdir(path):
        root_fs, root_path = filesystem(root)
        if not root_fs.isdir(root_path):
            raise DataValidationError(
                f"the logs root {root} does not exist; check --logs (job.logs) for a typo or a missing mount"
            )
        return 0
    try:
        files = list_day_files(root, day)
    except DataValidationError:  # the folder holds no .parquet file
        return 0
    return footer_rows(files)


def _read_footer(f: DataFile) -> pq.FileMetaData:
    fs, path = filesystem(f.url)
    try:
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata
    except PermissionError as e:
        raise DataValidationError(
            f"{f.url}: access denied ({e}); give these credentials read access to the logs (AWS_ACCESS_KEY_ID, "
            "the node's role, ...)"
        ) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataValidationError(
            f"{f.url}: not a readable Parquet file ({e}); re-export the file or remove it from the day"
        ) from None


def quarantine_url(workdir: str, day: dt.date) -> str:
    return day_url(join(workdir, "quarantine"), day)


@dataclass
class FileCounts:
    """What the contract found in one file: its rows, the quarantined ones by reason, good rows
    whose sequences were cut to max_len, and the smallest good position. `validate_day` and a
    training job's read (`checked_batches`, the same pass that feeds training) make them alike."""

    name: str
    size: int
    rows: int = 0
    bad: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    lowest: int | None = None  # the smallest good position as the contract reads it (None: no position column)

    @property
    def good(self) -> int:
        return self.rows - self.bad


def checked_batches(
    f: DataFile,
    validator: RowValidator,
    counts: FileCounts,
    quarantine: str | None = None,
    fill: dict[str, pa.DataType] | None = None,
) -> Iterator[pa.RecordBatch]:
    """One file's good rows batch by batch as read, under the contract's names; every row counted
    in `counts` (good, or bad by reason). With `quarantine` (a folder URL), the bad rows are written
    as logged (the log's own columns, plus `source_file`, `source_row`, `reason`) to
    `<quarantine>/<file name>`, complete when the file has been read to its end. Columns of `fill`
    that the file lacks are added as zeros of their type before the row rules (serving logs)."""
    spec = validator.spec
    roles = spec.column_roles()
    qfs, qpath = filesystem(quarantine) if quarantine is not None else (None, None)
    writer: pq.ParquetWriter | None = None
    sink = None
    try:
        for raw in iter_file_batches(f):  # every column: the bad-row rules need them, and quarantine keeps them
            batch = contract_view(raw, spec.columns)
            for c, t in (fill or {}).items():
                if c not in batch.schema.names:
                    batch = batch.append_column(c, pa.array(np.zeros(batch.num_rows, np.int64)).cast(t))
            good, bad, bad_index = validator.split(batch)
            if POSITION_COLUMN in roles and good.num_rows:
                low = pc.min(good.column(POSITION_COLUMN)).as_py()
                counts.lowest = low if counts.lowest is None else min(counts.lowest, low)
            if bad.num_rows:
                for reason, n in zip(
                    *np.unique(bad.column("reason").to_numpy(zero_copy_only=False), return_counts=True), strict=True
                ):
                    counts.by_reason[str(reason)] = counts.by_reason.get(str(reason), 0) + int(n)
                if qfs is not None:  # quarantined as logged: the log's own columns and values
                    logged = raw.take(pa.array(bad_index)).append_column("reason", bad.column("reason"))
                    logged = _with_source(logged, f.name, bad_index + counts.rows)
                    if writer is None:
                        qfs.makedirs(qpath, exist_ok=True)
                        sink = qfs.open(f"{qpath}/{f.name.replace('/', '_')}", "wb")
                        writer = pq.ParquetWriter(sink, logged.schema)
                    writer.write_batch(logged)
            for group, n in validator.truncated(good).items():
                counts.truncated[group] = counts.truncated.get(group, 0) + n
            counts.rows += batch.num_rows
            counts.bad += bad.num_rows
            yield good
    finally:
        if writer is not None:
            writer.close()
            sink.close()


def clear_quarantine(workdir: str, day: dt.date) -> str:
    """The day's quarantine folder emptied (validating a day again replaces it); returns its URL."""
    qurl = quarantine_url(workdir, day)
    qfs, qpath = filesystem(qurl)
    if qfs.exists(qpath):
        qfs.rm(qpath, recursive=True)
    return qurl


def day_report(
    spec: ModelSpec,
    logs: str,
    day: dt.date,
    workdir: str,
    counts: list[FileCounts],
    max_bad_fraction: float = 0.01,
    seconds: float = 0.0,
) -> ValidationReport:
    """A day's report from its files' counts (in file order), written to
    `<quarantine>/_report.json`, with the threshold enforced (`seconds`: what counting took).

    Raises:
        DataValidationError: the quarantined fraction is above `max_bad_fraction` (the quarantine
            and the report are written first, so the rows can be inspected).
    """
    validator = RowValidator(spec)
    qurl = quarantine_url(workdir, day)
    report = ValidationReport(
        date=day.isoformat(),
        logs=day_url(logs, day),
        quarantine=qurl,
        by_reason={r: 0 for r in validator.reasons},
        truncated={g.name: 0 for g in spec.features.sequences},
        max_bad_fraction=max_bad_fraction,
        seconds=seconds,
    )
    lowest = None
    for c in counts:
        report.input_rows += c.rows
        report.bad_rows += c.bad
        report.good_rows += c.good
        for reason, n in c.by_reason.items():
            report.by_reason[reason] = report.by_reason.get(reason, 0) + n
        for group, n in c.truncated.items():
            report.truncated[group] = report.truncated.get(group, 0) + n
        if c.lowest is not None:
            lowest = c.lowest if lowest is None else min(lowest, c.lowest)
        report.files.append({"name": c.name, "size": c.size, "rows": c.rows, "quarantined": c.bad})
    if lowest is not None and lowest > 0 and spec.columns.position_base == 0:
        report.warnings.append(
            f"no position 0 in {report.good_rows:,} good rows (the smallest is {lowest}): if the logs count slots "
            "from 1, set `columns.position_base: 1`, else the learned position curve is off by one"
        )
    for w in report.warnings:
        log.warning(f"day {day}: {w}")
    qfs, qpath = filesystem(qurl)
    qfs.makedirs(qpath, exist_ok=True)
    with qfs.open(f"{qpath}/_report.json", "w") as fh:
        fh.write(report.to_json())
    if not report.passed:
        top = ", ".join(f"{r} {n:,}" for r, n in sorted(report.by_reason.items(), key=lambda kv: -kv[1]) if n)
        raise DataValidationError(
            f"day {day}: {report.bad_fraction:.2%} of rows quarantined "
            f"({report.bad_rows:,} of {report.input_rows:,}: {top}) "
            f"is above job.max_bad_fraction={max_bad_fraction:.2%}; inspect {qurl}, fix the logs or raise the limit"
        )
    return report


def validate_day(
    spec: ModelSpec, logs: str, day: dt.date, workdir: str, max_bad_fraction: float = 0.01
) -> ValidationReport:
    """Validate one day of logs, write its quarantine and report, and enforce the threshold
    (`mtrec validate`; a training job does the same inside its read: `checked_batches`).

    Args:
        spec (ModelSpec): the columns and label rules to check.
        logs (str): the logs root (`<logs>/dt=YYYY-MM-DD/*.parquet`).
        day (date): the day partition to check.
        workdir (str): quarantine goes to `<workdir>/quarantine/dt=D/`.
        max_bad_fraction (float): above this quarantined fraction the day fails.

    Returns:
        ValidationReport: counts by reason; also written to ``<quarantine>/_report.json``.

    Raises:
        DataValidationError: schema problem or no rows (`check_day`: nothing written), or bad fraction above the limit
            (quarantine and report written first so the rows can be inspected).
    """
    t0 = time.perf_counter()
    files = check_day(spec, logs, day)  # schemas and rows first: a bad day stops before anything is written
    validator = RowValidator(spec)
    qurl = clear_quarantine(workdir, day)
    counts = []
    for f in files:
        c = FileCounts(f.name, f.size)
        for _ in checked_batches(f, validator, c, qurl):
            pass
        counts.append(c)
        log.debug(f"  {day_url(logs, day)}/{f.name}: {c.rows:,} rows, {c.bad:,} quarantined")
    return day_report(spec, logs, day, workdir, counts, max_bad_fraction, time.perf_counter() - t0)


def _with_source(bad: pa.RecordBatch, name: str, rows: np.ndarray) -> pa.RecordBatch:
    """Insert source_file / source_row before `reason` so a quarantined row can be traced."""
    reason = bad.column("reason")
    bad = bad.drop_columns(["reason"])
    bad = bad.append_column("source_file", pa.array([name] * bad.num_rows, pa.string()))
    bad = bad.append_column("source_row", pa.array(rows, pa.int64()))
    return bad.append_column("reason", reason)
