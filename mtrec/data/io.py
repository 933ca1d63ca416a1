"""Day partitions on any fsspec URL: ``<root>/dt=YYYY-MM-DD/*.parquet``.

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

_DAY_DIR = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


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


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """True for fsspec's local file system, whose paths the os module can rename and lock."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def day_url(root: str, day: dt.date) -> str:
    return join(root, f"dt={day.isoformat()}")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL and the path inside it."""
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise MtrecError(
            f"cannot open {url!r}: {e}; install the fsspec backend for that protocol (e.g. s3fs for s3://)"
        ) from None


def list_day_files(root: str, day: dt.date) -> list[DataFile]:
    """The Parquet files of one day, sorted by name.

    Raises:
        DataValidationError: the day's folder is missing or holds no Parquet file.
    """
    fs, path = filesystem(day_url(root, day))
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
            else "; the logs root holds no dt=YYYY-MM-DD folder"
        )
        raise DataValidationError(
            f"no logs for {day} under {root} (expected {day_url(root, day)}/*.parquet){near}; check --logs and --date"
        )
    infos = [i for i in fs.ls(path, detail=True) if i["type"] == "file" and i["name"].endswith(".parquet")]
    if not infos:
        raise DataValidationError(
            f"{day_url(root, day)} holds no .parquet file; the day's export is missing or incomplete"
        )
    infos.sort(key=lambda i: i["name"])
    return [
        DataFile(url=fs.unstrip_protocol(i["name"]), name=i["name"].rsplit("/", 1)[-1], size=int(i["size"] or 0))
        for i in infos
    ]


def list_days(root: str) -> list[dt.date]:
    """Every day partition under a logs root, sorted."""
    fs, path = filesystem(root)
    if not fs.isdir(path):
        return []
    days = []
    for entry in fs.ls(path, detail=False):
        m = _DAY_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m:
            days.append(dt.date.fromisoformat(m.group(1)))
    return sorted(days)
