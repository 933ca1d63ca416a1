"""`mtrec demo` at a tiny size: the summary's structure, and the MLflow store holds what it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrec.cli import main

BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.integration
def test_demo_tells_the_story_and_mlflow_holds_what_it_reports(tmp_path):
    # MMoE's towers and experts have BatchNorm (the example's), so every version's BN check runs: it
    # passed on all 4 at this size. 20,000 rows a day, not fewer: a first model trained on few rows
    # can be refused as the first champion by the gate's calibration floor
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # a user's server: the demo keeps to its own store
    p = subprocess.run(
        [str(BIN / "mtrec"), "demo", "--workdir", str(work), "--rows-per-day", "20000", "--models", "mmoe"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout.splitlines()
    # one progress line per step (not a TTY here: start and end), and nothing from Ray, MLflow or torch
    done = [ln.strip() for ln in out if ln.strip().startswith("done ")]
    assert (
        done[0].startswith("done synthetic world: 7 days x 20,000 rows") and len(done) == 7
    )  # synth, ray, train, promote, 3 nights
    assert not [ln for ln in out if "WARNING" in ln or "UserWarning" in ln or ln.startswith("20")]
    header = next(i for i, ln in enumerate(out) if ln.startswith("model "))
    cols = out[header].split()
    assert cols[:6] == ["model", "job", "days", "rows", "wall", "s"] and "es-CVR" in cols and cols[-1] == "gate"
    rows = [ln.split(maxsplit=15) for ln in out[header + 2 :] if ln.startswith("mmoe ")]
    assert [r[1] for r in rows] == ["full_retrain", "nightly", "nightly", "nightly"]
    assert [r[2] for r in rows] == ["2026-01-01..01-03", "2026-01-04", "2026-01-05", "2026-01-06"]
    assert [int(r[3].replace(",", "")) for r in rows] == [60_000, 20_000, 20_000, 20_000]  # every row trained once
    assert [r[6] for r in rows] == ["2026-01-04", "2026-01-05", "2026-01-06", "2026-01-07"]  # evaluated on the next day
    summary = json.loads((work / "summary.json").read_text())
    assert [r["version"] for r in summary["rows"]] == ["1", "2", "3", "4"]
    assert summary["rows"][0]["gate"] == "champion (first)"
    champion = "1"
    for r in summary["rows"][1:]:  # every night judged against the champion of the moment
        assert r["gate"] in (f"promoted over v{champion}", f"refused (champion v{champion} stays)"), r["gate"]
        champion = r["version"] if r["gate"].startswith("promoted") else champion
    assert all(r["bn"] == "passed" for r in summary["rows"]), [r["bn"] for r in summary["rows"]]
    assert any(ln.startswith("mmoe: next-day ctr AUC ") and "a nightly day took" in ln for ln in out)
    assert any("mlflow ui --backend-store-uri sqlite:///" in ln for ln in out) and any(
        "mtrec predict" in ln for ln in out
    )
    for step in ("synth", "ray", "mmoe-train", "mmoe-promote", "mmoe-nightly-2026-01-04"):
        assert (work / "logs" / f"{step}.log").exists()

    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"], summary["tracking_uri"])
    name = summary["models"]["mmoe"]
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert sorted(r.data.tags["mtrec.kind"] for r in runs) == ["full_retrain", "nightly", "nightly", "nightly"]
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == ["1", "2", "3", "4"]
    for r in summary["rows"]:  # each version's gate decision is the one the summary shows
        decision = versions[r["version"]].tags["mtrec.gate.decision"]
        assert r["gate"].startswith("refused") == (decision == "refused")
    promoted = [r["version"] for r in summary["rows"] if not r["gate"].startswith("refused")]
    assert str(client.get_model_version_by_alias(name, "champion").version) == promoted[-1]


def test_demo_replaces_only_what_it_wrote(tmp_path, capsys):
    from mtrec.jobs.demo import MARKER, _prepare

    work = tmp_path / "d"
    _prepare(work)
    for name in ("world", "logs"):
        (work / name).mkdir()
    (work / "scores.parquet").write_text("x")  # what the printed `mtrec predict` writes
    _prepare(work)
    assert sorted(p.name for p in work.iterdir()) == [MARKER]
    (work / "notes.txt").write_text("mine")
    assert main(["demo", "--workdir", str(work), "--models", "mmoe"]) == 2
    assert "also notes.txt, which the demo did not write" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine"


def test_demo_refuses_a_workdir_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "exists and was not written by `mtrec demo`" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "precious"
    assert main(["demo", "--workdir", str(tmp_path / "d"), "--models", "esmm,dupn"]) == 2
    assert "--models: unknown dupn" in capsys.readouterr().err
