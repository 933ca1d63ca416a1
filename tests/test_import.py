"""`mtrec import`: export files (CSV, JSON lines, Parquet) in, the contract's day folders out."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import _mini

from mtrec.cli import main
from mtrec.cli.import_ import DAY_FORMATS, FORMATS
from mtrec.data.importer import DayFormat, ImportOptions, SourceFormat, _Staging, day_of, import_files
from mtrec.errors import MtrecError

APR5 = 1_775_347_200  # 2026-04-05 00:00:00 UTC in epoch seconds
HOUR = 3600


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def day_files(out: Path) -> dict[str, list[str]]:
    """Every day folder under `out` with its file names, and any other entry, for exact asserts."""
    return {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(out.iterdir())}


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in r) for r in [header, *rows]) + "\n")
    return path


def epoch_rows() -> list[list]:
    """15 impressions over 3 UTC days: 5 on Apr 5, 7 on Apr 6, 3 on Apr 7 (hours 0..23 of each)."""
    hours = [0, 3, 7, 12, 23] + [24 + h for h in (0, 1, 2, 5, 8, 13, 23)] + [48 + h for h in (0, 10, 20)]
    return [[1000 + i, f"{i:03d}", APR5 + h * HOUR, i % 2, round(0.5 + i / 4, 2)] for i, h in enumerate(hours)]


def test_csv_epoch_column_splits_into_three_days_with_values_kept(tmp_path, capsys):
    src = write_csv(tmp_path / "export.csv", ["user_id", "item_id", "ts", "click", "price"], epoch_rows())
    code, out, err = run(capsys, "import", str(src), "--out", str(tmp_path / "logs"), "--day-column", "ts", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [(d["day"], d["rows"], d["files"]) for d in summary["days"]] == [
        ("2026-04-05", 5, 1),
        ("2026-04-06", 7, 1),
        ("2026-04-07", 3, 1),
    ]
    assert (summary["rows"], summary["imported"], summary["rejected"]) == (15, 15, 0)
    assert summary["day_rule"] == "column 'ts' as epoch (detected), days in UTC"
    assert "  dt=2026-04-06: 7 rows in 1 file(s)" in err.splitlines()
    assert day_files(tmp_path / "logs") == {f"dt=2026-04-0{d}": ["part-00000.parquet"] for d in (5, 6, 7)}
    # names kept, pyarrow's types kept (item_id "000" looks numeric: an integer), every value back
    t = pa.concat_tables(pq.read_table(tmp_path / "logs" / f"dt=2026-04-0{d}") for d in (5, 6, 7))
    assert t.schema.names == ["user_id", "item_id", "ts", "click", "price"]
    assert [t.schema.field(c).type for c in t.schema.names] == [
        pa.int64(),
        pa.int64(),
        pa.int64(),
        pa.int64(),
        pa.float64(),
    ]
    assert t.to_pylist() == [dict(zip(t.schema.names, [r[0], int(r[1]), *r[2:]], strict=True)) for r in epoch_rows()]


def test_jsonl_yyyymmdd_strings(tmp_path):
    days = ["20260405"] * 2 + ["20260406"] * 4 + ["20260408"]
    src = tmp_path / "export.jsonl"
    src.write_text("".join(json.dumps({"uid": i, "date": d, "hist": [i, i + 1]}) + "\n" for i, d in enumerate(days)))
    s = import_files([str(src)], str(tmp_path / "logs"), ImportOptions(day_column="date"))
    assert [(d["day"], d["rows"]) for d in s.days] == [("2026-04-05", 2), ("2026-04-06", 4), ("2026-04-08", 1)]
    assert s.day_rule == "column 'date' as yyyymmdd (detected), days in UTC"
    t = pq.read_table(tmp_path / "logs" / "dt=2026-04-06")
    assert t.schema == pa.schema([("uid", pa.int64()), ("date", pa.string()), ("hist", pa.list_(pa.int64()))])
    assert t.column("uid").to_pylist() == [2, 3, 4, 5] and t.column("hist")[0].as_py() == [2, 3]


def test_parquet_rows_per_day_in_bounded_files(tmp_path):
    src = tmp_path / "export.parquet"
    pq.write_table(pa.table({"row_id": pa.array(range(25), pa.int64()), "x": [float(i) for i in range(25)]}), src)
    out = tmp_path / "logs"
    s = import_files([str(src)], str(out), ImportOptions(rows_per_day=10, start=dt.date(2026, 1, 30), rows_per_file=4))
    assert [(d["day"], d["rows"], d["files"]) for d in s.days] == [
        ("2026-01-30", 10, 3),
        ("2026-01-31", 10, 3),
        ("2026-02-01", 5, 2),
    ]
    assert s.day_rule == "10 consecutive rows per day from 2026-01-30"
    assert day_files(out)["dt=2026-01-31"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(out / "dt=2026-01-31" / f"part-0000{i}.parquet").num_rows for i in range(3)] == [4, 4, 2]
    assert pq.read_table(out / "dt=2026-01-31").column("row_id").to_pylist() == list(range(10, 20))


def test_validator_accepts_an_imported_day(tmp_path):
    """The columns `_mini` declares, exported as CSV with an ISO timestamp: the day validates clean."""
    from mtrec.data.validate import validate_day

    rows = [[i, 50 + i, i % 5, i % 2, 0, 1.25, i % 2, f"2026-04-05T{i % 24:02d}:15:00"] for i in range(40)]
    header = ["user_id", "item_id", "position", "click", "conversion", "price", "device", "ts"]
    src = write_csv(tmp_path / "export.csv", header, rows)
    s = import_files([str(src)], str(tmp_path / "logs"), ImportOptions(day_column="ts"))
    assert [(d["day"], d["rows"]) for d in s.days] == [("2026-04-05", 40)]
    assert s.day_rule == "column 'ts' as timestamp (detected), days in UTC"  # pyarrow parsed the ISO text
    report = validate_day(_mini().spec, str(tmp_path / "logs"), dt.date(2026, 4, 5), str(tmp_path / "work"))
    assert (report.input_rows, report.good_rows, report.bad_rows) == (40, 40, 0)


def test_existing_day_refused_then_replaced_with_overwrite(tmp_path, capsys):
    out = tmp_path / "logs"
    first = write_csv(tmp_path / "a.csv", ["user_id", "ts"], [[1, APR5], [2, APR5 + 30 * HOUR]])
    assert run(capsys, "import", str(first), "--out", str(out), "--day-column", "ts")[0] == 0
    again = write_csv(tmp_path / "b.csv", ["user_id", "ts"], [[7, APR5 + 2 * HOUR], [8, APR5 + 3 * HOUR]])
    code, _, err = run(capsys, "import", str(again), "--out", str(out), "--day-column", "ts")
    assert code == 2
    assert err == (
        f"mtrec: error: {out}/dt=2026-04-05 already exists; pass --overwrite to replace the days this import "
        "writes, or choose another --out\n"
    )
    assert day_files(out) == {"dt=2026-04-05": ["part-00000.parquet"], "dt=2026-04-06": ["part-00000.parquet"]}
    assert pq.read_table(out / "dt=2026-04-05").column("user_id").to_pylist() == [1]  # untouched, no _staging

    code, _, err = run(capsys, "import", str(again), "--out", str(out), "--day-column", "ts", "--overwrite")
    assert code == 0 and "  dt=2026-04-05: 2 rows in 1 file(s) (replaced)" in err.splitlines()
    assert pq.read_table(out / "dt=2026-04-05").column("user_id").to_pylist() == [7, 8]
    assert pq.read_table(out / "dt=2026-04-06").column("user_id").to_pylist() == [2]  # a day not imported: kept
    assert sorted(p.name for p in out.iterdir()) == ["dt=2026-04-05", "dt=2026-04-06"]


def old_and_new_exports(tmp_path: Path) -> tuple[Path, Path]:
    """Old days Apr 5 (users 1, 2) and Apr 6 (user 3); the new export has Apr 4 (user 6, a day
    not in `<out>` yet), Apr 5 (users 7, 8) and Apr 6 (user 9)."""
    old = write_csv(tmp_path / "old.csv", ["user_id", "ts"], [[1, APR5], [2, APR5 + HOUR], [3, APR5 + 30 * HOUR]])
    new = write_csv(
        tmp_path / "new.csv",
        ["user_id", "ts"],
        [[6, APR5 - 5 * HOUR], [7, APR5 + 2 * HOUR], [8, APR5 + 3 * HOUR], [9, APR5 + 40 * HOUR]],
    )
    return old, new


def failing_move(monkeypatch, day: str, back: str | None = None) -> None:
    """Make moving the staged `day` into place fail (and moving the old version of `back` back)."""
    real = _Staging._move

    def move(self, src: str, dst: str) -> None:
        staged = "/_replaced/" not in src and src.endswith(f"/{day}")
        if staged or (back and src.endswith(f"/_replaced/{back}")):
            raise OSError("No space left on device")
        real(self, src, dst)

    monkeypatch.setattr(_Staging, "_move", move)


def test_overwrite_whose_second_day_fails_to_move_puts_every_day_back(tmp_path, capsys, monkeypatch):
    """Apr 4 is published, Apr 5 replaced, then Apr 6's move fails: Apr 4 is removed, Apr 5 and
    Apr 6 hold their old files again, and the staging folder is gone."""
    out = tmp_path / "logs"
    old, new = old_and_new_exports(tmp_path)
    assert run(capsys, "import", str(old), "--out", str(out), "--day-column", "ts")[0] == 0
    failing_move(monkeypatch, "dt=2026-04-06")
    code, _, err = run(capsys, "import", str(new), "--out", str(out), "--day-column", "ts", "--overwrite")
    assert code == 2
    assert err.splitlines() == [
        f"read file://{new}: 4 rows",
        f"mtrec: error: could not move dt=2026-04-06 into {out} (No space left on device); {out} is as it was "
        "before the import (put back: dt=2026-04-04, dt=2026-04-05, dt=2026-04-06)",
    ]
    assert day_files(out) == {"dt=2026-04-05": ["part-00000.parquet"], "dt=2026-04-06": ["part-00000.parquet"]}
    assert pq.read_table(out / "dt=2026-04-05").column("user_id").to_pylist() == [1, 2]
    assert pq.read_table(out / "dt=2026-04-06").column("user_id").to_pylist() == [3]


def test_overwrite_on_an_object_store_whose_copy_breaks_halfway_puts_every_day_back(tmp_path, monkeypatch):
    """On an object store a move is a copy: Apr 6's breaks after its first file. Every day holds
    its complete old files again."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = fsspec.filesystem("memory")
    old, new = old_and_new_exports(tmp_path)
    real = MemoryFileSystem.mv

    def mv(self, src, dst, recursive=False, **kwargs):
        if "/_replaced/" not in src and src.endswith("/dt=2026-04-06"):
            first = sorted(self.find(src))[0]
            self.copy(first, f"{dst}/{first.rsplit('/', 1)[-1]}")
            raise OSError("connection reset")
        return real(self, src, dst, recursive=recursive, **kwargs)

    try:
        import_files([str(old)], "memory://imp-over", ImportOptions(day_column="ts", rows_per_file=1))
        before = {f: fs.cat(f) for f in fs.find("/imp-over")}
        assert sorted(before) == [
            "/imp-over/dt=2026-04-05/part-00000.parquet",
            "/imp-over/dt=2026-04-05/part-00001.parquet",
            "/imp-over/dt=2026-04-06/part-00000.parquet",
        ]
        monkeypatch.setattr(MemoryFileSystem, "mv", mv)
        with pytest.raises(MtrecError) as e:
            opts = ImportOptions(day_column="ts", rows_per_file=1, overwrite=True)
            import_files([str(new)], "memory://imp-over", opts)
        assert str(e.value) == (
            "could not move dt=2026-04-06 into memory://imp-over (connection reset); memory://imp-over is as it "
            "was before the import (put back: dt=2026-04-04, dt=2026-04-05, dt=2026-04-06)"
        )
        assert {f: fs.cat(f) for f in fs.find("/imp-over")} == before  # the same files, byte for byte
        files = sorted(before)
        assert [pq.read_table(fs.open(f)).column("user_id").to_pylist() for f in files] == [[1], [2], [3]]
    finally:
        fs.rm("/imp-over", recursive=True)


