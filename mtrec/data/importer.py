"""`mtrec import`: a user's export files in, the data contract's day folders out.

Reads CSV, JSON lines and Parquet files (any fsspec URL, globs, folders; `.gz` / `.bz2` / `.xz` /
`.zst` CSV and JSON lines too) in Arrow batches, gives every row a day (from a day column, or
`rows_per_day` consecutive rows per day), and writes ``<out>/dt=YYYY-MM-DD/part-NNNNN.parquet``.
Column names and pyarrow's inferred types are kept: the config's `columns:` maps the contract's
names to them. Memory stays bounded: the sources are streamed, and the days' buffers together
never exceed `MAX_BUFFERED_BYTES`.

Every day is written under ``<out>/_staging/<import id>/`` and moved into place only when all
sources were read and every check passed; if a move fails, ``<out>`` is put back as it was.

Example:
    >>> s = import_files(["export/*.csv"], "s3://logs", ImportOptions(day_column="ts"))   # doctest: +SKIP
    >>> [(d["day"], d["rows"], d["files"]) for d in s.days]                              # doctest: +SKIP
    [('2026-04-05', 1204331, 2), ('2026-04-06', 998412, 1)]
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from mtrec.data.io import day_url, filesystem, is_local_fs, join
from mtrec.errors import ConfigError, DataValidationError, MtrecError, first_line

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 << 20  # CSV / JSON bytes parsed at a time; the first block of a file sets its column types
PARQUET_BATCH_ROWS = 65_536  # rows per batch read from a Parquet source
ROW_GROUP_ROWS = 131_072  # rows a day buffers before writing them out as one row group
MAX_BUFFERED_BYTES = 128 << 20  # all days' buffers together (~2x that in RSS); above it the largest is written
COMPACT_BATCHES = 64  # a day's small pieces are concatenated by this many: objects cost memory too
MAX_OPEN_FILES = 32  # output files open at once; the least recently written is closed (a complete part)
DAY_RANGE = (dt.date(1900, 1, 1), dt.date(2199, 12, 31))  # outside: a unit mix-up (ms read as s), a bad day
STAGING = "_staging"
REJECTS = "_import_rejects"
REPLACED = "_replaced"  # in the staging folder: the old versions of the days replaced
REJECT_COLUMNS = ("source_file", "source_row", "reason")
_EPOCH = dt.date(1970, 1, 1)
_BAD = np.iinfo(np.int32).min  # day code of a row without a valid day


class SourceFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"


class DayFormat(StrEnum):
    """How a day column's values name a day (`--day-format`); detected when not given."""

    DATE = "date"  # a date column (or `YYYY-MM-DD` strings)
    TIMESTAMP = "timestamp"  # a timestamp column; naive ones are UTC
    ISO = "iso"  # ISO 8601 strings: `2026-04-05`, `2026-04-05T13:45:00`, `...Z`, `...+02:00`
    YYYYMMDD = "yyyymmdd"  # 20260405 as an integer or a string
    EPOCH = "epoch"  # seconds since 1970-01-01 UTC, integer or fractional
    EPOCH_MS = "epoch_ms"  # milliseconds since 1970-01-01 UTC


class BadDays(StrEnum):
    """What happens to rows whose day value is null or unparseable (`--bad-days`)."""

    FAIL = "fail"  # stop the import, nothing written
    QUARANTINE = "quarantine"  # write them to <out>/_import_rejects/ and import the rest


EXTENSIONS = {
    ".csv": SourceFormat.CSV,
    ".jsonl": SourceFormat.JSONL,
    ".ndjson": SourceFormat.JSONL,
    ".json": SourceFormat.JSONL,
    ".parquet": SourceFormat.PARQUET,
    ".pq": SourceFormat.PARQUET,
}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")  # fsspec decompresses these (CSV and JSON lines only)
_GLOB = re.compile(r"[*?\[]")
_INT_TEXT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class ImportOptions:
    """How to import: exactly one of `day_column` or `rows_per_day` (with `start`).

    Args:
        day_column (str): the column that says each row's day (its source or `rename`d name).
        day_format (DayFormat): how its values name a day; None: detected from its type and first value.
        timezone (str): the IANA zone whose midnight starts a day, for timestamps (None: UTC).
        rows_per_day (int): for logs without a date: consecutive rows fill day after day from `start`.
        start (date): the first day of `rows_per_day`.
        format (SourceFormat): the sources' format; None: from each file's extension.
        rows_per_file (int): rows per output Parquet file at most.
        overwrite (bool): replace a day folder that already exists (only the days this import writes).
        bad_days (BadDays): rows without a valid day fail the import (default) or go to quarantine.
        rename (dict): source column name -> output column name.
        strings (tuple): columns read as strings (ids with leading zeros), by source or output name.
    """

    day_column: str | None = None
    day_format: DayFormat | None = None
    timezone: str | None = None
    rows_per_day: int | None = None
    start: dt.date | None = None
    format: SourceFormat | None = None
    rows_per_file: int = 1_000_000  # ~10-100 MB per file at typical widths: parallel reads, few small files
    overwrite: bool = False
    bad_days: BadDays | None = None
    rename: dict[str, str] = field(default_factory=dict)
    strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, enum in (("day_format", DayFormat), ("format", SourceFormat), ("bad_days", BadDays)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, enum):
                flag = "--" + name.replace("_", "-")
                if value not in {e.value for e in enum}:
                    raise ConfigError(f"{flag} {value!r} is not one of {', '.join(e.value for e in enum)}")
                object.__setattr__(self, name, enum(value))
        if (self.day_column is None) == (self.rows_per_day is None):
            raise ConfigError(
                "--day-column and --rows-per-day exclude each other: pass one (--day-column when the export has a date "
                "column)"
                if self.day_column is not None
                else "say how rows map to days: pass --day-column COLUMN (a date, timestamp, ISO string, YYYYMMDD or "
                "epoch seconds column), or --rows-per-day N --start YYYY-MM-DD for logs without a date"
            )
        if self.rows_per_day is not None:
            if self.rows_per_day < 1:
                raise ConfigError(f"--rows-per-day must be >= 1, got {self.rows_per_day}")
            if self.start is None:
                raise ConfigError("--rows-per-day needs --start YYYY-MM-DD, the day of the first rows")
            given = [f for f, v in (("--day-format", self.day_format), ("--timezone", self.timezone)) if v is not None]
            if self.bad_days is not None:
                given.append("--bad-days")
            if given:
                verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
                raise ConfigError(f"{', '.join(given)} {verb} only with --day-column; drop {them} with --rows-per-day")
        elif self.start is not None:
            raise ConfigError("--start applies only with --rows-per-day; with --day-column the column says the days")
        if self.rows_per_file < 1:
            raise ConfigError(f"--rows-per-file must be >= 1, got {self.rows_per_file}")
        if self.timezone is not None:
            _check_timezone(self.timezone)
        targets = list(self.rename.values())
        if len(set(targets)) != len(targets):
            dup = next(t for t in targets if targets.count(t) > 1)
            raise ConfigError(f"two --rename flags give the name {dup!r}; give each column its own name")

    @property
    def tz(self) -> str:
        return self.timezone or "UTC"


