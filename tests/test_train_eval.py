"""The training stream reads every good row once; single-process training through DMP learns;
evaluation reports what it documents."""

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DAY1, WORLD_ROWS, _mini

from mtrec.config import load_config
from mtrec.errors import MtrecError
from mtrec.eval.evaluate import Predictions, evaluate_day, predict_day, report
from mtrec.train.local import build_sharded, train_days
from mtrec.train.stream import StreamCounts, day_batches

DAY2, DAY3 = DAY1 + dt.timedelta(days=1), DAY1 + dt.timedelta(days=2)


def small(world):
    cfg = load_config("esmm", logs=world)
    d = cfg.model_dump(mode="json")
    d["train"]["batch_size"] = 256
    # 40,000 rows: too few for the towers' batch norm to pay (CTCVR 0.567 with it, 0.622 without, on
    # this world; docs/training.md "Small logs")
    d["model"]["batch_norm"] = False
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 20_000)
    return type(cfg).model_validate(d)


@pytest.fixture(scope="module")
def trained(world):
    cfg = small(world)
    return cfg, train_days(cfg, [DAY1, DAY2], log_every=10)


def test_every_good_row_is_trained_once(trained):
    _, res = trained
    assert res.counts.read == res.counts.good == 2 * WORLD_ROWS and res.counts.bad == 0
    assert len(res.counts.files) == 8


def test_training_learns(trained, world):
    cfg, res = trained
    first, last = res.losses[0]["loss"], np.mean([x["loss"] for x in res.losses[-5:]])
    assert last < 0.8 * first
    m = evaluate_day(res.model, cfg.spec, cfg.job.logs, DAY3)
    untrained, _ = build_sharded(cfg)
    base = evaluate_day(untrained.module.model, cfg.spec, cfg.job.logs, DAY3)
    # next day, as served; measured: ctr 0.588 vs 0.499 untrained, ctcvr 0.621 vs 0.583
    assert m["ctr/auc"] > 0.55 and m["ctr/auc"] > base["ctr/auc"] + 0.05
    assert m["ctcvr/auc"] > base["ctcvr/auc"] + 0.02


def test_report_keys_and_truth_metrics(trained):
    cfg, res = trained
    m = evaluate_day(res.model, cfg.spec, cfg.job.logs, DAY3)
    for task in ("ctr", "cvr", "ctcvr"):
        for k in ("auc", "gauc", "ne", "calibration", "log_loss", "rows"):
            assert f"{task}/{k}" in m
    assert m["ctr/rows"] == m["ctcvr/rows"] == WORLD_ROWS
    assert m["cvr/rows"] == pytest.approx(
        pq.read_table(f"{cfg.job.logs}/dt={DAY3}", columns=["click"]).column(0).to_numpy().sum()
    )
    assert 0.5 < m["ctr/auc_unbiased"] < m["ctr/auc_unbiased_oracle"] < 1
    assert 0.5 < m["cvr/auc_entire_space_oracle"] < 1 and m["cvr/auc_entire_space"] < m["cvr/auc_entire_space_oracle"]


def test_predictions_are_served_without_bias_features(world):
    cfg = load_config("mmoe", logs=world)
    d = cfg.model_dump(mode="json")
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 1000)
    cfg = type(cfg).model_validate(d)
    dmp, _ = build_sharded(cfg)
    pred = predict_day(dmp.module.model, cfg.spec, cfg.job.logs, DAY1)
    assert "bias_logit" not in pred.outputs and pred.outputs["ctr"].shape == (WORLD_ROWS,)
    assert np.array_equal(np.sort(pred.row_id), np.arange(WORLD_ROWS))