def test_overwrite_that_cannot_put_a_day_back_keeps_its_old_version_in_staging(tmp_path, capsys, monkeypatch):
    """Apr 6's move fails, and so does moving Apr 5's old version back: the line names what is
    where, and the staging folder with Apr 5's old files is kept."""
    out = tmp_path / "logs"
    old, new = old_and_new_exports(tmp_path)
    assert run(capsys, "import", str(old), "--out", str(out), "--day-column", "ts")[0] == 0
    failing_move(monkeypatch, "dt=2026-04-06", back="dt=2026-04-05")
    code, _, err = run(capsys, "import", str(new), "--out", str(out), "--day-column", "ts", "--overwrite")
    assert code == 2
    (staging,) = (out / "_staging").iterdir()
    assert err.splitlines() == [
        f"read file://{new}: 4 rows",
        f"mtrec: error: could not move dt=2026-04-06 into {out} (No space left on device), and putting back "
        "dt=2026-04-05 failed too: still published: none; missing: dt=2026-04-05; restored: dt=2026-04-04, "
        f"dt=2026-04-06; the old versions of dt=2026-04-05 are in {staging}/_replaced/, which is kept: move them "
        f"into {out} by hand",
    ]
    assert day_files(out) == {"_staging": [staging.name], "dt=2026-04-06": ["part-00000.parquet"]}
    assert pq.read_table(out / "dt=2026-04-06").column("user_id").to_pylist() == [3]
    assert pq.read_table(staging / "_replaced" / "dt=2026-04-05").column("user_id").to_pylist() == [1, 2]


