"""MLflow: the gate's arithmetic, retries, the served model (unit); then, against a real
`mlflow server` on 127.0.0.1, a 3-day run, the gate refusing a worse challenger, the server dying
mid-job, and a registration lost after the publish (integration, real Ray)."""

from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import without_floors

from mtrec.config import load_config
from mtrec.data.synth import Export, write_world
from mtrec.errors import ConfigError, GateDeferred, GateRefused, TrackingError
from mtrec.tracking import Tracker, compare, flatten, tracking_uri

DAY1 = dt.date(2026, 1, 1)
DAY2, DAY3, DAY4 = (DAY1 + dt.timedelta(days=i) for i in (1, 2, 3))
ROWS = 20_000
pytestmark = pytest.mark.filterwarnings("ignore")


def small(logs: str, workdir: str, uri: str | None = None, **tracking):
    d = load_config("esmm", logs=logs, workdir=workdir).model_dump(mode="json")
    d["train"].update(batch_size=256, num_workers=1)
    d["model"]["batch_norm"] = True  # the BN check runs in every job and in the gate
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 20_000)
    d["tracking"].update(uri=uri, retries=1, backoff_s=0.2, timeout_s=5, **tracking)
    d["gate"]["tolerance"] = 0.01
    # after one day of 20,000 rows the model predicts CTR ~2x too high: the calibration floor would
    # (rightly) refuse it as the first champion
    return type(load_config("esmm")).model_validate(without_floors(d))


# ---- unit ------------------------------------------------------------------------------------------


def test_gate_compares_each_metric_in_its_direction_within_tolerance(tmp_path):
    d = load_config("esmm").model_dump(mode="json")
    d["gate"] = {"metrics": ["ctr/auc", "ctr/ne", "ctr/calibration"], "tolerance": 0.01}
    cfg = type(load_config("esmm")).model_validate(d)
    champ = {"ctr/auc": 0.70, "ctr/ne": 0.90, "ctr/calibration": 1.02}
    ok, worse, figures = compare(cfg, {"ctr/auc": 0.695, "ctr/ne": 0.905, "ctr/calibration": 0.99}, champ)
    assert ok and not worse and figures["ctr/auc"] == {"challenger": 0.695, "champion": 0.70}
    ok, worse, _ = compare(cfg, {"ctr/auc": 0.68, "ctr/ne": 0.95, "ctr/calibration": 1.2}, champ)
    assert not ok
    assert worse[0] == "ctr/auc 0.6800 vs champion 0.7000 (worse by 0.0200 > tolerance 0.01)"
    assert worse[1].startswith("ctr/ne 0.9500 vs champion 0.9000") and worse[2].startswith("ctr/calibration 1.2000")
    with pytest.raises(GateDeferred, match=r"ctr/auc is not a number on this slice \(challenger nan, champion 0.7;"):
        compare(cfg, {"ctr/auc": float("nan"), "ctr/ne": 0.9, "ctr/calibration": 1.0}, champ)  # exit 10, not 5
    with pytest.raises(GateRefused, match="metric ctr/ne is missing"):
        compare(cfg, {"ctr/auc": 0.7}, champ)
    assert load_config("esmm").gate_metrics() == ["ctr/auc", "cvr/auc", "ctcvr/auc"]
    d["gate"]["metrics"] = ["watch/auc"]
    with pytest.raises(ValueError, match="gate metric `watch/auc` names no task"):
        type(load_config("esmm")).model_validate(d)


def test_floors_refuse_a_broken_model_whatever_it_is_compared_with():
    from mtrec.tracking.gate import floors

    cfg = load_config("esmm")  # gated: ctr/auc, cvr/auc, ctcvr/auc
    assert cfg.gate.max_calibration_factor == 3.0  # the default band is wide; a tighter one here
    cfg = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"max_calibration_factor": 1.5})})
    good = {"ctr/auc": 0.66, "cvr/auc": 0.60, "ctcvr/auc": 0.65, "ctr/calibration": 1.1}
    train = {"train_loss_first_tenth": 0.5, "train_loss_last_tenth": 0.2}
    assert floors(cfg, cfg.spec, good, train) == []
    bad = {**good, "cvr/auc": 0.48, "ctr/calibration": 1.96}
    assert floors(cfg, cfg.spec, bad, {"train_loss_first_tenth": 0.49, "train_loss_last_tenth": 2.52}) == [
        "cvr/auc 0.4800 is below the floor 0.52 (gate.min_auc)",
        "ctr/calibration 1.960 is outside [0.667, 1.5] (gate.max_calibration_factor)",
        "its training loss rose from 0.4900 (first tenth of the job's batches) to 2.5200 (last tenth), more than "
        "1.5x (gate.max_loss_growth): logs sorted by label, or a diverging learning rate",
    ]
    assert floors(cfg, cfg.spec, {**good, "ctr/calibration": 0.6}, {}) == [
        "ctr/calibration 0.600 is outside [0.667, 1.5] (gate.max_calibration_factor)"
    ]
    # the slice's noise: 0.47 on 50 conversions (s.e. 0.04) is no evidence; on 5,000 (s.e. 0.004) it is
    small = {**good, "cvr/auc": 0.47, "cvr/positives": 50.0, "cvr/rows": 1000.0}
    assert floors(cfg, cfg.spec, small, train) == []
    big = {**good, "cvr/auc": 0.47, "cvr/positives": 5000.0, "cvr/rows": 100_000.0}
    assert floors(cfg, cfg.spec, big, train) == [
        "cvr/auc 0.4700 is below the floor 0.52 (gate.min_auc) by more than 2 standard errors (0.0041)"
    ]
    # calibration 1.7 on 100 clicks (s.e. 10%) may be noise; on 10,000 (s.e. 1%) it is not
    assert floors(cfg, cfg.spec, {**good, "ctr/calibration": 1.7, "ctr/positives": 100.0}, train) == []
    assert floors(cfg, cfg.spec, {**good, "ctr/calibration": 1.7, "ctr/positives": 10_000.0}, train) == [
        "ctr/calibration 1.700 is outside [0.667, 1.5] (gate.max_calibration_factor) by more than 2 standard "
        "errors (0.017)"
    ]
    raw = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"floor_z": 0.0})})  # the raw figures
    assert floors(raw, cfg.spec, {**good, "ctr/calibration": 1.7, "ctr/positives": 100.0}, train) == [
        "ctr/calibration 1.700 is outside [0.667, 1.5] (gate.max_calibration_factor)"
    ]
    assert floors(cfg, cfg.spec, good, {"train_loss_first_tenth": 0.5, "train_loss_last_tenth": float("nan")}) == [
        "its training loss is not a number (first tenth 0.5, last tenth nan): it diverged"
    ]
    # a figure the slice cannot give (one class) is not judged here: `compare` defers on it
    assert floors(cfg, cfg.spec, {**good, "cvr/auc": float("nan")}, train) == []
    loose = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"min_auc": 0.4, "max_loss_growth": 10})})
    assert (
        floors(
            loose,
            cfg.spec,
            {**good, "cvr/auc": 0.48},
            {"train_loss_first_tenth": 0.49, "train_loss_last_tenth": 2.52},
        )
        == []
    )


