"""Regression tests for defects found in review: each failed before its fix."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DAY1, WORLD_ROWS

from mtrec.config import load_config, parse_config
from mtrec.data.batch import BatchConverter
from mtrec.data.synth import write_world
from mtrec.data.validate import RowValidator
from mtrec.errors import ConfigError, MtrecError
from mtrec.eval.evaluate import Predictions, report
from mtrec.eval.metrics import auc, binary_report, gauc
from mtrec.train.stream import StreamCounts, day_batches


def _mini(extra_labels=None, tasks=None, model=None, dense=True):
    return parse_config({
        "name": "t", "labels": {"click": "binary", "conversion": "binary", **(extra_labels or {})},
        "features": {"sparse": [{"name": "user_id", "hash_size": 10}],
                     "dense": [{"name": "price"}] if dense else [], "bias": [{"name": "device", "num_values": 2}]},
        "tasks": tasks or [{"name": "ctr", "label": "click"}], "model": model or {"arch": "esmm"},
    })


def _batch(**cols):
    n = len(next(iter(cols.values())))
    base = {"user_id": pa.array(range(n), pa.int64()), "item_id": pa.array(range(n), pa.int64()),
            "position": pa.array([0] * n, pa.int32()), "click": pa.array([0] * n, pa.int8()),
            "conversion": pa.array([0] * n, pa.int8()), "price": pa.array([1.0] * n, pa.float32()),
            "device": pa.array([0] * n, pa.int8())}
    base.update(cols)
    return pa.record_batch(base)


def test_null_dense_feature_is_quarantined_not_nan():
    b = _batch(price=pa.array([1.0, None, float("nan"), 2.0], pa.float32()))
    split = RowValidator(_mini().spec).split(b)
    assert split.bad.column("reason").to_pylist() == ["bad_feature", "bad_feature"]
    assert not np.isnan(BatchConverter(_mini().spec)(split.good).dense.numpy()).any()


def test_log1p_regression_label_below_minus_one_is_out_of_range():
    cfg = _mini({"watch_time": "regression"}, [{"name": "ctr", "label": "click"}, {"name": "w", "label": "watch_time", "log1p": True}])
    b = _batch(watch_time=pa.array([0.0, -1.0, -0.5, 3.0], pa.float32()))
    assert RowValidator(cfg.spec).split(b).bad_index.tolist() == [1]


def test_boolean_labels_and_bias_and_uint64_ids_work():
    b = _batch(click=pa.array([True, False, True]), conversion=pa.array([True, True, False]),
               device=pa.array([True, False, False]), user_id=pa.array([2**63 + 5, 1, 2], pa.uint64()))
    split = RowValidator(_mini().spec).split(b)
    assert split.bad.column("reason").to_pylist() == ["conversion_without_click"]
    kjt = BatchConverter(_mini().spec)(split.good).sparse.to_dict()["user_id"]
    assert kjt.lengths().tolist() == [1, 1] and kjt.values().min() >= 0


def test_null_multi_hot_list_with_values_underneath():
    cfg = parse_config({"name": "t", "labels": {"click": "binary", "conversion": "binary"},
                        "features": {"sparse": [{"name": "tags", "hash_size": 1000, "multi_hot": True}]},
                        "tasks": [{"name": "ctr", "label": "click"}], "model": {"arch": "esmm"}})
    tags = pa.ListArray.from_arrays(pa.array([0, 2, 4, 5], pa.int32()), pa.array([1, 2, 3, 4, 5], pa.int64()),
                                    mask=pa.array([False, True, False]))
    rb = pa.record_batch({"tags": tags, "click": pa.array([0, 0, 0], pa.int8()), "conversion": pa.array([0, 0, 0], pa.int8())})
    kjt = BatchConverter(cfg.spec)(rb).sparse.to_dict()["tags"]
    assert kjt.lengths().tolist() == [2, 0, 1] and kjt.values().numel() == 3


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


def test_esm2_shallow_tower_on_composed_task_refused_at_load():
    d = load_config("esm2").model_dump(mode="json")
    d["model"]["shallow_tower"] = {"apply_to": ["cvr"]}
    with pytest.raises(ConfigError, match="names `cvr`, whose ESM2 probability is composed"):
        parse_config(d)
    d["model"]["shallow_tower"] = None
    d["labels"]["daction"] = "regression"
    with pytest.raises(ConfigError, match="`model.daction_task` `dar` must be a binary task"):
        parse_config(d)


def test_missing_arch_message():
    d = load_config("esmm").model_dump(mode="json")
    del d["model"]["arch"]
    with pytest.raises(ConfigError, match=r"missing required key `model.arch`; use one of shared_bottom"):
        parse_config(d, "c.yaml")


def test_synth_rewrite_replaces_the_world_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "w"
    write_world(str(out), days=1, rows_per_day=2000, seed=1, files_per_day=4)
    write_world(str(out), days=1, rows_per_day=1000, seed=2, files_per_day=2)
    assert sorted(p.name for p in (out / f"dt={DAY1}").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.read_table(out / f"dt={DAY1}").num_rows == 1000
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(MtrecError, match="is not empty and holds no _world.json"):
        write_world(str(foreign), days=1, rows_per_day=10)
    assert (foreign / "keep.txt").exists()


def test_truth_mismatch_is_an_error_not_a_silent_neighbour():
    cfg = _mini(tasks=[{"name": "ctr", "label": "click"}])
    pred = Predictions({"ctr": np.array([0.1, 0.2, 0.3, 0.4]), "ctr_logit": np.zeros(4)},
                       {"click": np.array([0, 1, 0, 1.0]), "conversion": np.zeros(4)},
                       np.arange(4), np.arange(4))
    truth = pa.table({"row_id": pa.array([0, 1, 3, 3]), "p_click_unbiased": pa.array([0.1, 0.2, 0.3, 0.4])})
    with pytest.raises(MtrecError, match=r"1 of 4 row ids missing, 1 duplicated"):
        report(cfg.spec, pred, truth)


def test_metrics_on_empty_input_are_nan():
    e = np.array([])
    assert np.isnan(auc(e, e)) and np.isnan(gauc(e, e, e))
    assert all(np.isnan(v) for k, v in binary_report(e, e, e).items() if k != "rows")