def iso_export(tmp_path: Path) -> Path:
    """7 rows, 3 of them without a valid day: an unparseable value (row 2), an empty one (row 4), a null (row 6)."""
    days = ["2026-04-05", "2026-04-05", "yesterday", "2026-04-06", "", "2026-04-06", None]
    path = tmp_path / "export.jsonl"
    path.write_text("".join(json.dumps({"uid": i, "day": d}) + "\n" for i, d in enumerate(days)))
    return path


def test_bad_day_values_fail_with_the_count_and_write_nothing(tmp_path, capsys):
    code, out, err = run(
        capsys, "import", str(iso_export(tmp_path)), "--out", str(tmp_path / "logs"), "--day-column", "day"
    )
    assert code == 3 and out == ""
    assert err.splitlines()[-1] == (
        f"mtrec: error: 3 of 7 rows have no valid day in column 'day' (first bad value 'yesterday' at row 2 of "
        f"file://{tmp_path}/export.jsonl); fix the export, pass --day-format if it was misread, or --bad-days "
        f"quarantine to import the rest and write these to {tmp_path}/logs/_import_rejects/"
    )
    assert not (tmp_path / "logs").exists()


def test_bad_day_values_quarantined(tmp_path, capsys):
    out = tmp_path / "logs"
    argv = ["import", str(iso_export(tmp_path)), "--out", str(out), "--day-column", "day", "--bad-days", "quarantine"]
    code, stdout, err = run(capsys, *argv, "--json")
    assert code == 0
    s = json.loads(stdout)
    assert (s["rows"], s["imported"], s["rejected"]) == (7, 4, 3)
    assert [(d["day"], d["rows"]) for d in s["days"]] == [("2026-04-05", 2), ("2026-04-06", 2)]
    rejects = pq.read_table(s["rejects"])
    assert rejects.schema.names == ["uid", "day", "source_file", "source_row", "reason"]
    assert rejects.select(["uid", "day", "source_row", "reason"]).to_pylist() == [
        {"uid": 2, "day": "yesterday", "source_row": 2, "reason": "bad_day"},
        {"uid": 4, "day": "", "source_row": 4, "reason": "bad_day"},
        {"uid": 6, "day": None, "source_row": 6, "reason": "null_day"},
    ]
    assert f"  rejected: 3 rows without a valid day -> {s['rejects']}" in err.splitlines()
    assert sorted(p.name for p in out.iterdir()) == ["_import_rejects", "dt=2026-04-05", "dt=2026-04-06"]


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        ([], "say how rows map to days: pass --day-column COLUMN"),
        (["--day-column", "ts", "--rows-per-day", "5", "--start", "2026-01-01"], "exclude each other: pass one"),
        (["--rows-per-day", "5"], "--rows-per-day needs --start YYYY-MM-DD"),
        (["--day-column", "ts", "--start", "2026-01-01"], "--start applies only with --rows-per-day"),
        (["--rows-per-day", "0", "--start", "2026-01-01"], "--rows-per-day must be >= 1, got 0"),
        (
            ["--rows-per-day", "5", "--start", "2026-01-01", "--timezone", "UTC", "--bad-days", "quarantine"],
            "--timezone, --bad-days apply only with --day-column; drop them with --rows-per-day",
        ),
        (["--day-column", "ts", "--timezone", "Mars/Olympus"], "--timezone 'Mars/Olympus' is not an IANA time zone"),
        (["--day-column", "ts", "--rows-per-file", "0"], "--rows-per-file must be >= 1, got 0"),
        (
            ["--day-column", "ts", "--rename", "user_id"],
            "--rename 'user_id' must be OLD=NEW, e.g. --rename uid=user_id",
        ),
        (["--day-column", "when"], "--day-column when: file://{src} has no column 'when'; its columns: user_id, ts"),
        (["--day-column", "ts", "--string", "uid"], "--string uid: file://{src} has no column 'uid'"),
        (["--day-column", "ts", "--rename", "user_id=ts"], "--rename gives 'ts', a name file://{src} already has"),
    ],
)
def test_bad_flags_fail_with_one_line_and_write_nothing(tmp_path, capsys, flags, text):
    src = write_csv(tmp_path / "a.csv", ["user_id", "ts"], [[1, APR5]])
    code, out, err = run(capsys, "import", str(src), "--out", str(tmp_path / "logs"), *flags)
    assert code == 2 and out == ""
    assert err.startswith("mtrec: error: ") and text.format(src=src) in err and err.count("\n") == 1
    assert not (tmp_path / "logs").exists()