def _check_timezone(name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--timezone {name!r} is not an IANA time zone; e.g. --timezone Europe/Berlin") from None


def parse_renames(pairs: Sequence[str]) -> dict[str, str]:
    """`--rename OLD=NEW` flags as a dict, with a one-line error for a malformed or repeated one."""
    out: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ConfigError(f"--rename {pair!r} must be OLD=NEW, e.g. --rename uid=user_id")
        if old.strip() in out:
            raise ConfigError(f"--rename names the column {old.strip()!r} twice; rename it once")
        out[old.strip()] = new.strip()
    return out


# ---------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Source:
    """One file to import: its full URL and format."""

    url: str
    format: SourceFormat


def _format_of(path: str, forced: SourceFormat | None) -> SourceFormat | None:
    if forced is not None:
        return forced
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return EXTENSIONS.get(os.path.splitext(name)[1])


def resolve_sources(patterns: Sequence[str], forced: SourceFormat | None = None) -> list[Source]:
    """Every file the patterns name, in the order given (a glob or a folder sorted by name).

    A folder contributes its files of a known extension (all its files with `forced`), skipping
    names that start with `_` or `.` (`_SUCCESS`, `.crc`). A file named twice is read once.

    Raises:
        ConfigError: a pattern matches nothing, or a file's format cannot be told.
    """
    if not patterns:
        raise ConfigError("name the files to import: mtrec import SRC... --out URL (paths, URLs or globs)")
    found: dict[str, Source] = {}
    for pattern in patterns:
        fs, path = filesystem(pattern)
        matches = sorted(fs.glob(path)) if _GLOB.search(path) else ([path] if fs.exists(path) else [])
        if not matches:
            raise ConfigError(f"no file matches {pattern}; check the path or URL (and quote a glob for the shell)")
        files = []
        for m in matches:
            if fs.isdir(m):
                inner = [
                    f
                    for f in sorted(fs.find(m))
                    if not re.search(r"/[_.]", f[len(m.rstrip("/")) :]) and _format_of(f, forced) is not None
                ]
                if not inner:
                    raise ConfigError(
                        f"the folder {fs.unstrip_protocol(m)} holds no .csv, .jsonl or .parquet file; "
                        "name the files, or pass --format to read every file in it"
                    )
                files += inner
            else:
                files.append(m)
        for f in files:
            fmt = _format_of(f, forced)
            if fmt is None:
                raise ConfigError(
                    f"cannot tell the format of {fs.unstrip_protocol(f)} from its name; pass --format csv|jsonl|parquet"
                )
            url = fs.unstrip_protocol(f)
            found.setdefault(url, Source(url, fmt))
    return list(found.values())


class _Reader:
    """Streams each source as Arrow batches. The column types the first CSV (and the first JSON
    lines) file was read with are pinned for the next ones, so every file parses alike."""

    def __init__(self, strings: set[str], day_column: set[str]):
        self.strings = strings  # source column names read as strings (CSV: before any conversion)
        self.day_column = day_column  # the names the day column may have in the source
        self.csv_types: dict[str, pa.DataType] | None = None
        self.json_schema: pa.Schema | None = None

    def batches(self, src: Source) -> Iterator[pa.RecordBatch]:
        read = {SourceFormat.CSV: self._csv, SourceFormat.JSONL: self._jsonl, SourceFormat.PARQUET: self._parquet}
        try:
            yield from read[src.format](src)
        except (pa.ArrowException, OSError, UnicodeDecodeError, EOFError) as e:
            hint = (
                "re-export the file or remove it from the sources"
                if src.format is SourceFormat.PARQUET
                else f"column types come from a file's first {BLOCK_BYTES >> 20} MiB (and the first file's are kept "
                "for the next ones): pass --string COLUMN for a column that also holds text, or check --format"
            )
            raise DataValidationError(
                f"{src.url}: cannot read it as {src.format.value}: {first_line(e)}; {hint}"
            ) from None

    def _open(self, src: Source, compression: str | None = "infer"):
        fs, path = filesystem(src.url)
        return fs.open(path, "rb", compression=compression)

    def _csv(self, src: Source) -> Iterator[pa.RecordBatch]:
        read_options = pcsv.ReadOptions(block_size=BLOCK_BYTES)
        if self.csv_types is None:
            self.csv_types = self._csv_types(src, read_options)
        convert = pcsv.ConvertOptions(column_types=self.csv_types)
        with self._open(src) as fh:
            yield from pcsv.open_csv(fh, read_options=read_options, convert_options=convert)

    def _csv_types(self, src: Source, read_options: pcsv.ReadOptions) -> dict[str, pa.DataType]:
        """pyarrow's types from the file's first block, except that an integer column pyarrow reads
        as double (ids beyond int64, e.g. 64-bit hashes) stays an integer: uint64, or string when
        even that cannot hold it. A column empty in that block stays free (inferred per file)."""
        forced = {s: pa.string() for s in self.strings}
        with self._open(src) as fh:
            schema = pcsv.open_csv(
                fh, read_options=read_options, convert_options=pcsv.ConvertOptions(column_types=forced)
            ).schema
        types = {f.name: f.type for f in schema if not pa.types.is_null(f.type)}
        floats = [f.name for f in schema if pa.types.is_floating(f.type)]
        if floats:
            as_text = pcsv.ConvertOptions(column_types={**forced, **{c: pa.string() for c in floats}})
            with self._open(src) as fh:
                first = pcsv.open_csv(fh, read_options=read_options, convert_options=as_text).read_next_batch()
            for c in floats:
                types[c] = _integer_type(first.column(c)) or types[c]
        return types

    def _jsonl(self, src: Source) -> Iterator[pa.RecordBatch]:
        read_options = pjson.ReadOptions(block_size=BLOCK_BYTES)
        if self.json_schema is None:
            with self._open(src) as fh:
                inferred = pjson.open_json(fh, read_options=read_options).schema
            # JSON has no date type: pyarrow reads "2026-04-05" as a midnight timestamp, which a
            # --timezone west of UTC would date the day before, so a day column of text stays text
            self.json_schema = pa.schema(
                [
                    pa.field(f.name, pa.string()) if f.name in self.day_column and pa.types.is_timestamp(f.type) else f
                    for f in inferred
                    if not pa.types.is_null(f.type)
                ]
            )
        parse = pjson.ParseOptions(explicit_schema=self.json_schema, unexpected_field_behavior="infer")
        with self._open(src) as fh:
            yield from pjson.open_json(fh, read_options=read_options, parse_options=parse)

    def _parquet(self, src: Source) -> Iterator[pa.RecordBatch]:
        with self._open(src, None) as fh:
            # read column chunks in 1 MiB pieces, not whole row groups (~300 MB more for 1M-row groups)
            parquet = pq.ParquetFile(fh, buffer_size=1 << 20, pre_buffer=False)
            yield from parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)