def _gated(metrics: list[str], logs: str = "", days: int = 1):
    d = load_config("esmm", logs=logs or None).model_dump(mode="json")
    d["gate"].update(metrics=metrics, days=days)
    return type(load_config("esmm")).model_validate(d)


def test_a_figure_the_slice_cannot_give_defers_every_challenger_and_a_missing_one_refuses():
    """A one-class day gives nan AUC, NE and calibration: for the first champion (compared with
    itself) and for a challenger alike the gate defers (exit 10), whichever side has the nan or
    inf. A metric missing from either side refuses (exit 5), even when another one is nan."""
    from mtrec.eval.metrics import binary_report

    cfg = _gated(["ctr/auc", "ctr/ne", "ctr/calibration"])
    rng = np.random.default_rng(0)
    p = rng.random(1000)
    one_class = {f"ctr/{k}": v for k, v in binary_report(p, np.zeros(1000)).items()}
    sound = {f"ctr/{k}": v for k, v in binary_report(p, (rng.random(1000) < p).astype(float)).items()}
    assert [k for k, v in one_class.items() if np.isnan(v)] == ["ctr/auc", "ctr/ne", "ctr/calibration"]
    for chal, champ, text in [
        (one_class, one_class, r"ctr/auc is not a number on this slice \(challenger nan, champion nan;"),
        (
            sound,
            {**sound, "ctr/ne": float("nan")},
            r"ctr/ne is not a number on this slice \(challenger 0\.\d+, champion nan;",
        ),
        ({**sound, "ctr/calibration": float("inf")}, sound, r"ctr/calibration is not a number .*\(challenger inf, "),
    ]:
        with pytest.raises(GateDeferred, match=text) as e:
            compare(cfg, chal, champ)
        assert e.value.exit_code == 10
    no_ne = {k: v for k, v in one_class.items() if k != "ctr/ne"}
    with pytest.raises(GateRefused) as e:
        compare(cfg, sound, no_ne)  # ctr/auc is nan too: a missing metric is "no", never "not yet"
    assert type(e.value) is GateRefused and e.value.exit_code == 5
    assert str(e.value).startswith("metric ctr/ne is missing from the champion's evaluation (computed: ctr/auc, ")


def test_the_gate_slice_pools_the_newest_unseen_days_and_defers_until_there_are_enough(tmp_path):
    from mtrec.config import GateConfig
    from mtrec.tracking import gate_slice
    from mtrec.tracking.client import VersionInfo

    day5 = DAY4 + dt.timedelta(days=1)
    import pyarrow as pa
    import pyarrow.parquet as pq

    for d in (DAY1, DAY2, DAY4, day5):  # no logs for day 3; the slice needs to know only which days hold rows
        (tmp_path / f"dt={d}").mkdir()
        pq.write_table(pa.table({"x": [1]}), tmp_path / f"dt={d}" / "part-0.parquet")
    (tmp_path / f"dt={DAY1 + dt.timedelta(days=2)}").mkdir()  # a folder without rows is no day either
    chal = VersionInfo("2", DAY1, "ck2", "")
    champ = VersionInfo("1", DAY1, "ck1", "", {"mtrec.bn_recalibrated_on": str(DAY2)})  # seen to day 2

    def cfg(days):
        return _gated(["ctr/auc"], str(tmp_path), days)

    assert gate_slice(cfg(1), chal, champ) == [day5]
    assert gate_slice(cfg(2), chal, champ) == [DAY4, day5]
    assert gate_slice(cfg(3), chal) == [DAY2, DAY4, day5]
    with pytest.raises(GateDeferred) as e:
        gate_slice(cfg(3), chal, champ)
    assert str(e.value) == (
        f"only 2 day(s) (2026-01-04,2026-01-05) with logs after 2026-01-02 under {tmp_path}, gate.days is 3: the "
        "gate judges on days no model has seen (v2 to 2026-01-01, v1 to 2026-01-02); run `mtrec promote` again "
        "once the next day's logs land"
    )
    # --date D: the newest unseen days up to D, D itself included (its logs are checked when it is scored)
    assert gate_slice(cfg(2), chal, last=DAY4) == [DAY2, DAY4]
    assert gate_slice(cfg(1), chal, champ, last=DAY3) == [DAY3]
    with pytest.raises(
        GateDeferred,
        match=r"only 1 day\(s\) \(2026-01-04\) .* up to --date 2026-01-04, gate.days is 2: .*; "
        r"pass a later --date, or a lower gate.days$",
    ):
        gate_slice(cfg(2), chal, champ, last=DAY4)
    with pytest.raises(GateRefused) as e:
        gate_slice(cfg(1), chal, champ, last=DAY2)
    assert type(e.value) is GateRefused and str(e.value) == (
        "--date 2026-01-02 is not after the data the models have seen (v2 to 2026-01-01, v1 to 2026-01-02); "
        "pass a later day"
    )
    with pytest.raises(GateDeferred, match="^no day with logs after 2026-01-05 under"):
        gate_slice(cfg(1), VersionInfo("3", day5, "ck3", ""))
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        GateConfig(days=0)


