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
    code, out, _ = run(capsys, "synth", "--days", "3", "--rows-per-day", "100000", "--out", "./world")
    assert code == 0 and "done: 300,000 rows" in out
    assert sorted(p.name for p in Path("world").glob("dt=*")) == ["dt=2026-01-01", "dt=2026-01-02", "dt=2026-01-03"]
    code, out, _ = run(capsys, "validate", "--config", "esmm", "--date", "2026-01-01")
    assert code == 0
    assert "day 2026-01-01: 100,000 rows in 4 files, 100,000 good, 0 quarantined" in out
    assert Path("mtrec-work/quarantine/dt=2026-01-01/_report.json").exists()


def test_validate_fails_above_threshold_with_one_line(world, tmp_path, capsys):
    logs = tmp_path / "logs" / "dt=2026-01-01"
    shutil.copytree(Path(world) / "dt=2026-01-01", logs)
    t = pq.read_table(logs / "part-00000.parquet")
    conv = t.column("conversion").to_numpy().copy()
    conv[:300] = 1  # 300 conversions on rows that (mostly) had no click
    import pyarrow as pa

    pq.write_table(t.set_column(t.schema.get_field_index("conversion"), "conversion", pa.array(conv)), logs / "part-00000.parquet")
    code, out, err = run(capsys, "validate", "--logs", str(tmp_path / "logs"), "--workdir", str(tmp_path / "w"), "--date", "2026-01-01")
    assert code == 3
    assert err.count("\n") == 1 and err.startswith("mtrec: error: day 2026-01-01: ")
    assert "conversion_without_click" in err and "above job.max_bad_fraction=1.00%" in err
    assert "quarantined" in out  # the per-file progress was printed before failing


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        (["validate", "--date", "2026-13-01"], 2, "`--date` must be a date YYYY-MM-DD, `today` or `yesterday`, got '2026-13-01'"),
        (["validate", "--config", "missing.yaml", "--date", "2026-01-01"], 2, "config file `missing.yaml` not found"),
        (["validate", "--logs", "/nonexistent/logs", "--date", "2026-01-01"], 3, "no logs for 2026-01-01 under /nonexistent/logs"),
        (["synth", "--out", "memory://x", "--days", "0"], 2, "`--days` must be >= 1, got 0"),
        (["synth", "--out", "memory://x", "--param", "apeal_std=1"], 2, "--param 'apeal_std=1': expected NAME=VALUE with NAME one of"),
        (["synth", "--out", "memory://x", "--preset", "nope"], 2, "--preset 'nope': unknown; choose one of item_quality"),
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
    for argv in (["nightly", "--date", "2026-01-02", "--cold-start"], ["backfill", "--from", "2026-01-01", "--to", "2026-01-02"]):
        code, _, err = run(capsys, *argv, "--config", str(tmp_path / "c.yaml"), "--promote")
        assert code == 2 and "--promote needs MLflow tracking (`tracking.enabled: true`)" in err
    assert not (tmp_path / "work").exists()  # nothing trained, not even the lock taken