def test_missing_source_and_unknown_extension(tmp_path, capsys):
    code, _, err = run(capsys, "import", str(tmp_path / "nope*.csv"), "--out", str(tmp_path / "o"), "--day-column", "d")
    assert code == 2 and f"no file matches {tmp_path}/nope*.csv; check the path or URL" in err
    (tmp_path / "export.txt").write_text("d\n20260405\n")
    code, _, err = run(
        capsys, "import", str(tmp_path / "export.txt"), "--out", str(tmp_path / "o"), "--day-column", "d"
    )
    assert code == 2 and "from its name; pass --format csv|jsonl|parquet" in err
    code, _, err = run(
        capsys,
        "import",
        str(tmp_path / "export.txt"),
        "--out",
        str(tmp_path / "o"),
        "--day-column",
        "d",
        "--format",
        "csv",
    )
    assert code == 0 and "  dt=2026-04-05: 1 rows in 1 file(s)" in err.splitlines()


def test_ids_keep_leading_zeros_with_string_and_wide_ids_stay_integers(tmp_path):
    rows = [["007", 18_446_744_073_709_551_615, 20260405], ["010", 9_223_372_036_854_775_808, 20260405]]
    src = write_csv(tmp_path / "a.csv", ["user_id", "item_id", "d"], rows)
    import_files([str(src)], str(tmp_path / "logs"), ImportOptions(day_column="d", strings=("user_id",)))
    t = pq.read_table(tmp_path / "logs" / "dt=2026-04-05")
    assert t.schema.field("user_id").type == pa.string() and t.schema.field("item_id").type == pa.uint64()
    assert t.to_pydict() == {
        "user_id": ["007", "010"],
        "item_id": [18_446_744_073_709_551_615, 9_223_372_036_854_775_808],  # exact: not through a double
        "d": [20260405, 20260405],
    }


