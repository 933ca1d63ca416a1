"""Day partitions on any fsspec URL: ``<root>/dt=YYYY-MM-DD/*.parquet``, or another folder name
per day (`job.partition`: ``dt=YYYYMMDD``, ``date=YYYY-MM-DD``, ...), with any subfolders inside
(``hour=HH/``).

Example:
    >>> files = list_day_files("memory://world", date(2026, 1, 1))   # doctest: +SKIP
    >>> [(f.name, f.size) for f in files]                              # doctest: +SKIP
    [('part-00000.parquet', 1048576), ...]
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

from mtrec.errors import DataValidationError, MtrecError

# How a logs root names its day folders: `job.partition`, with YYYY, MM and DD for the date.
DEFAULT_PARTITION = "dt=YYYY-MM-DD"
_TOKENS = {"YYYY": r"(?P<y>\d{4})", "MM": r"(?P<m>\d{2})", "DD": r"(?P<d>\d{2})"}


class LogsRoot(str):
    """A logs root URL (a str) that knows how its day folders are named: `job.partition`. The
    config hands it out as `job.logs`, so every function given a logs root finds its days."""

    pattern: str  # not `partition`: str has a method of that name

    def __new__(cls, url: str, pattern: str = DEFAULT_PARTITION) -> LogsRoot:
        obj = super().__new__(cls, url)
        obj.pattern = pattern
        return obj

    def __reduce__(self):  # Ray and pickle rebuild it with its pattern
        return LogsRoot, (str(self), self.pattern)


def partition_of(root: str) -> str:
    """The day folder pattern of a logs root: a `LogsRoot`'s, else the default."""
    return root.pattern if isinstance(root, LogsRoot) else DEFAULT_PARTITION


def check_partition(pattern: str) -> str:
    """A `job.partition` pattern, checked: one folder name holding YYYY, MM and DD once each.

    Raises:
        ValueError: the pattern cannot name a day.
    """
    if "/" in pattern or any(pattern.count(t) != 1 for t in _TOKENS):
        raise ValueError(
            f"`job.partition` is {pattern!r}; it names one folder per day with YYYY, MM and DD once each, e.g. "
            "dt=YYYY-MM-DD (the default), dt=YYYYMMDD or date=YYYY-MM-DD (hour=HH subfolders are read inside it)"
        )
    return pattern


def _partition_regex(pattern: str) -> re.Pattern:
    rx = re.escape(pattern)
    for token, group in _TOKENS.items():
        rx = rx.replace(token, group)
    return re.compile(f"^{rx}$")


def partition_name(day: dt.date, pattern: str = DEFAULT_PARTITION) -> str:
    """The folder name of `day` under `pattern` (`dt=2026-04-05`, `dt=20260405`, ...)."""
    return pattern.replace("YYYY", f"{day.year:04d}").replace("MM", f"{day.month:02d}").replace("DD", f"{day.day:02d}")


def parse_partition(name: str, pattern: str = DEFAULT_PARTITION) -> dt.date | None:
    """The day a folder name stands for under `pattern`, or None."""
    m = _partition_regex(pattern).match(name)
    if not m:
        return None
    try:
        return dt.date(int(m["y"]), int(m["m"]), int(m["d"]))
    except ValueError:
        return None


@dataclass(frozen=True)
class DataFile:
    """One Parquet file of a day: full URL (with protocol), base name and size in bytes."""

    url: str
    name: str
    size: int


RELATIVE_DAYS = {"today": 0, "yesterday": 1}


def parse_date(text: str, what: str = "--date", timezone: str | None = None) -> dt.date:
    """Parse YYYY-MM-DD, or `today` / `yesterday` resolved now in `timezone` (the config's
    `job.timezone`: a scheduler's clock is rarely in the timezone the logs are cut in), with a
    one-line error naming the argument."""
    if isinstance(text, str) and text.lower() in RELATIVE_DAYS:
        if timezone is None:
            raise MtrecError(f"`{what} {text}` is not accepted here; pass a date YYYY-MM-DD")
        from zoneinfo import ZoneInfo

        return dt.datetime.now(ZoneInfo(timezone)).date() - dt.timedelta(days=RELATIVE_DAYS[text.lower()])
    try:
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise MtrecError(
            f"`{what}` must be a date YYYY-MM-DD, `today` or `yesterday`, got {text!r}; e.g. {what} 2026-01-01"
        ) from None


def join(root: str, *parts: str) -> str:
    """Join URL/path parts with '/' (fsspec URLs are not OS paths)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    """True for a path on this machine's file system: no scheme, or `file://`."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The path of a local URL (`file://` stripped)."""
    return url.removeprefix("file://")


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of an fsspec file system (one, or a tuple of aliases: ("s3", "s3a"))."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """True for fsspec's local file system, whose paths the os module can rename and lock."""
    return "file" in protocols(fs)