@pytest.mark.slow  # logs two models to MLflow (embedded sqlite)
def test_the_gate_pools_gate_days_and_defers_on_a_one_class_day(world, tmp_path, monkeypatch):
    """Day 3 of the logs has no click: alone it cannot judge, for the first champion and for a
    challenger (deferred, no decision written); gate.days 2 pools days 2 and 3 (40,000 rows, day
    2's clicks) and the first champion is judged on both."""
    from mlflow import MlflowClient

    from mtrec.models import build_model
    from mtrec.serving import ServedModel
    from mtrec.tracking import Tracker, example_rows, promote

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs = tmp_path / "logs"
    for d in (DAY1, DAY2, DAY3):
        shutil.copytree(f"{world}/dt={d}", logs / f"dt={d}")
        shutil.copytree(f"{world}/_truth/dt={d}", logs / "_truth" / f"dt={d}")
    for f in glob.glob(f"{logs}/dt={DAY3}/*.parquet"):
        t = pq.read_table(f)
        for c in ("click", "conversion", "daction", "oaction"):  # the actions need a click: no click, none
            t = t.set_column(t.schema.get_field_index(c), c, pa.array(np.zeros(t.num_rows), t.schema.field(c).type))
        pq.write_table(t, f)
    d = load_config("esmm", logs=str(logs), workdir=str(tmp_path / "work")).model_dump(mode="json")
    d["model"]["batch_norm"] = False
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 20_000)

    def cfg(days):
        d["gate"]["days"] = days
        return type(load_config("esmm")).model_validate(without_floors(d))  # an untrained model

    tracker = Tracker(cfg(1))
    torch_model = build_model(cfg(1).spec, "cpu")
    served = ServedModel(cfg(1).spec, torch_model.state_dict())
    runs = {}

    def register(trained_to):
        run = tracker.start_run("nightly", [trained_to], f"{tmp_path}/ck-{trained_to}", None, None)
        uri = tracker.log_model(run, served, example_rows(str(logs), DAY1, served.columns))
        version = tracker.register(run, uri, f"{tmp_path}/ck-{trained_to}", trained_to)
        runs[version] = run
        return version

    assert register(DAY1) == "1"
    with pytest.raises(GateDeferred, match=r"ctr/auc is not a number on this slice \(challenger nan, champion nan;"):
        promote(cfg(1))  # the first champion on day 3 alone
    with pytest.raises(GateDeferred, match=r"^only 2 day\(s\) \(2026-01-02,2026-01-03\) with logs after 2026-01-01"):
        promote(cfg(3))
    decision = promote(cfg(2))
    assert decision.promoted and decision.slice == "2026-01-02,2026-01-03"
    client = MlflowClient(tracker.uri, tracker.uri)
    metrics = client.get_run(runs["1"]).data.metrics
    assert decision.reason.startswith(
        f"no champion yet: version 1 becomes the first, meeting the floors on 2026-01-02,2026-01-03 (ctr/auc "
        f"{metrics['gate/ctr/auc']:.4f}; "
    )
    clicks = pq.read_table(logs / f"dt={DAY2}", columns=["click"]).column(0).to_numpy().sum()
    assert metrics["gate/ctr/rows"] == 2 * ROWS and metrics["gate/ctr/positives"] == clicks > 0
    assert client.get_model_version(cfg(1).name, "1").tags["mtrec.gate.slice"] == "2026-01-02,2026-01-03"
    assert register(DAY2) == "2"  # a challenger trained to day 2: only day 3 is unseen
    with pytest.raises(GateDeferred, match=r"ctr/auc is not a number on this slice \(challenger nan, champion nan;"):
        promote(cfg(1))
    assert "mtrec.gate.decision" not in client.get_model_version(cfg(1).name, "2").tags
    assert str(client.get_model_version_by_alias(cfg(1).name, "champion").version) == "1"


def test_params_flatten_nested_config():
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "f": [{"name": "x"}, {"name": "y"}], "n": None, "t": True})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "f.0.name": "x", "f.1.name": "y", "n": "null", "t": "true"}


def test_tracking_uri_defaults_to_sqlite_in_the_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = small("./logs", str(tmp_path / "w"))
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/w/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(cfg) == "http://127.0.0.1:5999"
    assert tracking_uri(small("./logs", str(tmp_path), uri="http://h:1")) == "http://h:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="set `tracking.uri`"):
        tracking_uri(small("./logs", "s3://bucket/work"))


def test_one_jobs_store_is_not_the_next_configs_default(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports the URI to os.environ; a Tracker keeps the environment as
    the user set it, so the next config of the process (no tracking.uri) gets its own workdir's
    store, not the previous job's, and a user's MLFLOW_TRACKING_URI stays theirs."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    first = Tracker(small("./logs", str(tmp_path / "a"), uri=f"sqlite:///{tmp_path}/a.db"))
    assert mlflow.get_tracking_uri() == first.uri == mlflow.get_registry_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert Tracker(small("./logs", str(tmp_path / "b"))).uri == f"sqlite:///{tmp_path}/b/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/user.db")
    Tracker(small("./logs", str(tmp_path / "c"), uri=f"sqlite:///{tmp_path}/c.db"))
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/user.db"


def test_unreachable_server_fails_after_retries_naming_the_uri(tmp_path):
    port = _free_port()
    cfg = small("./logs", str(tmp_path), uri=f"http://127.0.0.1:{port}")
    tracker = Tracker(cfg)
    t0 = time.monotonic()
    with pytest.raises(
        TrackingError, match=rf"MLflow at http://127.0.0.1:{port} is unreachable: reading the experiment failed 2 time"
    ):
        tracker.experiment_id()
    assert time.monotonic() - t0 < 30
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise ConnectionError("connection refused")
        return "ok"

    assert tracker.call("x", flaky) == "ok" and len(calls) == 2
    with pytest.raises(TrackingError, match="refused y: bad value"):
        tracker.call("y", lambda: (_ for _ in ()).throw(ValueError("bad value")))