def test_rename_and_several_files_and_formats_in_one_import(tmp_path):
    """A CSV and a Parquet file of one layout; --day-column and --string may name the new name."""
    a = write_csv(tmp_path / "a.csv", ["uid", "ts"], [["01", APR5], ["02", APR5 + HOUR]])
    pq.write_table(pa.table({"ts": [APR5 + 25 * HOUR], "uid": ["03"]}), tmp_path / "b.parquet")
    opts = ImportOptions(day_column="ts", rename={"uid": "user_id"}, strings=("user_id",))
    s = import_files([str(a), str(tmp_path / "*.parquet")], str(tmp_path / "logs"), opts)
    assert [(d["day"], d["rows"]) for d in s.days] == [("2026-04-05", 2), ("2026-04-06", 1)]
    assert pq.read_table(tmp_path / "logs" / "dt=2026-04-06").to_pydict() == {
        "user_id": ["03"],
        "ts": [APR5 + 25 * HOUR],
    }
    assert pq.read_table(tmp_path / "logs" / "dt=2026-04-05").column("user_id").to_pylist() == ["01", "02"]


def test_files_of_another_layout_refused_and_nothing_left(tmp_path, capsys):
    a = write_csv(tmp_path / "a.csv", ["user_id", "ts"], [[1, APR5]])
    b = write_csv(tmp_path / "b.csv", ["user", "ts"], [[2, APR5 + 48 * HOUR]])
    code, _, err = run(capsys, "import", str(a), str(b), "--out", str(tmp_path / "logs"), "--day-column", "ts")
    assert code == 3
    assert f"file://{b} has other columns than file://{a}: lacks user_id; has user too" in err
    assert not (tmp_path / "logs").exists()  # dt=2026-04-05 was staged, then removed with the staging folder