def day_url(root: str, day: dt.date) -> str:
    """The folder of `day` under `root`: a `LogsRoot`'s pattern (`job.partition`); what mtrec
    writes (checkpoints, quarantine) is always dt=YYYY-MM-DD."""
    return join(root, partition_name(day, partition_of(root)))


# Object stores whose fsspec backends cache directory listings per process: mtrec reads what other
# processes wrote (workers' shards, another job's lease, a day that landed since), so every
# listing asks the store. Set through fsspec's own per-protocol defaults, which every
# `url_to_fs` reads (torch's DCP reader and writer included).
NO_LISTINGS_CACHE = ("s3", "s3a", "gs", "gcs", "abfs", "az")
for _proto in NO_LISTINGS_CACHE:
    fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)


def apply_storage_options(options: dict[str, dict]) -> None:
    """Make `options` ({protocol: fsspec options}, `job.storage_options`) the defaults of this
    process's file systems of those protocols: the driver applies them when it reads the config,
    a Ray worker or read task when it starts on one. MLflow's artifact client (boto3) reads no
    fsspec options: for it, the endpoint and credentials come from the environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which s3fs reads too."""
    for proto, opts in options.items():
        fsspec.config.conf.setdefault(proto, {}).update(opts)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL and the path inside it."""
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise MtrecError(
            f"cannot open {url!r}: {e}; install the fsspec backend for that protocol (e.g. s3fs for s3://)"
        ) from None


def check_bucket(url: str, what: str) -> None:
    """On an object store, the bucket of `url` (named in the config as `what`, e.g. `job.workdir`)
    exists and these credentials may see it; elsewhere nothing. Checked before a job writes
    anything: the S3 client would otherwise create a missing bucket on the first write, a typo
    becoming a bucket of its own.

    Raises:
        ConfigError: the bucket is missing or access is denied (one line: the URL and the fix).
    """
    from mtrec.errors import ConfigError

    fs, path = filesystem(url)
    if not set(protocols(fs)) & set(NO_LISTINGS_CACHE):
        return
    bucket = path.split("/", 1)[0]
    try:
        if fs.exists(bucket):
            return
        fs.ls(bucket)  # exists() says False for a bucket it may not see: listing it tells which
    except PermissionError:
        raise ConfigError(
            f"{what} {url}: access to bucket {bucket} is denied; give these credentials (AWS_ACCESS_KEY_ID, the "
            "node's role, ...) read and write access to it, or fix the URL; nothing was written"
        ) from None
    except FileNotFoundError:
        pass
    raise ConfigError(
        f"{what} {url}: bucket {bucket} does not exist (or these credentials cannot see it); create it "
        f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL; nothing was written"
    )


def list_day_files(root: str, day: dt.date) -> list[DataFile]:
    """The Parquet files of one day, sorted by their path inside the day's folder (files in
    subfolders such as hour=HH/ included, named by that path).

    Raises:
        DataValidationError: the day's folder is missing or holds no Parquet file.
    """
    folder, partition = day_url(root, day), partition_of(root)
    fs, path = filesystem(folder)
    if not fs.isdir(path):
        root_fs, root_path = filesystem(root)
        if not root_fs.isdir(root_path):
            raise DataValidationError(
                f"the logs root {root} does not exist; check --logs (job.logs) for a typo or a missing mount"
            )
        have = list_days(root)
        near = (
            f"; days present: {have[0]} .. {have[-1]} ({len(have)})"
            if have
            else f"; the logs root holds no {partition} folder"
            + (" (set `job.partition` to the layout of your folders)" if _other_layout(root_fs, root_path) else "")
        )
        raise DataValidationError(
            f"no logs for {day} under {root} (expected {folder}/*.parquet){near}; check --logs and --date"
            + ("" if not have else ", or set `job.allow_gaps: true` to skip days without logs")
        )
    base = path.rstrip("/") + "/"
    infos = [
        i
        for i in fs.find(path, detail=True).values()
        if i["type"] == "file" and i["name"].endswith(".parquet") and not _hidden(i["name"][len(base) :])
    ]
    if not infos:
        raise DataValidationError(f"{folder} holds no .parquet file; the day's export is missing or incomplete")
    infos.sort(key=lambda i: i["name"])
    return [
        DataFile(url=fs.unstrip_protocol(i["name"]), name=i["name"][len(base) :], size=int(i["size"] or 0))
        for i in infos
    ]


def _hidden(relative: str) -> bool:
    """A file under a folder or with a name starting with `_` or `.` (staging, markers, truth)."""
    return any(part.startswith(("_", ".")) for part in relative.split("/"))


def _other_layout(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return any("=" in str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))


def list_days(root: str) -> list[dt.date]:
    """Every day partition under a logs root, sorted."""
    partition = partition_of(root)
    fs, path = filesystem(root)
    if not fs.isdir(path):
        return []
    days = []
    for entry in fs.ls(path, detail=False):
        day = parse_partition(entry.rstrip("/").rsplit("/", 1)[-1], partition)
        if day is not None:
            days.append(day)
    return sorted(days)