def test_served_model_scores_like_the_trained_model_without_the_shallow_tower(world, tmp_path):
    from mtrec.eval.evaluate import predict_day
    from mtrec.serving import ServedModel
    from mtrec.train import checkpoint
    from mtrec.train.local import train_days

    d = small(world, str(tmp_path)).model_dump(mode="json")
    d["model"]["shallow_tower"] = {"hidden": [8]}
    cfg = type(load_config("esmm")).model_validate(d)
    res = train_days(cfg, [DAY1])
    url = str(tmp_path / "ck")
    checkpoint.save(res.dmp, res.optimizer, url, checkpoint.spec_manifest(cfg))
    served = ServedModel.from_checkpoint(url)
    assert served.spec.model.shallow_tower is None and not any("shallow_tower" in k for k in served.model.state_dict())
    want = predict_day(res.model, cfg.spec, cfg.job.logs, DAY2)  # the sharded model, as served (no bias features)
    table = pq.read_table(f"{world}/dt={DAY2}")
    got = served.predict(table)
    order = np.argsort(want.row_id)
    for k in ("ctr", "cvr", "ctcvr"):
        assert np.abs(got[k][np.argsort(table.column("row_id").to_numpy())] - want.outputs[k][order]).max() < 1e-6
    served.save(tmp_path / "served")
    again = type(served).load(tmp_path / "served").predict(table)
    assert all(np.array_equal(again[k], got[k]) for k in got)
    with pytest.raises(Exception, match="lacks feature column.*brand"):
        served.predict(table.drop(["brand"]))