def test_fsspec_urls_both_ways():
    fs = fsspec.filesystem("memory")
    rows = "\n".join(f"{i},{APR5 + i * 7 * HOUR}" for i in range(9))
    fs.pipe("/imp-src/part-1.csv", f"user_id,ts\n{rows}\n".encode())
    try:
        s = import_files(["memory://imp-src/"], "memory://imp-logs", ImportOptions(day_column="ts"))
        assert [(d["day"], d["rows"], d["url"]) for d in s.days] == [
            ("2026-04-05", 4, "memory://imp-logs/dt=2026-04-05"),
            ("2026-04-06", 3, "memory://imp-logs/dt=2026-04-06"),
            ("2026-04-07", 2, "memory://imp-logs/dt=2026-04-07"),
        ]
        assert sorted(fs.find("/imp-logs")) == [f"/imp-logs/dt=2026-04-0{d}/part-00000.parquet" for d in (5, 6, 7)]
    finally:
        for root in ("/imp-src", "/imp-logs"):
            fs.rm(root, recursive=True)


@pytest.mark.parametrize(
    ("values", "fmt", "tz", "days"),
    [
        (pa.array([APR5 + 23 * HOUR, None]), DayFormat.EPOCH, "UTC", ["2026-04-05", None]),
        (pa.array([APR5 + 23 * HOUR]), DayFormat.EPOCH, "Asia/Tokyo", ["2026-04-06"]),  # UTC+9
        (pa.array([(APR5 + 2 * HOUR) * 1000]), DayFormat.EPOCH_MS, "America/New_York", ["2026-04-04"]),
        (pa.array([APR5 * 1000]), DayFormat.EPOCH, "UTC", [None]),  # milliseconds read as seconds: year 58,000
        (pa.array([20260405, 20261345, 2026045]), DayFormat.YYYYMMDD, "UTC", ["2026-04-05", None, None]),
        (
            pa.array(["2026-04-05", "2026-04-05T23:30:00", "2026-04-05T23:30:00+02:00", "2026-04-05 01:00:00Z", "x"]),
            DayFormat.ISO,
            "Europe/Berlin",  # UTC+2 in April: a date stays, 23:30 UTC is the next day, the others are Apr 5
            ["2026-04-05", "2026-04-06", "2026-04-05", "2026-04-05", None],
        ),
        (
            pa.array([dt.datetime(2026, 4, 5, 22, 0)], pa.timestamp("ms", "UTC")),
            DayFormat.TIMESTAMP,
            "Europe/Berlin",
            ["2026-04-06"],
        ),
    ],
)
def test_day_values(values, fmt, tz, days):
    assert [d and d.isoformat() for d in day_of(values, fmt, tz, "c").to_pylist()] == days