def test_stream_leaves_bad_rows_out_and_counts_them(tmp_path, world):
    shutil.copytree(f"{world}/dt={DAY1}", tmp_path / f"dt={DAY1}")
    path = tmp_path / f"dt={DAY1}" / "part-00000.parquet"
    t = pq.read_table(path)
    conv = t.column("conversion").to_numpy().copy()
    click = t.column("click").to_numpy()
    conv[np.flatnonzero(click == 0)[:11]] = 1
    pq.write_table(t.set_column(t.schema.get_field_index("conversion"), "conversion", pa.array(conv)), path)
    cfg = load_config("esmm", logs=str(tmp_path))
    counts = StreamCounts()
    rows = sum(b.num_rows for b in day_batches(cfg.spec, cfg.job.logs, [DAY1], 1000, counts))
    assert (counts.read, counts.bad, counts.good, rows) == (WORLD_ROWS, 11, WORLD_ROWS - 11, WORLD_ROWS - 11)


def test_training_stream_tolerates_schema_variation_between_files(world, tmp_path):
    day = tmp_path / f"dt={DAY1}"
    shutil.copytree(Path(world) / f"dt={DAY1}", day)
    t = pq.read_table(day / "part-00001.parquet")
    t = t.set_column(t.schema.get_field_index("position"), "position", t.column("position").cast(pa.int64()))
    t = t.select(list(reversed(t.column_names))).append_column("extra", pa.array(["x"] * t.num_rows))
    pq.write_table(t, day / "part-00001.parquet")
    t2 = pq.read_table(day / "part-00002.parquet")
    schema = pa.schema([f.with_nullable(False) if f.name == "user_id" else f for f in t2.schema])
    pq.write_table(t2.cast(schema), day / "part-00002.parquet")
    counts = StreamCounts()
    cfg = load_config("esmm", logs=str(tmp_path))
    rows = sum(b.num_rows for b in day_batches(cfg.spec, cfg.job.logs, [DAY1], 4096, counts))
    assert rows == counts.good == WORLD_ROWS


def test_truth_mismatch_is_an_error_not_a_silent_neighbour():
    cfg = _mini(tasks=[{"name": "ctr", "label": "click"}])
    pred = Predictions(
        {"ctr": np.array([0.1, 0.2, 0.3, 0.4]), "ctr_logit": np.zeros(4)},
        {"click": np.array([0, 1, 0, 1.0]), "conversion": np.zeros(4)},
        np.arange(4),
        np.arange(4),
    )
    truth = pa.table({"row_id": pa.array([0, 1, 3, 3]), "p_click_unbiased": pa.array([0.1, 0.2, 0.3, 0.4])})
    with pytest.raises(MtrecError, match=r"1 of 4 row ids missing, 1 duplicated"):
        report(cfg.spec, pred, truth)


def test_a_range_is_scored_as_one_pooled_slice(world):
    """Days 2 and 3 pooled: one report over 40,000 rows (not a mean of daily figures), the truth
    joined day by day although row ids repeat across days."""
    from mtrec.eval.evaluate import evaluate_days, read_truth
    from mtrec.eval.metrics import auc

    cfg = small(world)
    model = build_sharded(cfg)[0].module.model
    both = evaluate_days(model, cfg.spec, cfg.job.logs, [DAY2, DAY3])
    parts = [predict_day(model, cfg.spec, cfg.job.logs, d) for d in (DAY2, DAY3)]
    assert np.intersect1d(parts[0].row_id, parts[1].row_id).size == WORLD_ROWS  # the key is (day, row_id)
    pooled = Predictions.pooled(parts)
    truth = np.concatenate(
        [
            read_truth(world, d).to_pandas().set_index("row_id").loc[p.row_id, "p_click_unbiased"].to_numpy()
            for d, p in zip((DAY2, DAY3), parts, strict=True)
        ]
    )
    assert both["ctr/rows"] == both["ctcvr/rows"] == 2 * WORLD_ROWS
    assert both["ctr/auc"] == pytest.approx(auc(pooled.outputs["ctr"], pooled.labels["click"]), abs=1e-12)
    assert both["ctr/auc_unbiased"] == pytest.approx(auc(pooled.outputs["ctr"], truth), abs=1e-12)
    daily = [evaluate_day(model, cfg.spec, cfg.job.logs, d) for d in (DAY2, DAY3)]
    assert both["cvr/rows"] == daily[0]["cvr/rows"] + daily[1]["cvr/rows"]
    assert both["ctr/positives"] == daily[0]["ctr/positives"] + daily[1]["ctr/positives"]