def test_a_job_run_is_marked_failed_when_its_block_raises_unless_kept_open(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(small("./logs", str(tmp_path)))
    runs = {}
    for day, keep_open in ((DAY1, None), (DAY2, lambda: True)):
        with (
            pytest.raises(RuntimeError, match="boom"),
            tracker.job_run("nightly", [day], f"{tmp_path}/ck", keep_open=keep_open) as run_id,
        ):
            runs[day] = run_id
            raise RuntimeError("boom")
    with tracker.job_run("bn_recalibration", [DAY3], f"{tmp_path}/ck") as run_id:
        runs[DAY3] = run_id
    client = MlflowClient(tracker.uri, tracker.uri)
    assert [client.get_run(runs[d]).info.status for d in (DAY1, DAY2, DAY3)] == ["FAILED", "RUNNING", "RUNNING"]
    tags = client.get_run(runs[DAY3]).data.tags
    assert (
        tags["mtrec.kind"] == "bn_recalibration"
        and tags["mtrec.date"] == str(DAY3)
        and tags["mtrec.checkpoint"] == f"{tmp_path}/ck"
    )


# what a scoring process must not import: the rest of mtrec.tracking, the run config, evaluation, plots
NOT_FOR_SCORING = (
    "mtrec.tracking.client",
    "mtrec.tracking.gate",
    "mtrec.tracking.record",
    "mtrec.config",
    "mtrec.data.io",
    "mtrec.eval.evaluate",
    "mtrec.eval.plots",
    "mtrec.bn",
    "mtrec.train.checkpoint",
    "matplotlib",
    "ray",
)


def _python(code: str, *args: str, **env: str) -> str:
    """`code` in a fresh interpreter that imports this tree's mtrec; its stdout."""
    import mtrec

    root = str(Path(mtrec.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow  # two fresh interpreters importing MLflow
def test_the_pyfunc_imports_only_what_scoring_needs():
    loaded = f"print([m for m in {NOT_FOR_SCORING!r} if m in sys.modules])"
    assert _python(f"import sys; import mtrec.tracking.pyfunc; {loaded}").strip() == "[]"
    assert _python(f"import sys; from mtrec.tracking import load_served; {loaded}").strip() == "[]"


def test_every_name_of_the_package_resolves():
    import mtrec.tracking

    assert all(getattr(mtrec.tracking, name) is not None for name in mtrec.tracking.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        mtrec.tracking.nothing  # noqa: B018


@pytest.mark.slow  # logs two models, loads them in a fresh interpreter
def test_load_served_loads_a_logged_model_with_scoring_code_only(world, tmp_path, monkeypatch):
    """A model logged now, and one whose logged code imports `MtrecPyfunc` from `mtrec.tracking`
    (as the code of models already in registries does), load as the same ServedModel in a process
    that imports nothing the scoring does not need."""
    from mtrec.models import build_model
    from mtrec.serving import ServedModel
    from mtrec.tracking import client, example_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = small(world, str(tmp_path / "work"))
    served = ServedModel(cfg.spec, build_model(cfg.spec, "cpu").state_dict())
    example = example_rows(cfg.job.logs, DAY1, served.columns)
    tracker = Tracker(cfg)
    run_id = tracker.start_run("nightly", [DAY1], str(tmp_path / "ck"), None, None)
    uris = [tracker.log_model(run_id, served, example)]
    package_code = tmp_path / "mlflow_model.py"
    package_code.write_text(
        "from mlflow.models import set_model\n\nfrom mtrec.tracking import MtrecPyfunc\n\nset_model(MtrecPyfunc())\n"
    )
    monkeypatch.setattr(client, "MODEL_CODE", str(package_code))
    uris.append(tracker.log_model(run_id, served, example))
    example.to_parquet(tmp_path / "example.parquet")
    code = (
        "import json, sys; import pandas as pd; from mtrec.tracking.pyfunc import load_served\n"
        "df = pd.read_parquet(sys.argv[1])\n"
        "scores = [load_served(u).predict_pandas(df).to_dict('list') for u in sys.argv[2:]]\n"
        f"print(json.dumps({{'scores': scores, 'imported': [m for m in {NOT_FOR_SCORING!r} if m in sys.modules]}}))"
    )
    out = json.loads(
        _python(code, str(tmp_path / "example.parquet"), *uris, MLFLOW_TRACKING_URI=tracker.uri).splitlines()[-1]
    )
    want = served.predict_pandas(example)
    assert out["imported"] == []
    for got in out["scores"]:
        for k in want.columns:
            assert np.abs(np.array(got[k]) - want[k].to_numpy()).max() < 1e-6


@pytest.mark.slow  # logs a model to MLflow and loads it back
def test_the_pyfunc_scores_null_and_string_ids_as_the_arrow_path_does(world, tmp_path, monkeypatch):
    """A DataFrame with None in a sparse column (an empty bag), a null and an empty multi-hot list,
    and string ids for a model trained on integer ids, mixed with integers in one column (a JSON
    request): `mlflow.pyfunc.load_model(...).predict` scores it as `mtrec predict`'s path
    (`ServedModel.predict` on Arrow columns of the contract's types) scores the same rows. The
    string "123" is another id than the integer 123 (hashed from its text), in both paths."""
    import mlflow
    import torch

    from mtrec.errors import MtrecError
    from mtrec.models import build_model
    from mtrec.serving import ServedModel
    from mtrec.tracking import example_rows, load_served

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = small(world, str(tmp_path / "work"))
    tracker = Tracker(cfg)
    run_id = tracker.start_run("nightly", [DAY1], str(tmp_path / "ck"), None, None)
    torch.manual_seed(0)
    served = ServedModel(cfg.spec, build_model(cfg.spec, "cpu").state_dict())
    uri = tracker.log_model(run_id, served, example_rows(cfg.job.logs, DAY1, served.columns))
    model, arrow_path = mlflow.pyfunc.load_model(uri), load_served(uri)

    rows = pq.read_table(sorted(glob.glob(f"{world}/dt={DAY1}/*.parquet"))[0]).slice(0, 6).select(served.columns)
    users, brands, tags = (rows.column(c).to_pylist() for c in ("user_id", "brand", "item_tags"))
    brands[0] = brands[4] = None  # a null id: an empty bag
    tags[0], tags[1] = None, []  # a null and an empty multi-hot list
    table = rows.set_column(rows.schema.get_field_index("brand"), "brand", pa.array(brands, pa.int64()))
    i = table.schema.get_field_index("item_tags")
    table = table.set_column(i, "item_tags", pa.array(tags, rows["item_tags"].type))
    as_str = table.set_column(0, "user_id", pa.array([str(u) for u in users]))
    by_int, by_str = arrow_path.predict(table), arrow_path.predict(as_str)  # what `mtrec predict` runs per batch
    odd = np.arange(6) % 2 == 1

    df = table.to_pandas()
    df["brand"] = pd.Series(brands, dtype=object)  # ints and None
    df["user_id"] = [str(u) if o else u for u, o in zip(users, odd, strict=True)]  # "123" and 123 in one column
    got = model.predict(df)
    one = model.predict(df.iloc[[0]].assign(brand=[None], item_tags=[None]))  # a column of nulls only
    strings = model.predict(df.assign(user_id=[str(u) for u in users]))
    assert list(got.columns) == ["ctr", "cvr", "ctcvr"] and len(got) == 6
    for k in got.columns:
        want = np.where(odd, by_str[k], by_int[k])
        assert np.abs(got[k].to_numpy() - want).max() < 1e-6
        assert abs(one[k].iloc[0] - by_int[k][0]) < 1e-6
        assert np.abs(strings[k].to_numpy() - by_str[k]).max() < 1e-6
        assert np.abs(by_str[k] - by_int[k]).max() > 1e-6  # "123" is not 123: another embedding row
    with pytest.raises(MtrecError, match=r"input column `brand` holds 1.5 \(float\); send integer or string ids"):
        model.predict(df.assign(brand=pd.Series(["7", 1.5, None, 3, 4, 5], dtype=object)))


# ---- integration: a real `mlflow server` ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 (sqlite backend, local artifacts) that can be stopped and restarted."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    mlflow_bin,
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.root}/mlflow.db",
                    "--artifacts-destination",
                    str(self.root / "artifacts"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("world4"))
    write_world(root, days=4, rows_per_day=ROWS, seed=5)
    return root


@pytest.fixture(scope="module")
def three_days(ray_local, server, world4, tmp_path_factory):
    """Full retrain of day 1, nightly days 2 and 3, each nightly judging the challenger the night
    before registered (as `nightly --promote` does before training), then the gate on day 3's.
    `gates`: "promoted" or the GateRefused, one per version."""
    from mtrec.jobs.nightly import gate_pending, run_nightly
    from mtrec.jobs.retrain import run_train
    from mtrec.tracking import promote

    cfg = small(world4, str(tmp_path_factory.mktemp("work")), uri=server.uri)
    summaries, gates = [run_train(cfg, DAY1, DAY1)], []
    for day in (DAY2, DAY3):
        gates.append(gate_pending(cfg, day) or "promoted")
        summaries += run_nightly(cfg, day)
    try:
        assert promote(cfg).promoted
        gates.append("promoted")
    except GateRefused as e:
        gates.append(e)
    return cfg, summaries, gates


@pytest.mark.slow
@pytest.mark.integration
def test_three_days_make_three_runs_and_versions_and_the_gate_moves_champion(three_days, server, caplog):
    from mlflow import MlflowClient

    cfg, summaries, gates = three_days
    client = MlflowClient(server.uri, server.uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.data.tags["mtrec.date"])
    assert [r.data.tags["mtrec.date"] for r in runs] == [str(DAY1), str(DAY2), str(DAY3)]
    assert [r.data.tags["mtrec.kind"] for r in runs] == ["full_retrain", "nightly", "nightly"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (
        runs[1].data.tags["mtrec.parent_run_id"] == runs[0].info.run_id
        and runs[2].data.tags["mtrec.parent_run_id"] == runs[1].info.run_id
    )
    for r, s, eval_day in zip(runs, summaries, (DAY2, DAY3, DAY4), strict=True):
        assert r.data.tags["mtrec.checkpoint"] == s.checkpoint and os.path.exists(f"{s.checkpoint}/_SUCCESS")
        assert r.data.tags["mtrec.eval_day"] == str(eval_day)
        model_id = r.data.tags["mtrec.model_uri"].removeprefix("models:/")
        assert client.get_logged_model(model_id).experiment_id == exp.experiment_id  # not the Default experiment
        assert r.data.params["train.batch_size"] == "256" and r.data.params["world_size"] == "1"
        assert r.data.params["plan.user_id"] == "table_wise"
        for task in ("ctr", "cvr", "ctcvr"):
            for m in ("auc", "gauc", "ne", "calibration", "log_loss"):
                assert 0 < r.data.metrics[f"eval/{task}/{m}"] < 100
        assert r.data.metrics["eval/cvr/auc_entire_space"] < r.data.metrics["eval/cvr/auc_entire_space_oracle"]
        losses = client.get_metric_history(r.info.run_id, "train/loss")
        assert len(losses) >= 2 and len(client.get_metric_history(r.info.run_id, "train/loss/cvr")) == len(losses)
        assert client.get_metric_history(r.info.run_id, "train/rows_per_s")[-1].value > 0
        files = {f.path for f in client.list_artifacts(r.info.run_id)} | {
            f.path for d in ("plots", "validation") for f in client.list_artifacts(r.info.run_id, d)
        }
        files |= {f.path for f in client.list_artifacts(r.info.run_id, "bn")}
        assert {
            "config.json",
            "manifest.json",
            f"validation/dt={r.data.tags['mtrec.date']}.json",
            "bn/running_stats.json",
            "bn/check.json",
            "plots/calibration.png",
            "plots/metric_trend.png",
            "plots/bn_drift.png",
        } <= files
        assert (
            r.data.tags["mtrec.bn_check"] == "passed" and r.data.metrics["bn/passed"] == 1.0
        )  # unsampled: statistics match serving
        assert r.data.metrics["bn/layers"] == 6 and 0 <= r.data.metrics["bn/towers.ctr.mlp.1/smd_mean"] < 10
    versions = sorted(client.search_model_versions(f"name = '{cfg.name}'"), key=lambda v: int(v.version))
    assert [v.tags["mtrec.date"] for v in versions] == [str(DAY1), str(DAY2), str(DAY3)]
    assert [v.tags["mtrec.checkpoint"] for v in versions] == [s.checkpoint for s in summaries]
    assert client.get_model_version_by_alias(cfg.name, "challenger").version == "3"
    # the champion moved exactly as the gate decided, and each decision is on its version
    champion = "1"
    assert gates[0] == "promoted" and versions[0].tags["mtrec.gate.decision"] == "promoted"
    for v, g in zip(versions[1:], gates[1:], strict=True):
        decision = v.tags["mtrec.gate.decision"]
        assert decision == ("refused" if isinstance(g, GateRefused) else "promoted")
        assert v.tags["mtrec.gate.slice"] == str(DAY4) and "ctr/auc" in v.tags["mtrec.gate.figures"]
        assert v.tags["mtrec.gate.bn"] == "passed"
        run = client.get_run(v.run_id)  # the gate's evaluation lands in the challenger's run too
        assert run.data.tags["mtrec.gate_slice"] == str(DAY4) and 0.5 < run.data.metrics["gate/ctr/auc"] < 1
        assert run.data.metrics["gate/bn/passed"] == 1.0
        champion = v.version if decision == "promoted" else champion
    assert client.get_model_version_by_alias(cfg.name, "champion").version == champion
    # a challenger already judged is not judged again by the next night
    from mtrec.jobs.nightly import gate_pending

    caplog.set_level(logging.INFO, logger="mtrec")
    caplog.clear()
    assert gate_pending(cfg, DAY4) is None
    assert not [r for r in caplog.records if r.getMessage().startswith("gate")]


@pytest.mark.slow
@pytest.mark.integration
def test_champion_pyfunc_predicts_like_mtrec_predict(three_days, server, world4, tmp_path, monkeypatch, capsys):
    import mlflow

    from mtrec.cli import main

    cfg, _, _ = three_days
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_registry_uri(server.uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.name}@champion")
    assert [c.name for c in model.metadata.get_input_schema().inputs][:2] == ["user_id", "item_id"]
    assert "position" not in model.metadata.get_input_schema().input_names()  # bias features are not served
    files = sorted(glob.glob(f"{world4}/dt={DAY4}/*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    direct = model.predict(df)
    assert list(direct.columns) == ["ctr", "cvr", "ctcvr"] and len(direct) == ROWS
    assert ((direct.values >= 0) & (direct.values <= 1)).all() and (direct["ctcvr"] <= direct["ctr"] + 1e-7).all()
    out = tmp_path / "pred" / "day4.parquet"
    rc = main(
        [
            "predict",
            "--config",
            "esmm",
            "--logs",
            world4,
            "--workdir",
            str(tmp_path),
            "--date",
            str(DAY4),
            "--model",
            f"models:/{cfg.name}@champion",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    written = pq.read_table(out).to_pandas()
    assert written.columns.tolist() == ["row_id", "ctr", "cvr", "ctcvr"]
    assert np.array_equal(written["row_id"].to_numpy(), df["row_id"].to_numpy())
    for k in ("ctr", "cvr", "ctcvr"):
        assert np.abs(written[k].to_numpy() - direct[k].to_numpy()).max() <= 1e-6
    # logs without a feature the model reads: one line naming the file and the column, nothing written
    broken = tmp_path / "broken" / f"dt={DAY4}"
    broken.mkdir(parents=True)
    pq.write_table(pq.read_table(files[0]).drop(["brand"]), broken / "part-00000.parquet")
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--config",
                "esmm",
                "--logs",
                str(tmp_path / "broken"),
                "--workdir",
                str(tmp_path),
                "--date",
                str(DAY4),
                "--model",
                f"models:/{cfg.name}@champion",
                "--out",
                str(tmp_path / "no.parquet"),
            ]
        )
        == 3
    )
    assert "part-00000.parquet lacks feature column(s) brand" in capsys.readouterr().err
    assert not (tmp_path / "no.parquet").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_a_worse_challenger_is_refused_and_champion_stays(three_days, server, world4, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mtrec.cli import main

    cfg, _, _ = three_days
    client = MlflowClient(server.uri, server.uri)
    champion = client.get_model_version_by_alias(cfg.name, "champion").version
    bad_logs = tmp_path / "shuffled"
    rng = np.random.default_rng(0)
    for day in (DAY1, DAY2, DAY3, DAY4):
        for f in sorted(Path(world4, f"dt={day}").glob("*.parquet")):
            t = pq.read_table(f)
            if day != DAY4:  # labels shuffled jointly (the label chain stays valid), features untouched
                perm = rng.permutation(t.num_rows)
                for c in ("click", "conversion", "daction", "oaction", "watch_time"):
                    t = t.set_column(t.schema.get_field_index(c), c, t.column(c).take(pa.array(perm)))
            (bad_logs / f"dt={day}").mkdir(parents=True, exist_ok=True)
            pq.write_table(t, bad_logs / f"dt={day}" / f.name)
    shutil.copytree(Path(world4, "_truth"), bad_logs / "_truth")
    # through the CLI with relative paths (Ray Train runs its workers in another directory)
    d = small(str(bad_logs), str(tmp_path / "work")).model_dump(mode="json")
    d["job"].update(logs="shuffled", workdir="work")
    d["tracking"].pop("uri")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert main(["train", "--config", "bad.yaml", "--from", str(DAY1), "--to", str(DAY3)]) == 0
    assert (tmp_path / "work" / "checkpoints" / cfg.name / f"dt={DAY3}" / "_SUCCESS").exists()
    version = client.get_model_version_by_alias(cfg.name, "challenger").version
    assert client.get_model_version(cfg.name, version).tags["mtrec.checkpoint"] == str(
        tmp_path / "work" / "checkpoints" / cfg.name / f"dt={DAY3}"
    )
    rc = main(["promote", "--config", "esmm", "--name", cfg.name, "--logs", world4, "--workdir", "work"])
    assert rc == 5
    v = client.get_model_version(cfg.name, version)
    assert v.tags["mtrec.gate.decision"] == "refused"
    reason = v.tags["mtrec.gate.reason"]
    assert reason.startswith(f"worse than champion v{champion} on {DAY4}: ctr/auc 0.") and "vs champion 0." in reason
    assert client.get_model_version_by_alias(cfg.name, "champion").version == champion


@pytest.mark.slow
@pytest.mark.integration
def test_server_down_mid_job_publishes_nothing_and_a_lost_registration_is_repaired(
    three_days, server, monkeypatch, caplog
):
    import mlflow
    from mlflow import MlflowClient

    from mtrec.jobs.nightly import run_nightly
    from mtrec.train import checkpoint

    cfg, _, _ = three_days
    url = checkpoint.checkpoint_url(cfg, DAY4)

    class ServerDies(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(
                "training "
            ):  # the run is open, the workers are starting: the server dies
                server.stop()

    hook = ServerDies()
    logging.getLogger("mtrec").addHandler(hook)
    caplog.set_level(logging.INFO, logger="mtrec")
    try:
        with pytest.raises(TrackingError) as err:
            run_nightly(cfg, DAY4)
    finally:
        logging.getLogger("mtrec").removeHandler(hook)
        server.stop()
        server.start()
    msg = str(err.value)
    assert f"MLflow at {server.uri} is unreachable" in msg and "nothing was published" in msg
    assert DAY4 not in checkpoint.published_days(cfg)
    client = MlflowClient(server.uri, server.uri)
    for v in client.search_model_versions(f"name = '{cfg.name}'"):  # no version points at a missing checkpoint
        assert os.path.exists(f"{v.tags['mtrec.checkpoint']}/_SUCCESS")

    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id], f"tags.`mtrec.date` = '{DAY4}'")
    assert [r.info.status for r in runs] == ["RUNNING"]  # MLflow was down: it could not be marked FAILED
    stale = runs[0].info.run_id

    def down(*_a, **_k):
        raise TrackingError("MLflow at x is unreachable")

    # 1. MLflow fails after the publish: the day is published, its registration incomplete
    monkeypatch.setattr(mlflow, "register_model", down)
    with pytest.raises(TrackingError, match="is published and run .* recorded, but its registration did not complete"):
        run_nightly(cfg, DAY4)
    monkeypatch.undo()
    assert client.get_run(stale).info.status == "FAILED"  # closed by the next run of the same job
    assert DAY4 in checkpoint.published_days(cfg)
    run_id = checkpoint.read_manifest(url)["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # recorded, not failed: only the registration lags
    by_run = f"name = '{cfg.name}' and tags.`mtrec.run_id` = '{run_id}'"
    assert not client.search_model_versions(by_run)
    # 2. the rerun registers the version, then MLflow fails before the alias: still incomplete
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)
    with pytest.raises(TrackingError):
        run_nightly(cfg, DAY4)
    monkeypatch.undo()
    (v,) = client.search_model_versions(by_run)
    assert client.get_model_version_by_alias(cfg.name, "challenger").version != v.version
    # 3. the next rerun completes it: no second version, alias moved, run FINISHED; nothing trained
    again = run_nightly(cfg, DAY4)
    assert again[0].skipped and again[0].mlflow["version"] == v.version
    assert [x.version for x in client.search_model_versions(by_run)] == [v.version]
    assert v.tags["mtrec.date"] == str(DAY4) and v.tags["mtrec.checkpoint"] == url
    assert client.get_model_version_by_alias(cfg.name, "challenger").version == v.version
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.integration
def test_a_day_sorted_by_click_read_in_file_order_never_becomes_champion(ray_local, tmp_path, monkeypatch):
    """A day exported sorted by click (non-clicks first, clicks last), trained with the shuffle off:
    the model learns "no click" and then "click"; its loss climbs, and the gate's floors refuse it
    as the first champion. The same day with the shuffle on (the default) becomes champion."""
    from mlflow import MlflowClient

    from mtrec.jobs.retrain import run_train
    from mtrec.tracking import promote

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs = str(tmp_path / "world")
    write_world(logs, days=2, rows_per_day=ROWS, seed=5, files_per_day=2, export=Export(sort_by="click"))
    decisions = {}
    for shuffle in (False, True):
        d = load_config("esmm", logs=logs, workdir=str(tmp_path / f"work-{shuffle}")).model_dump(mode="json")
        d["model"]["batch_norm"] = True
        d["train"].update(
            batch_size=256, num_workers=1, shuffle={"buffer_rows": 32768 if shuffle else 0, "files": shuffle}
        )
        for f in d["features"]["sparse"]:
            f["hash_size"] = min(f["hash_size"], 20_000)
        cfg = type(load_config("esmm")).model_validate(d)  # the default floors
        run_train(cfg, DAY1, DAY1)
        try:
            decisions[shuffle] = promote(cfg)
        except GateRefused as e:
            decisions[shuffle] = e
        if not shuffle:
            client = MlflowClient(Tracker(cfg).uri, Tracker(cfg).uri)
            (version,) = client.search_model_versions(f"name = '{cfg.name}'")
            aliases = client.get_registered_model(cfg.name).aliases
            refused = decisions[False]
            assert isinstance(refused, GateRefused) and "no champion yet, but" in str(refused)
            assert "its training loss rose from" in str(refused), str(refused)
            assert version.tags["mtrec.gate.decision"] == "refused" and "champion" not in aliases
    assert decisions[True].promoted, decisions[True]


def test_nightly_promote_judges_the_newest_version_with_gate_days_unseen_days(tmp_path, monkeypatch, caplog):
    """gate.days 2, versions trained to days 1, 2, 3, logs for days 1..4: before training day 4 the
    pending judgement is day 2's version (unseen days 3, 4), not the challenger (day 3's, only day 4
    unseen), and day 1's is skipped; with gate.days 1 it is the challenger. Once judged, the next
    night judges day 3's. The gate itself is stubbed: this is about which version it is given."""
    from mlflow import MlflowClient

    from mtrec.jobs.nightly import gate_pending
    from mtrec.tracking.client import VersionInfo
    from mtrec.tracking.gate import next_to_judge

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs = tmp_path / "logs"
    day5 = DAY4 + dt.timedelta(days=1)
    for d in (DAY1, DAY2, DAY3, DAY4):
        (logs / f"dt={d}").mkdir(parents=True)
        pq.write_table(pa.table({"x": [1]}), logs / f"dt={d}" / "part-0.parquet")
    base = small(str(logs), str(tmp_path / "work"))

    def cfg(days):
        return base.model_copy(update={"gate": base.gate.model_copy(update={"days": days})})

    judged = []
    monkeypatch.setattr(
        "mtrec.tracking.gate.promote", lambda c, version=None, day=None, address=None: judged.append(version)
    )
    client = MlflowClient(Tracker(base).uri, Tracker(base).uri)
    client.create_registered_model(base.name)
    for d in (DAY1, DAY2, DAY3):  # as `register` leaves them: `challenger` on the newest day's version
        mv = client.create_model_version(base.name, str(tmp_path / f"ck-{d}"), tags={"mtrec.date": str(d)})
        client.set_registered_model_alias(base.name, "challenger", mv.version)
    assert [v.version for v in Tracker(base).versions()] == ["3", "2", "1"]

    caplog.set_level(logging.INFO, logger="mtrec")
    assert gate_pending(cfg(1), DAY4) is None and judged == ["3"]  # N=1: the challenger, as before
    assert gate_pending(cfg(2), DAY4) is None and judged[1:] == ["2"]
    assert caplog.messages[-1] == (
        f"gate: judging version v2 (trained to {DAY2}, not judged yet) before training {DAY4}; newer v3 (to {DAY3}) "
        f"wait for gate.days=2 unseen days; skipping older unjudged v1 (to {DAY1}), superseded"
    )
    assert gate_pending(cfg(3), DAY4) is None and judged[2:] == ["1"]  # unseen days 2, 3, 4
    # none has 4 unseen days: the challenger is handed to the gate, which defers (as with one day)
    assert gate_pending(cfg(4), DAY4) is None and judged[3:] == ["3"]

    # v1 became champion, v2 was judged: the next night (day 5's logs, day 4's version) judges v3
    client.set_registered_model_alias(base.name, "champion", "1")
    client.set_model_version_tag(base.name, "1", "mtrec.gate.decision", "promoted")
    client.set_model_version_tag(base.name, "2", "mtrec.gate.decision", "refused")
    (logs / f"dt={day5}").mkdir()
    pq.write_table(pa.table({"x": [1]}), logs / f"dt={day5}" / "part-0.parquet")
    mv = client.create_model_version(base.name, str(tmp_path / f"ck-{DAY4}"), tags={"mtrec.date": str(DAY4)})
    client.set_registered_model_alias(base.name, "challenger", mv.version)
    assert gate_pending(cfg(2), day5) is None and judged[4:] == ["3"]

    # the pure choice: versions older than the newest judged one (or the champion) are never candidates
    v = {n: VersionInfo(str(n), d, "", "") for n, d in ((1, DAY1), (2, DAY2), (3, DAY3))}
    newest_first = [v[3], v[2], v[1]]
    assert next_to_judge(cfg(3), newest_first, None) == (v[2], [v[1]])  # logs to day 5: v2 has days 3, 4, 5
    assert next_to_judge(cfg(3), newest_first, v[2]) == (v[3], [])  # not ready (days 4, 5): handed on to defer
    assert next_to_judge(cfg(1), newest_first, v[3]) == (None, [])
    judged_v2 = VersionInfo("2", DAY2, "", "", {"mtrec.gate.decision": "refused"})
    assert next_to_judge(cfg(1), [v[3], judged_v2, v[1]], v[1]) == (v[3], [])