def test_cli_choices_match_the_enums():
    assert tuple(f.value for f in SourceFormat) == FORMATS and tuple(f.value for f in DayFormat) == DAY_FORMATS


def test_a_source_that_does_not_parse_leaves_nothing_behind(tmp_path, capsys):
    """The first file's day is staged when the second turns out unreadable: the import stops with one
    line and removes the staging, so no day folder that looks complete is left."""
    pq.write_table(pa.table({"user_id": [1], "ts": [APR5]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not parquet at all")
    out = tmp_path / "logs"
    out.mkdir()
    code, _, err = run(capsys, "import", str(tmp_path / "*.parquet"), "--out", str(out), "--day-column", "ts")
    assert code == 3
    line = err.splitlines()[-1]
    assert line.startswith(f"mtrec: error: file://{tmp_path}/b.parquet: cannot read it as parquet: ")
    assert line.endswith("; re-export the file or remove it from the sources")
    assert list(out.iterdir()) == []  # the folder existed before: kept, empty


def test_compressed_jsonl_with_a_timezone(tmp_path, capsys):
    """Epoch milliseconds (detected) in gzipped JSON lines, days cut at midnight in New York (UTC-4)."""
    import gzip

    stamps = [(APR5 + h * HOUR) * 1000 for h in (1, 3, 5, 24)]  # New York: 21:00, 23:00 on Apr 4; 01:00, 20:00 on Apr 5
    with gzip.open(tmp_path / "export.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"uid": i, "t": t}) + "\n" for i, t in enumerate(stamps)))
    argv = ["import", str(tmp_path / "export.jsonl.gz"), "--out", str(tmp_path / "logs"), "--day-column", "t"]
    code, out, err = run(capsys, *argv, "--timezone", "America/New_York", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["day_rule"] == "column 't' as epoch_ms (detected), days in America/New_York"
    assert [(d["day"], d["rows"]) for d in s["days"]] == [("2026-04-04", 2), ("2026-04-05", 2)]


def test_jsonl_dates_keep_their_day_west_of_utc(tmp_path):
    """JSON has no date type: "2026-04-05" is that day in any --timezone, a date-time is an instant."""
    src = tmp_path / "export.jsonl"
    days = ["2026-04-05", "2026-04-05T02:00:00", "2026-04-06T12:00:00Z"]  # New York: Apr 5, Apr 4 22:00, Apr 6 08:00
    src.write_text("".join(json.dumps({"uid": i, "day": d}) + "\n" for i, d in enumerate(days)))
    s = import_files([str(src)], str(tmp_path / "logs"), ImportOptions(day_column="day", timezone="America/New_York"))
    assert [(d["day"], d["rows"]) for d in s.days] == [("2026-04-04", 1), ("2026-04-05", 1), ("2026-04-06", 1)]
    assert pq.read_table(tmp_path / "logs" / "dt=2026-04-05").to_pydict() == {"uid": [0], "day": ["2026-04-05"]}