def _integer_type(text: pa.Array) -> pa.DataType | None:
    """int64 / uint64 / string for a CSV column whose every value is an integer's digits, else None."""
    values = text.filter(pc.not_equal(pc.utf8_length(text), 0)).drop_null()
    if len(values) == 0 or not pc.all(pc.match_substring_regex(values, _INT_TEXT.pattern)).as_py():
        return None
    for t in (pa.int64(), pa.uint64()):
        try:
            pc.cast(values, t)
            return t
        except pa.ArrowInvalid:
            pass
    return pa.string()  # wider than 64 bits: an id, kept exact as text


# ---------------------------------------------------------------------------------------------
# columns


@dataclass
class _Layout:
    """The output's columns, fixed by the first batch: every later batch is renamed, reordered and
    cast to `schema`, or refused with one line."""

    schema: pa.Schema
    rename: dict[str, str]
    strings: set[str]  # output names read as strings
    day_column: str | None  # output name
    first: str  # the file the layout comes from

    @classmethod
    def of(cls, schema: pa.Schema, options: ImportOptions, where: str) -> _Layout:
        names = schema.names
        rename = options.rename
        for old in rename:
            if old not in names:
                raise ConfigError(f"--rename {old}=...: {where} has no column {old!r}; its columns: {_names(names)}")
        out = [rename.get(n, n) for n in names]
        if len(set(out)) != len(out):
            dup = next(n for n in out if out.count(n) > 1)
            raise ConfigError(
                f"--rename gives {dup!r}, a name {where} already has; rename that column too or pick another"
            )

        def resolve(name: str, flag: str) -> str:
            if name in out:
                return name
            if name in rename:
                return rename[name]
            raise ConfigError(f"{flag} {name}: {where} has no column {name!r}; its columns: {_names(names)}")

        strings = {resolve(s, "--string") for s in options.strings}
        day = resolve(options.day_column, "--day-column") if options.day_column is not None else None
        fields = [pa.field(o, pa.string() if o in strings else f.type) for o, f in zip(out, schema, strict=True)]
        return cls(pa.schema(fields), dict(rename), strings, day, where)

    def conform(self, batch: pa.RecordBatch, where: str) -> pa.RecordBatch:
        batch = batch.rename_columns([self.rename.get(n, n) for n in batch.schema.names])
        have, want = set(batch.schema.names), set(self.schema.names)
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise DataValidationError(
                f"{where} has other columns than {self.first}"
                + (f": lacks {_names(missing)}" if missing else "")
                + (f"; has {_names(extra)} too" if extra else "")
                + "; import the files of one layout together (or --rename to line them up)"
            )
        columns = []
        for f in self.schema:
            col = batch.column(f.name)
            if col.type != f.type:
                try:
                    col = pc.cast(col, f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    hint = (
                        f"pass --string {f.name} to read it as text"
                        if f.type != pa.string()
                        else "re-export it with one type"
                    )
                    raise DataValidationError(
                        f"{where}: column {f.name!r} is {col.type} but {self.first} made it {f.type}; {hint}"
                    ) from None
            columns.append(col)
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


def _names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _show(value) -> str:
    """A day value for an error line: `null`, or its repr cut to 40 characters."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


# ---------------------------------------------------------------------------------------------
# days


def detect_day_format(col: pa.Array, name: str) -> DayFormat | None:
    """The day format of a column from its type and its first non-null value (None: no value yet).

    Integers: 8 digits from 10000101 to 99991231 are YYYYMMDD, from 1e11 on epoch milliseconds,
    else epoch seconds; strings: 8 digits are YYYYMMDD, 9 or more epoch, else ISO 8601.

    Raises:
        DataValidationError: the column's type cannot name a day (a list, a struct, a boolean).
    """
    t = col.type
    if pa.types.is_date(t):
        return DayFormat.DATE
    if pa.types.is_timestamp(t):
        return DayFormat.TIMESTAMP
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or _is_text(t) or pa.types.is_null(t)):
        raise DataValidationError(
            f"the day column {name!r} is {t}, which names no day; pass a --day-column of dates, timestamps, ISO "
            "strings, YYYYMMDD or epoch seconds, or --rows-per-day N --start YYYY-MM-DD"
        )
    valid = col.drop_null()
    if len(valid) == 0:
        return None
    first = valid[0].as_py()
    if _is_text(t):
        digits = first.strip()
        if re.fullmatch(r"\d{8}", digits):
            return DayFormat.YYYYMMDD
        if re.fullmatch(r"\d{9,}(\.\d*)?", digits):
            return DayFormat.EPOCH_MS if float(digits) >= 1e11 else DayFormat.EPOCH
        return DayFormat.ISO
    if pa.types.is_integer(t) and 10_000_101 <= first <= 99_991_231:
        return DayFormat.YYYYMMDD
    return DayFormat.EPOCH_MS if abs(first) >= 1e11 else DayFormat.EPOCH


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def day_of(col: pa.Array, fmt: DayFormat, tz: str, name: str) -> pa.Array:
    """Each value's day as date32, null where the value is null, does not parse, or names a day
    outside `DAY_RANGE` (1900-2199: a unit mix-up, such as milliseconds read as seconds).

    Timestamps (and epoch values, and ISO strings with a time) are instants: naive ones are UTC,
    and the day is the date at that instant in `tz`. Dates and `YYYY-MM-DD` strings are days as
    they are, in any `tz`.

    Raises:
        DataValidationError: `fmt` does not fit the column's type (e.g. epoch on a date column).
    """
    days = _parse_days(col, fmt, tz, name)
    lo, hi = (pa.scalar(d, pa.date32()) for d in DAY_RANGE)
    return pc.if_else(pc.and_(pc.greater_equal(days, lo), pc.less_equal(days, hi)), days, pa.scalar(None, pa.date32()))


def _parse_days(col: pa.Array, fmt: DayFormat, tz: str, name: str) -> pa.Array:
    t = col.type
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.date32())
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        if fmt not in (DayFormat.DATE, DayFormat.TIMESTAMP, DayFormat.ISO):
            raise DataValidationError(
                f"--day-format {fmt.value} does not fit the day column {name!r}, which is already {t}; "
                "drop --day-format"
            )
        return pc.cast(col, pa.date32()) if pa.types.is_date(t) else _local_dates(col, tz)
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t)
    if fmt is DayFormat.YYYYMMDD:
        text = pc.cast(_as_int64(col), pa.string()) if numeric else pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
        text = pc.if_else(pc.match_substring_regex(text, r"^\d{8}$"), text, pa.scalar(None, pa.string()))
        return pc.cast(pc.strptime(text, format="%Y%m%d", unit="s", error_is_null=True), pa.date32())
    if fmt in (DayFormat.EPOCH, DayFormat.EPOCH_MS):
        if not numeric:
            text = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
            ok = pc.match_substring_regex(text, r"^[+-]?\d+(\.\d*)?$")
            col = pc.cast(pc.if_else(ok, text, pa.scalar(None, pa.string())), pa.float64())
        return _local_dates(_epoch(col, 1_000_000 if fmt is DayFormat.EPOCH else 1_000), tz)
    if numeric:
        raise DataValidationError(
            f"--day-format {fmt.value} does not fit the day column {name!r}, which is {t}; "
            "pass --day-format yyyymmdd, epoch or epoch_ms"
        )
    return _iso_dates(pc.cast(col, pa.string()), tz)


def _as_int64(col: pa.Array) -> pa.Array:
    """Integral values as int64; NaN, infinite and fractional floats as null."""
    if pa.types.is_integer(col.type):
        return pc.cast(col, pa.int64(), safe=False) if col.type == pa.uint64() else pc.cast(col, pa.int64())
    x = pc.cast(col, pa.float64())
    ok = pc.and_(pc.equal(pc.floor(x), x), pc.less(pc.abs(x), 1e15))
    return pc.cast(pc.if_else(ok, x, pa.scalar(None, pa.float64())), pa.int64())


def _epoch(col: pa.Array, us_per_unit: int) -> pa.Array:
    """Epoch values (seconds or milliseconds) as UTC timestamp[us]; non-finite and absurd ones null."""
    x = pc.cast(col, pa.float64())
    limit = 9e18 / us_per_unit  # timestamp[us] is int64
    ok = pc.and_(pc.is_finite(x), pc.less(pc.abs(x), limit))
    us = pc.round(pc.multiply(pc.if_else(ok, x, pa.scalar(None, pa.float64())), float(us_per_unit)))
    return pc.cast(pc.cast(us, pa.int64()), pa.timestamp("us", "UTC"))


def _local_dates(ts: pa.Array, tz: str) -> pa.Array:
    """The date of each instant in `tz`; naive timestamps are UTC."""
    if ts.type.tz is None:
        if tz == "UTC":
            return pc.cast(ts, pa.date32())
        ts = pc.assume_timezone(ts, "UTC")
    return pc.cast(pc.local_timestamp(pc.cast(ts, pa.timestamp(ts.type.unit, tz))), pa.date32())


def _iso_dates(text: pa.Array, tz: str) -> pa.Array:
    """ISO 8601 strings as days: `YYYY-MM-DD` as is, a time with or without an offset as an instant
    (naive: UTC) dated in `tz`. Vectorised; a batch holding a value Arrow's parsers refuse is
    parsed value by value, the bad ones null."""
    text = pc.utf8_trim_whitespace(text)
    date_only = pc.fill_null(pc.equal(pc.utf8_length(text), 10), False)
    for t in (pa.timestamp("us"), pa.timestamp("us", "UTC")):
        try:
            ts = pc.cast(text, t)
        except pa.ArrowInvalid:
            continue
        local = _local_dates(ts, tz)
        return local if t.tz else pc.if_else(date_only, pc.cast(ts, pa.date32()), local)
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(tz)

    def one(s: str | None) -> dt.date | None:
        if s is None:
            return None
        try:
            if len(s) == 10:
                return dt.date.fromisoformat(s)
            t = dt.datetime.fromisoformat(s)
        except ValueError:
            return None
        return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).astimezone(zone).date()

    return pa.array([one(s) for s in text.to_pylist()], pa.date32())


def _codes(days: pa.Array) -> np.ndarray:
    """date32 as int32 days since 1970-01-01; null days as `_BAD`."""
    return pc.fill_null(pc.cast(days, pa.int32()), _BAD).to_numpy(zero_copy_only=False).astype(np.int32)


class _DayRule:
    """Each row's day code: from the day column, or by position (`rows_per_day` from `start`)."""

    def __init__(self, options: ImportOptions):
        self.options = options
        self.format = options.day_format  # None until detected from the first value
        self.detected = False

    def codes(self, batch: pa.RecordBatch, column: str | None, first_row: int) -> np.ndarray:
        o = self.options
        if column is None:  # rows_per_day: the row's position in the whole import
            index = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
            return ((o.start - _EPOCH).days + index // o.rows_per_day).astype(np.int32)
        col = batch.column(column)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if self.format is None:
            self.format = detect_day_format(col, column)
            self.detected = self.format is not None
            if self.format is None:
                return np.full(batch.num_rows, _BAD, np.int32)  # no value at all yet: every row is bad
        return _codes(day_of(col, self.format, o.tz, column))

    def describe(self, column: str | None) -> str:
        o = self.options
        if column is None:
            return f"{o.rows_per_day:,} consecutive rows per day from {o.start}"
        fmt = self.format.value if self.format else "no value"
        return f"column {column!r} as {fmt}{' (detected)' if self.detected else ''}, days in {o.tz}"


# ---------------------------------------------------------------------------------------------
# output


@dataclass
class _Part:
    """One output folder being staged: a day, or the rejects."""

    folder: str  # path inside the output file system
    rows: int = 0
    files: int = 0
    pending: list[pa.RecordBatch] = field(default_factory=list)
    pending_rows: int = 0
    pending_bytes: int = 0
    loose: int = 0  # batches at the end of `pending` not yet concatenated
    writer: pq.ParquetWriter | None = None
    sink: object = None
    file_rows: int = 0


class _Staging:
    """Stages the output under `<out>/_staging/<import id>/`, a folder per day, in files of at most
    `rows_per_file` rows; `publish` moves each day into place, `abort` removes it all."""

    def __init__(self, out: str, rows_per_file: int, import_id: str):
        self.fs, self.root = filesystem(out)
        self.root = self.root.rstrip("/")
        self.existed = self.fs.exists(self.root)
        if self.existed and not self.fs.isdir(self.root):
            raise ConfigError(f"--out {out} is a file; pass a folder (the logs root to write dt=YYYY-MM-DD/ into)")
        self.out = out
        self.id = import_id
        self.staging = f"{self.root}/{STAGING}/{import_id}"
        self.rows_per_file = rows_per_file
        self.parts: dict[object, _Part] = {}
        self.open: OrderedDict[object, _Part] = OrderedDict()
        self.pending_bytes = 0

    def final(self, key) -> str:
        # a day's folder is the one readers look for: mtrec.data.io.day_url (dt=YYYY-MM-DD)
        return f"{self.root}/{REJECTS}/{self.id}" if key == REJECTS else filesystem(day_url(self.out, key))[1]

    def add(self, key, batch: pa.RecordBatch) -> None:
        part = self.parts.get(key)
        if part is None:
            name = REJECTS if key == REJECTS else self.final(key).rstrip("/").rsplit("/", 1)[-1]
            part = self.parts[key] = _Part(f"{self.staging}/{name}")
        part.pending.append(batch)
        part.loose += 1
        if part.loose >= COMPACT_BATCHES:  # many small pieces (days interleaved in the export): one batch
            part.pending[-part.loose :] = [pa.concat_batches(part.pending[-part.loose :])]
            part.loose = 0
        part.pending_rows += batch.num_rows
        part.pending_bytes += batch.nbytes
        self.pending_bytes += batch.nbytes
        if part.pending_rows >= ROW_GROUP_ROWS:
            self._flush(key, part)
        while self.pending_bytes > MAX_BUFFERED_BYTES:
            k = max(self.parts, key=lambda k: self.parts[k].pending_bytes)
            self._flush(k, self.parts[k])

    def _flush(self, key, part: _Part) -> None:
        table = pa.Table.from_batches(part.pending)
        self.pending_bytes -= part.pending_bytes
        part.pending, part.pending_rows, part.pending_bytes, part.loose = [], 0, 0, 0
        done = 0
        while done < table.num_rows:
            if part.writer is None:
                self._open_file(key, part, table.schema)
            n = min(self.rows_per_file - part.file_rows, table.num_rows - done)
            part.writer.write_table(table.slice(done, n), row_group_size=ROW_GROUP_ROWS)
            self.open.move_to_end(key)
            part.file_rows += n
            part.rows += n
            done += n
            if part.file_rows >= self.rows_per_file:
                self._close_file(key, part)

    def _open_file(self, key, part: _Part, schema: pa.Schema) -> None:
        if len(self.open) >= MAX_OPEN_FILES:
            k, p = next(iter(self.open.items()))  # least recently written: its part is complete as it is
            self._close_file(k, p)
        self.fs.makedirs(part.folder, exist_ok=True)
        part.sink = self.fs.open(f"{part.folder}/part-{part.files:05d}.parquet", "wb")
        part.writer = pq.ParquetWriter(part.sink, schema)
        part.files += 1
        part.file_rows = 0
        self.open[key] = part

    def _close_file(self, key, part: _Part) -> None:
        part.writer.close()
        part.sink.close()
        part.writer = part.sink = None
        self.open.pop(key, None)

    def close(self) -> None:
        for key, part in self.parts.items():
            if part.pending:
                self._flush(key, part)
        for key, part in list(self.open.items()):
            self._close_file(key, part)

    def exists(self, day: dt.date) -> bool:
        return self.fs.exists(self.final(day))

    def publish(self, overwrite: bool) -> list[dt.date]:
        """Move every staged day into place, then the rejects; returns the days replaced.

        A day that exists (with `overwrite`) is first moved aside into `<staging>/_replaced/`, then the
        new one is moved in; the old versions are deleted only once every day and the rejects are in
        place. If a move fails, `<out>` is put back as it was before the import (the days published
        are removed, the old versions moved back) and one line says so; if putting back fails too,
        the line names the days published, the days restored and the folder the old versions are
        in, and `abort` keeps that folder. On a local disk each move is one rename; on an object
        store it is a copy, then a delete.
        """
        self.fs.invalidate_cache()
        days = sorted(k for k in self.parts if k != REJECTS)
        taken = [d for d in days if self.exists(d)]
        if taken and not overwrite:
            raise _exists(taken[0], self.out)
        keys = [*days, REJECTS] if REJECTS in self.parts else days
        done: list = []  # days (and REJECTS) whose new version is in place
        aside: list[dt.date] = []  # days whose old version is complete in <staging>/_replaced/
        for key in keys:
            try:
                if key in taken:
                    self._set_aside(key, aside)
                elif key == REJECTS:
                    self.fs.makedirs(f"{self.root}/{REJECTS}", exist_ok=True)
                self._move(self.parts[key].folder, self.final(key))
                done.append(key)
            except BaseException as e:
                message = self._roll_back(key, done, aside, key in taken, e)
                if not isinstance(e, Exception):  # Ctrl-C: put back, say so, stop
                    log.error(message)
                    raise
                raise MtrecError(message) from e
        try:  # every day is in place: the old versions go
            self._remove_staging()
        except Exception as e:
            log.warning(f"imported, but could not remove {self.staging}: {first_line(e)}; remove it by hand")
        return taken

    def _set_aside(self, day: dt.date, aside: list[dt.date]) -> None:
        final, old = self.final(day), self._old(day)
        self.fs.makedirs(old.rsplit("/", 1)[0], exist_ok=True)
        if is_local_fs(self.fs):
            os.rename(final, old)
            aside.append(day)
        else:  # a copy, then a delete: the old version is complete aside before any of it is deleted
            self.fs.copy(final, old, recursive=True)
            aside.append(day)
            self.fs.rm(final, recursive=True)

    def _old(self, day: dt.date) -> str:
        return f"{self.staging}/{REPLACED}/{self._name(day)}"

    def _name(self, key) -> str:
        return f"{REJECTS}/{self.id}" if key == REJECTS else self.final(key).rstrip("/").rsplit("/", 1)[-1]

    def _roll_back(self, failed, done: list, aside: list[dt.date], existed: bool, error: BaseException) -> str:
        """Put `<out>` back as it was after the move of `failed` (a day that `existed` or not) broke:
        each day set aside moved back over what is in its place, each day new to `<out>` removed;
        returns the line to raise."""
        restored, kept = [], []
        for key in [failed, *reversed(done)]:
            if key == failed and existed and key not in aside:
                continue  # setting it aside failed: its old version is still in place
            try:
                final = self.final(key)
                if self.fs.exists(final):
                    self.fs.rm(final, recursive=True)
                if key in aside:
                    self._move(self._old(key), final)
                if key == REJECTS:
                    with contextlib.suppress(Exception):
                        self.fs.rmdir(f"{self.root}/{REJECTS}")  # only if empty
                restored.append(key)
            except Exception:
                kept.append(key)
        where = f"could not move {self._name(failed)} into {self.out} ({first_line(error)})"
        if not kept:
            return f"{where}; {self.out} is as it was before the import (put back: {self._list(restored)})"
        present = [k for k in kept if self._present(k)]
        return (
            f"{where}, and putting back {self._list(kept)} failed too: still published: {self._list(present)}; "
            f"missing: {self._list(k for k in kept if k not in present)}; restored: {self._list(restored)}; the old "
            f"versions of {self._list(k for k in kept if k in aside)} are in {self.staging}/{REPLACED}/, which is "
            f"kept: move them into {self.out} by hand"
        )

    def _present(self, key) -> bool:
        try:
            return self.fs.exists(self.final(key))
        except Exception:
            return True  # unknown: not claimed missing

    def _list(self, keys) -> str:
        return ", ".join(self._name(k) for k in sorted(keys, key=str)) or "none"

    def _move(self, src: str, dst: str) -> None:
        if is_local_fs(self.fs):
            os.rename(src, dst)
        else:
            self.fs.mv(src, dst, recursive=True)

    def abort(self) -> None:
        """Remove everything this import staged (and `<out>` itself if the import created it),
        except when `<staging>/_replaced/` still holds an old version that a failed publish could
        not put back: then the staging folder is kept."""
        for key, part in list(self.open.items()):
            with contextlib.suppress(Exception):  # a broken sink: its folder is removed below anyway
                self._close_file(key, part)
        old = f"{self.staging}/{REPLACED}"
        self.fs.invalidate_cache()
        if self.fs.exists(old) and self.fs.ls(old):
            return
        self._remove_staging()
        if not self.existed and self.fs.exists(self.root) and not self.fs.ls(self.root):
            self.fs.rm(self.root, recursive=True)

    def _remove_staging(self) -> None:
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        parent = f"{self.root}/{STAGING}"
        if self.fs.exists(parent) and not self.fs.ls(parent):
            self.fs.rm(parent, recursive=True)


def _exists(day: dt.date, out: str) -> ConfigError:
    return ConfigError(
        f"{day_url(out, day)} already exists; pass --overwrite to replace the days this import writes, "
        "or choose another --out"
    )


# ---------------------------------------------------------------------------------------------
# the import


@dataclass
class ImportSummary:
    """What an import wrote. `rows == imported + rejected`, always."""

    out: str
    sources: list[str]
    day_rule: str
    rows: int = 0
    imported: int = 0
    rejected: int = 0
    rejects: str | None = None  # where the rejected rows went (`--bad-days quarantine`)
    days: list[dict] = field(default_factory=list)  # per day: day, rows, files, url
    replaced: list[str] = field(default_factory=list)  # days that existed and were replaced (--overwrite)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def lines(self) -> list[str]:
        """The summary for a person: a line for the import, one per day, one for the rejects."""
        out = [
            f"imported {self.imported:,} of {self.rows:,} rows from {len(self.sources)} file(s) into {self.out} "
            f"in {self.seconds:.1f}s: {len(self.days)} day(s), {self.day_rule}"
        ]
        for d in self.days:
            again = " (replaced)" if d["day"] in self.replaced else ""
            out.append(f"  dt={d['day']}: {d['rows']:,} rows in {d['files']} file(s){again}")
        if self.rejected:
            out.append(f"  rejected: {self.rejected:,} rows without a valid day -> {self.rejects}")
        return out


@dataclass
class _BadDays:
    count: int = 0
    first: str = ""  # the first bad value, where it is


def import_files(sources: Sequence[str], out: str, options: ImportOptions) -> ImportSummary:
    """Import export files into the data contract's day folders under `out`.

    Args:
        sources (list[str]): paths, fsspec URLs or globs of CSV, JSON lines or Parquet files (or folders).
        out (str): the logs root to write ``dt=YYYY-MM-DD/part-NNNNN.parquet`` into (any fsspec URL).
        options (ImportOptions): how rows map to days, and the output's rules.

    Returns:
        ImportSummary: rows per day and files, rejected rows.

    Raises:
        ConfigError: a source matches nothing, a column flag names no column, or a day exists
            without `overwrite`: nothing is written.
        DataValidationError: a source does not parse, the sources' columns differ, or rows have
            no valid day (with `bad_days` fail): nothing is written.
        MtrecError: moving a day into place failed: `out` is put back as it was, or the message
            says which days are where and which staging folder holds the old versions.
    """
    t0 = time.perf_counter()
    files = resolve_sources(sources, options.format)
    import_id = f"import-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    staging = _Staging(out, options.rows_per_file, import_id)
    strings = set(options.strings) | {old for old, new in options.rename.items() if new in options.strings}
    day_column = {options.day_column} | {old for old, new in options.rename.items() if new == options.day_column}
    reader, rule = _Reader(strings, day_column), _DayRule(options)
    quarantine = options.bad_days is BadDays.QUARANTINE
    layout: _Layout | None = None
    bad, rows, seen = _BadDays(), 0, set()
    try:
        for src in files:
            src_rows = 0
            for raw in reader.batches(src):
                if raw.num_rows == 0:
                    continue
                if layout is None:
                    layout = _Layout.of(raw.schema, options, src.url)
                batch = layout.conform(raw, src.url)
                codes = rule.codes(batch, layout.day_column, rows)
                is_bad = codes == _BAD
                if is_bad.any():
                    _note_bad(bad, batch, layout.day_column, np.flatnonzero(is_bad), (src.url, src_rows))
                    if quarantine:
                        staging.add(REJECTS, _rejects(batch, is_bad, layout.day_column, (src.url, src_rows)))
                if not (bad.count and not quarantine):  # failing anyway: count, write nothing more
                    for code, part in _by_day(batch, codes, is_bad):
                        day = _EPOCH + dt.timedelta(days=int(code))
                        if day not in seen:
                            if not options.overwrite and staging.exists(day):
                                raise _exists(day, out)
                            seen.add(day)
                        staging.add(day, part)
                rows += batch.num_rows
                src_rows += batch.num_rows
            log.info(f"read {src.url}: {src_rows:,} rows")
        if rows == 0:
            raise DataValidationError(
                f"the {len(files)} source file(s) hold no rows; check the export (nothing was written)"
            )
        if bad.count and not quarantine:
            raise DataValidationError(
                f"{bad.count:,} of {rows:,} rows have no valid day in column {layout.day_column!r} "
                f"(first bad value {bad.first}); fix the export, pass --day-format if it was misread, or "
                f"--bad-days quarantine to import the rest and write these to {join(out, REJECTS)}/"
            )
        staging.close()
        replaced = staging.publish(options.overwrite)
    except BaseException:
        staging.abort()
        raise
    summary = ImportSummary(
        out=out,
        sources=[s.url for s in files],
        day_rule=rule.describe(layout.day_column),
        rows=rows,
        rejected=bad.count,
        rejects=join(out, REJECTS, import_id) if bad.count else None,
        replaced=[d.isoformat() for d in replaced],
    )
    for key in sorted(k for k in staging.parts if k != REJECTS):
        part = staging.parts[key]
        summary.days.append({"day": key.isoformat(), "rows": part.rows, "files": part.files, "url": day_url(out, key)})
        summary.imported += part.rows
    assert summary.rows == summary.imported + summary.rejected  # internal invariant, not user input
    summary.seconds = time.perf_counter() - t0
    return summary


def _note_bad(bad: _BadDays, batch: pa.RecordBatch, column: str | None, rows: np.ndarray, where: tuple) -> None:
    if not bad.count:
        value = batch.column(column)[int(rows[0])].as_py()
        bad.first = f"{_show(value)} at row {where[1] + int(rows[0])} of {where[0]}"
    bad.count += len(rows)


def _rejects(batch: pa.RecordBatch, is_bad: np.ndarray, column: str, where: tuple[str, int]) -> pa.RecordBatch:
    """The rows without a valid day, with `source_file`, `source_row` (0-based in that file) and
    `reason`: `null_day` (no value) or `bad_day` (a value that names no day from 1900 to 2199)."""
    index = np.flatnonzero(is_bad)
    rows = batch.filter(pa.array(is_bad))
    null = rows.column(column).is_null().to_numpy(zero_copy_only=False)
    extra = {
        "source_file": pa.array([where[0]] * rows.num_rows, pa.string()),
        "source_row": pa.array(index + where[1], pa.int64()),
        "reason": pa.array(np.where(null, "null_day", "bad_day"), pa.string()),
    }
    for name, values in extra.items():
        rows = rows.append_column(name, values)
    return rows


def _by_day(batch: pa.RecordBatch, codes: np.ndarray, is_bad: np.ndarray) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The batch's good rows grouped by day, each group in input order."""
    good = np.flatnonzero(~is_bad)
    if len(good) == 0:
        return
    first = codes[good[0]]
    if len(good) == batch.num_rows and (codes == first).all():
        yield int(first), batch  # the common case: a batch of one day
        return
    order = good[np.argsort(codes[good], kind="stable")]
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    for begin, end in zip(starts, [*starts[1:], len(order)], strict=True):
        # a copy per day, not a slice of one sorted copy: a day's buffer then holds only its own
        # rows, so the buffered bytes counted are the bytes held
        yield int(sorted_codes[begin]), batch.take(pa.array(order[begin:end]))