def test_evaluate_from_to_skips_days_without_logs_and_prints_strict_json(tmp_path, monkeypatch, capsys):
    """`mtrec evaluate --from D1 --to D4` over logs of days 1 and 3: both scored as one slice, the
    others skipped with a line each; NaN is null in --json. A range with no day, one flag of the
    pair, or --date with it: one line and the exit code."""
    import json

    from mtrec.cli import main

    logs = tmp_path / "logs"
    import pyarrow.parquet as pq

    for d in (DAY1, DAY3):  # which days hold rows is all the range needs to know
        (logs / f"dt={d}").mkdir(parents=True)
        pq.write_table(pa.table({"x": [1]}), logs / f"dt={d}" / "part-0.parquet")
    got = {}

    def scored(cfg, days, url=None, address=None):  # the checkpoint's scoring has its own tests
        got["days"] = days
        metrics = {"ctr/auc": float("nan"), "ctr/ne": np.float32(0.25), "ctr/rows": 3.0}
        return metrics, "file:///ck/dt=2025-12-31", {"days": ["2025-12-31"], "rows_trained": 10, "world_size": 1}

    monkeypatch.setattr("mtrec.jobs.evaluate.evaluate_checkpoint", scored)
    common = ["evaluate", "--logs", str(logs), "--workdir", str(tmp_path / "w")]
    assert main([*common, "--from", "2026-01-01", "--to", "2026-01-04", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) == {
        "checkpoint": "file:///ck/dt=2025-12-31",
        "date": None,
        "from": "2026-01-01",
        "to": "2026-01-04",
        "days": ["2026-01-01", "2026-01-03"],
        "metrics": {"ctr/auc": None, "ctr/ne": 0.25, "ctr/rows": 3.0},
    }
    assert got["days"] == [DAY1, DAY3]
    assert f"no logs for 2026-01-02 under {logs}: skipped" in err
    assert f"no logs for 2026-01-04 under {logs}: skipped" in err
    assert "on 2026-01-01 .. 2026-01-04 pooled (2 of 4 days have logs):" in err
    assert main([*common, "--date", "2026-01-03", "--json"]) == 0  # --date D is the range D .. D
    out = json.loads(capsys.readouterr().out)
    assert (out["date"], out["from"], out["to"], out["days"]) == (
        "2026-01-03",
        "2026-01-03",
        "2026-01-03",
        ["2026-01-03"],
    )
    for args, code, text in [
        (
            ["--from", "2026-01-05", "--to", "2026-01-06"],
            3,
            f"no logs for any day of 2026-01-05 .. 2026-01-06 under {logs} (days present: 2026-01-01 .. 2026-01-03 "
            "(2)); check --logs and --from/--to",
        ),
        (["--date", "2026-01-02"], 3, f"no logs for 2026-01-02 under {logs} (days present: "),
        (["--from", "2026-01-01"], 2, "pass --date D for a day, or both --from D1 and --to D2 for a range"),
        (["--date", "2026-01-01", "--to", "2026-01-03"], 2, "pass either --date D or --from D1 --to D2, not both"),
        (["--from", "2026-01-03", "--to", "2026-01-01"], 2, "--to 2026-01-01 is before --from 2026-01-03"),
    ]:
        assert main([*common, *args]) == code, args
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith(f"mtrec: error: {text}"), err


def test_a_job_summary_with_a_diverged_loss_is_strict_json():
    """--summary FILE: a NaN loss is null, a numpy figure a number."""
    import json

    from mtrec.jobs.plan import TrainSummary

    s = TrainSummary(model="m", days=["2026-01-01"], world_size=1, progress=[{"step": 1, "loss": float("nan")}])
    s.rows_per_s = np.float32(2.5)
    d = json.loads(s.to_json(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert d["progress"] == [{"step": 1, "loss": None}] and d["rows_per_s"] == 2.5
