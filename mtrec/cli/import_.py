"""`mtrec import`: CSV / JSON lines / Parquet export files in, the data contract's day folders out."""

from __future__ import annotations

import argparse

from mtrec.cli.common import log, print_json

FORMATS = ("csv", "jsonl", "parquet")
DAY_FORMATS = ("date", "timestamp", "iso", "yyyymmdd", "epoch", "epoch_ms")


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "import",
        help="turn export files (CSV, JSON lines, Parquet) into dt=YYYY-MM-DD day folders",
        description="Read export files (any fsspec URL or glob) and write <out>/dt=YYYY-MM-DD/part-NNNNN.parquet, "
        "keeping the column names (the config's `columns:` maps the contract's names to them). "
        "Every row gets its day from --day-column, or from --rows-per-day N --start DAY. See docs/data-contract.md.",
        allow_abbrev=abbrev,
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="files, folders, globs or URLs to import, in this order")
    p.add_argument("--out", required=True, help="logs root to write dt=YYYY-MM-DD/ folders into (path or fsspec URL)")
    p.add_argument("--format", choices=FORMATS, help="the sources' format (default: from each file's extension)")
    p.add_argument(
        "--day-column",
        metavar="COLUMN",
        help="the column giving each row's day: a date, timestamp, ISO string, YYYYMMDD or epoch seconds",
    )
    p.add_argument(
        "--day-format", choices=DAY_FORMATS, help="how --day-column names a day (default: detected from its values)"
    )
    p.add_argument("--timezone", help="IANA zone whose midnight starts a day, for timestamps and epochs (default UTC)")
    p.add_argument(
        "--rows-per-day", type=int, metavar="N", help="for logs without a date: N consecutive rows per day from --start"
    )
    p.add_argument("--start", metavar="YYYY-MM-DD", help="the first day, with --rows-per-day")
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=1_000_000,
        metavar="N",
        help="rows per output file at most (default 1000000)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace day folders that exist (only the days imported)")
    p.add_argument(
        "--bad-days",
        choices=("fail", "quarantine"),
        help="rows whose day is null or unparseable: fail the import (default), or write them to "
        "<out>/_import_rejects/ and import the rest",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename a column on the way (repeatable); by default the names are kept",
    )
    p.add_argument(
        "--string",
        action="append",
        default=[],
        metavar="COLUMN",
        help="read this column as text, e.g. ids with leading zeros (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (progress stays on stderr)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.data.importer import ImportOptions, import_files, parse_renames
    from mtrec.data.io import parse_date

    options = ImportOptions(
        day_column=args.day_column,
        day_format=args.day_format,
        timezone=args.timezone,
        rows_per_day=args.rows_per_day,
        start=parse_date(args.start, "--start") if args.start is not None else None,
        format=args.format,
        rows_per_file=args.rows_per_file,
        overwrite=args.overwrite,
        bad_days=args.bad_days,
        rename=parse_renames(args.rename),
        strings=tuple(args.string),
    )
    summary = import_files(args.sources, args.out, options)
    for line in summary.lines():
        log.info(line)
    if args.json:
        print_json(summary.to_dict())
    return 0
