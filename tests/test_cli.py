"""The `mtrec` command as a user runs it: output, exit codes, one-line errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mtrec.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_then_validate_reports_zero_bad_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example config's defaults: ./world and ./mtrec-work
    code, out, err = run(capsys, "synth", "--days", "3", "--rows-per-day", "100000", "--out", "./world")
    assert code == 0 and "done: 300,000 rows" in err and out == ""  # progress on stderr
    assert sorted(p.name for p in Path("world").glob("dt=*")) == ["dt=2026-01-01", "dt=2026-01-02", "dt=2026-01-03"]
    code, out, err = run(capsys, "validate", "--config", "esmm", "--date", "2026-01-01")
    assert code == 0
    assert "day 2026-01-01: 100,000 rows in 4 files, 100,000 good, 0 quarantined" in err
    assert Path("mtrec-work/quarantine/dt=2026-01-01/_report.json").exists()


def test_validate_fails_above_threshold_with_one_line(world, tmp_path, capsys):
    logs = tmp_path / "logs" / "dt=2026-01-01"
    shutil.copytree(Path(world) / "dt=2026-01-01", logs)
    t = pq.read_table(logs / "part-00000.parquet")
    conv = t.column("conversion").to_numpy().copy()
    conv[:300] = 1  # 300 conversions on rows that (mostly) had no click
    import pyarrow as pa

    pq.write_table(
        t.set_column(t.schema.get_field_index("conversion"), "conversion", pa.array(conv)), logs / "part-00000.parquet"
    )
    code, out, err = run(
        capsys, "validate", "--logs", str(tmp_path / "logs"), "--workdir", str(tmp_path / "w"), "--date", "2026-01-01"
    )
    last = err.splitlines()[-1]
    assert code == 3 and out == ""
    assert last.startswith("mtrec: error: day 2026-01-01: ") and "mtrec: error" not in err.removesuffix(last + "\n")
    assert "conversion_without_click" in last and "above job.max_bad_fraction=1.00%" in last
    assert "quarantined" in err.splitlines()[-2]  # the per-file progress was logged before failing


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        (
            ["validate", "--date", "2026-13-01"],
            2,
            "`--date` must be a date YYYY-MM-DD, `today` or `yesterday`, got '2026-13-01'",
        ),
        (["validate", "--config", "missing.yaml", "--date", "2026-01-01"], 2, "config file `missing.yaml` not found"),
        (
            ["validate", "--logs", "/nonexistent/logs", "--date", "2026-01-01"],
            3,
            "the logs root /nonexistent/logs does not exist",
        ),
        (["synth", "--out", "memory://x", "--days", "0"], 2, "`--days` must be >= 1, got 0"),
        (
            ["synth", "--out", "memory://x", "--param", "apeal_std=1"],
            2,
            "--param 'apeal_std=1': expected NAME=VALUE with NAME one of",
        ),
        (
            ["synth", "--out", "memory://x", "--preset", "nope"],
            2,
            "--preset 'nope': unknown; choose one of item_quality",
        ),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(capsys, argv, code, text):
    got, _, err = run(capsys, *argv)
    assert got == code
    assert err.startswith("mtrec: error: ") and text in err and err.count("\n") == 1


def test_demo_needs_enough_days(tmp_path, capsys):
    """The demo itself runs in tests/test_demo.py; here only its up-front refusal."""
    code, _, err = run(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--days", "2", "--rows-per-day", "3000")
    assert code == 2 and "--days 2: the demo needs at least 5" in err
    assert not (tmp_path / "demo").exists()


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("mtrec")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for command in ("synth", "validate", "demo"):
        assert command in res.stdout


def test_promote_without_tracking_is_refused_before_training(tmp_path, capsys):
    import yaml

    from mtrec.config import load_config

    d = load_config("esmm", logs=str(tmp_path / "logs"), workdir=str(tmp_path / "work")).model_dump(mode="json")
    d["tracking"]["enabled"] = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    for argv in (
        ["nightly", "--date", "2026-01-02", "--cold-start"],
        ["backfill", "--from", "2026-01-01", "--to", "2026-01-02"],
    ):
        code, _, err = run(capsys, *argv, "--config", str(tmp_path / "c.yaml"), "--promote")
        assert code == 2 and "--promote needs MLflow tracking (`tracking.enabled: true`)" in err
    assert not (tmp_path / "work").exists()  # nothing trained, not even the lock taken


def test_validate_json_is_json_alone_on_stdout(world, tmp_path):
    """`mtrec validate --json | python -m json.tool` works: progress goes to stderr."""
    exe = Path(sys.executable).with_name("mtrec")
    res = subprocess.run(
        f"{exe} validate --logs {world} --workdir {tmp_path / 'w'} --date 2026-01-01 --json "
        f"| {sys.executable} -m json.tool",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert (
        '"good_rows": 20000' in res.stdout
        and "dt=2026-01-01/part-00000.parquet: 5,000 rows, 0 quarantined" in res.stderr
    )


def _day_without(world: str, root: Path, column: str | None = None, empty: bool = False) -> str:
    """A logs root holding dt=2026-01-01 of `world`, a column dropped or every row removed."""
    day = root / "dt=2026-01-01"
    day.mkdir(parents=True)
    for f in sorted((Path(world) / "dt=2026-01-01").glob("*.parquet")):
        t = pq.read_table(f)
        t = t.drop_columns([column]) if column else t
        pq.write_table(t.slice(0, 0) if empty else t, day / f.name)
    return str(root)


@pytest.mark.parametrize(
    ("case", "text"),
    [
        ("missing", "no logs for 2026-01-09 under"),
        ("empty", "the logs of 2026-01-01 hold no rows (4 empty file(s)"),
        ("no column", "column(s) missing: `conversion` (required by `labels`); map label `conversion`"),
    ],
)
def test_nightly_on_a_bad_day_fails_fast_with_one_line(world, tmp_path, case, text):
    """Before Ray starts: a missing, empty or column-less day is one line on stderr, nothing else,
    in under 5 s from the command line (the process's imports included)."""
    import time

    logs = {
        "missing": lambda: world,
        "empty": lambda: _day_without(world, tmp_path / "logs", empty=True),
        "no column": lambda: _day_without(world, tmp_path / "logs", column="conversion"),
    }[case]()
    day = "2026-01-09" if case == "missing" else "2026-01-01"
    exe = Path(sys.executable).with_name("mtrec")
    t0 = time.perf_counter()
    res = subprocess.run(
        [str(exe), "nightly", "--logs", logs, "--workdir", str(tmp_path / "w"), "--date", day, "--cold-start"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    seconds = time.perf_counter() - t0
    assert res.returncode == 3 and res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("mtrec: error: ") and text in res.stderr
    assert seconds < 5, f"{seconds:.1f}s"


def test_json_is_strict_a_nan_metric_is_null(capsys):
    """`--json` output parses with a strict parser: NaN (AUC of a one-class slice) is null."""
    import json

    from mtrec.cli.common import print_json

    print_json({"metrics": {"ctr/auc": float("nan"), "ctr/ne": float("inf"), "rows": 3}, "days": [1.5]})
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) == {
        "metrics": {"ctr/auc": None, "ctr/ne": None, "rows": 3},
        "days": [1.5],
    }


def test_a_storage_failure_no_step_named_is_one_line_with_exit_11(world, tmp_path, capsys, monkeypatch):
    """An OSError from a store (here: listing the logs is denied) that reaches the CLI is one
    line naming the config's stores, not a traceback; exit 11 says a rerun may help."""
    from mtrec.data import io

    def denied(root):
        raise PermissionError("Forbidden")

    monkeypatch.setattr(io, "list_days", denied)
    monkeypatch.setattr("mtrec.data.validate.list_day_files", lambda *a: denied(a[0]))
    code, out, err = run(capsys, "validate", "--logs", world, "--workdir", str(tmp_path / "w"), "--date", "2026-01-01")
    assert code == 11 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mtrec: error: a storage operation failed on one of job.logs {world}, job.workdir ")
    assert "(PermissionError: Forbidden) after the client's retries" in err
