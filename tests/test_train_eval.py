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
