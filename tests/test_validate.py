import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DAY1, WORLD_ROWS, _batch, _mini

from mtrec.config import load_config
from mtrec.data.batch import BatchConverter
from mtrec.data.synth import write_world
from mtrec.data.validate import RowValidator
from mtrec.errors import DataValidationError
from mtrec.jobs.protocol import validate


def _set(table: pa.Table, col: str, rows: list[int], value) -> pa.Table:
    """Copy of `table` with `col` set to `value` (None = null) at `rows`."""
    arr = table.column(col).combine_chunks()
    vals = arr.to_numpy(zero_copy_only=False).copy()
    mask = arr.is_null().to_numpy(zero_copy_only=False).copy()
    if value is None:
        mask[rows] = True
    else:
        vals[rows] = value
        mask[rows] = False
    return table.set_column(table.schema.get_field_index(col), col, pa.array(vals, type=arr.type, mask=mask))


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bad_world(world, tmp_path) -> tuple[str, dict[str, int], dict[int, str]]:
    """A copy of day 1 with rows injected that break each rule; the expected counts by reason."""
    root = tmp_path / "bad-logs"
    shutil.copytree(Path(world) / f"dt={DAY1}", root / f"dt={DAY1}")
    path = root / f"dt={DAY1}" / "part-00001.parquet"
    t = pq.read_table(path)
    click = t.column("click").to_numpy()
    clean = np.flatnonzero(click == 0)  # rows with no click, hence no action and no conversion
    clicked = np.flatnonzero(click == 1)
    plan = [  # (reason, column, value, how many, which pool)
        ("null_id", "user_id", None, 3, clean),
        ("null_id", "item_id", None, 2, clean),
        ("bad_position", "position", -1, 3, clean),
        ("null_label", "click", None, 6, clean),
        ("null_label", "watch_time", float("nan"), 2, clean),
        ("label_out_of_range", "conversion", 2, 4, clean),
        ("conversion_without_click", "conversion", 1, 7, clean),
        ("daction_without_click", "daction", 1, 5, clean),
        ("oaction_without_click", "oaction", 1, 4, clean),
        ("bad_feature:user_activity", "user_activity", float("nan"), 2, clean),
        ("bad_feature:device", "device", -3, 1, clean),
    ]
    expected: dict[str, int] = {}
    row_reason: dict[int, str] = {}
    cursor = {id(clean): 0, id(clicked): 0}
    for reason, col, value, n, pool in plan:
        rows = pool[cursor[id(pool)] : cursor[id(pool)] + n].tolist()
        cursor[id(pool)] += n
        t = _set(t, col, rows, value)
        expected[reason] = expected.get(reason, 0) + n
        row_reason.update({r: reason for r in rows})
    both = clicked[:3].tolist()  # clicked rows get both actions
    t = _set(_set(t, "daction", both, 1), "oaction", both, 1)
    expected["daction_and_oaction"] = 3
    row_reason.update({r: "daction_and_oaction" for r in both})
    pq.write_table(t, path)
    return str(root), expected, row_reason


def test_clean_day_has_no_bad_rows(cfg):
    report = validate(cfg, DAY1)
    assert report.input_rows == WORLD_ROWS == report.good_rows
    assert report.bad_rows == 0 and report.passed
    assert [f["rows"] for f in report.files] == [5000] * 4
    assert set(report.by_reason.values()) == {0}
    written = json.loads(Path(report.quarantine.replace("file://", ""), "_report.json").read_text())
    assert written["input_rows"] == WORLD_ROWS and written["passed"] is True


def test_injected_bad_rows_counted_exactly_and_quarantined(bad_world, tmp_path):
    logs, expected, row_reason = bad_world
    before = _snapshot(Path(logs))
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    report = validate(cfg, DAY1)
    got = {r: n for r, n in report.by_reason.items() if n}
    assert got == expected
    assert report.bad_rows == sum(expected.values()) == 42
    assert report.input_rows == report.good_rows + report.bad_rows == WORLD_ROWS
    assert report.passed  # 42 / 20,000 = 0.21% < 1%

    q = pq.read_table(Path(tmp_path / "work" / "quarantine" / f"dt={DAY1}"))
    assert q.num_rows == 42
    assert q.column_names[-3:] == ["source_file", "source_row", "reason"]
    assert set(q.column("source_file").to_pylist()) == {"part-00001.parquet"}
    # every quarantined row is traceable to the injected row and its reason
    traced = dict(zip(q.column("source_row").to_pylist(), q.column("reason").to_pylist(), strict=True))
    assert traced == row_reason
    assert _snapshot(Path(logs)) == before  # the logs root is never written


def test_threshold_fails_the_day_after_writing_quarantine(bad_world, tmp_path):
    logs, expected, _ = bad_world
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    cfg = cfg.model_copy(update={"job": cfg.job.model_copy(update={"max_bad_fraction": 0.001})})
    with pytest.raises(DataValidationError, match=r"is above job.max_bad_fraction=0.10%"):
        validate(cfg, DAY1)
    qdir = tmp_path / "work" / "quarantine" / f"dt={DAY1}"
    assert pq.read_table(qdir).num_rows == 42
    assert json.loads((qdir / "_report.json").read_text())["passed"] is False


def test_threshold_message_names_counts_and_fix(bad_world, tmp_path):
    logs, _, _ = bad_world
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    cfg = cfg.model_copy(update={"job": cfg.job.model_copy(update={"max_bad_fraction": 0.001})})
    with pytest.raises(DataValidationError) as e:
        validate(cfg, DAY1)
    msg = str(e.value)
    assert msg.startswith(
        f"day {DAY1}: 0.21% of rows quarantined (42 of 20,000: null_label 8, conversion_without_click 7"
    )
    assert "above job.max_bad_fraction=0.10%; inspect" in msg and "fix the logs or raise the limit" in msg


def test_revalidation_replaces_quarantine(bad_world, tmp_path):
    logs, _, _ = bad_world
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    validate(cfg, DAY1)
    report = validate(cfg, DAY1)
    assert pq.read_table(tmp_path / "work" / "quarantine" / f"dt={DAY1}").num_rows == report.bad_rows == 42


def test_memory_filesystem_end_to_end():
    write_world("memory://vt-world", days=1, rows_per_day=3000, seed=1, files_per_day=2)
    cfg = load_config("esmm", logs="memory://vt-world", workdir="memory://vt-work")
    report = validate(cfg, DAY1)
    assert (report.input_rows, report.bad_rows, len(report.files)) == (3000, 0, 2)
    assert report.files[0]["size"] > 0
    import fsspec

    assert fsspec.filesystem("memory").exists(f"/vt-work/quarantine/dt={DAY1}/_report.json")


def _rewrite(world: str, tmp_path: Path, change) -> str:
    root = tmp_path / "logs"
    shutil.copytree(Path(world) / f"dt={DAY1}", root / f"dt={DAY1}")
    path = root / f"dt={DAY1}" / "part-00002.parquet"
    pq.write_table(change(pq.read_table(path)), path)
    return str(root)


def test_missing_column_is_a_clear_error_and_nothing_is_written(world, tmp_path):
    logs = _rewrite(world, tmp_path, lambda t: t.drop_columns(["conversion"]))
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    with pytest.raises(
        DataValidationError,
        match=rf"logs {DAY1} file part-00002.parquet: column\(s\) missing: `conversion` "
        r"\(required by `labels`\); map label `conversion` with `columns.labels: \{conversion: <name>\}`, "
        r"or drop it from `labels` and its tasks$",
    ):
        validate(cfg, DAY1)
    assert not (tmp_path / "work").exists()


def test_every_missing_column_named_at_once_with_its_fix(world, tmp_path):
    logs = _rewrite(world, tmp_path, lambda t: t.drop_columns(["conversion", "user_id", "item_price"]))
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    with pytest.raises(DataValidationError) as e:
        validate(cfg, DAY1)
    msg = str(e.value)
    assert "column(s) missing: `user_id` (required by the data contract), `conversion` (required by `labels`), " in msg
    assert "`item_price` (required by `features.dense` (item_price))" in msg
    assert "map `user_id` to the log's column with `columns.user_id: <name>`, or drop the feature" in msg
    assert "add the column to the export, name it with the feature's `column:`, or remove the feature" in msg
    assert "\n" not in msg


def test_wrong_type_is_a_clear_error(world, tmp_path):
    logs = _rewrite(
        world,
        tmp_path,
        lambda t: t.set_column(t.schema.get_field_index("click"), "click", t.column("click").cast(pa.string())),
    )
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    with pytest.raises(
        DataValidationError, match=r"column `click` has type string, expected an integer label \(int8 0/1\)"
    ):
        validate(cfg, DAY1)


def test_multi_hot_declared_on_scalar_column(world, tmp_path):
    logs = _rewrite(
        world, tmp_path, lambda t: t.set_column(t.schema.get_field_index("item_tags"), "item_tags", t.column("brand"))
    )
    cfg = load_config("esmm", logs=logs, workdir=str(tmp_path / "work"))
    with pytest.raises(
        DataValidationError, match=r"`item_tags` has type int64, expected a list of integer or string ids"
    ):
        validate(cfg, DAY1)


def test_missing_day_names_the_day_and_what_exists(cfg):
    with pytest.raises(
        DataValidationError, match=r"no logs for 2026-03-01 under .* days present: 2026-01-01 \.\. 2026-01-03 \(3\)"
    ):
        validate(cfg, dt.date(2026, 3, 1))


def test_corrupt_file_is_a_clear_error(world, tmp_path):
    root = tmp_path / "logs"
    shutil.copytree(Path(world) / f"dt={DAY1}", root / f"dt={DAY1}")
    (root / f"dt={DAY1}" / "part-00003.parquet").write_bytes(b"not parquet at all")
    cfg = load_config("esmm", logs=str(root), workdir=str(tmp_path / "work"))
    with pytest.raises(
        DataValidationError, match=r"part-00003.parquet: not a readable Parquet file .* re-export the file"
    ):
        validate(cfg, DAY1)


def test_split_partitions_a_batch(cfg):
    """The training stream's filter: good + bad = batch, reasons aligned with rows."""
    batch = pa.record_batch(
        {
            "user_id": pa.array([1, None, 3, 4], pa.int64()),
            "item_id": pa.array([1, 2, 3, 4], pa.int64()),
            "position": pa.array([0, 1, 2, 3], pa.int32()),
            "click": pa.array([1, 1, 0, 0], pa.int8()),
            "conversion": pa.array([1, 0, 1, 0], pa.int8()),
        }
    )
    small = load_config("esmm").model_dump()
    small["labels"] = {"click": "binary", "conversion": "binary"}
    small["features"] = {"sparse": [{"name": "user_id", "hash_size": 10}]}
    from mtrec.config import parse_config

    good, bad, index = RowValidator(parse_config(small).spec).split(batch)
    assert good.column("user_id").to_pylist() == [1, 4]
    assert bad.column("reason").to_pylist() == ["null_id", "conversion_without_click"]
    assert index.tolist() == [1, 2]


def test_null_dense_feature_is_quarantined_not_nan():
    b = _batch(price=pa.array([1.0, None, float("nan"), 2.0], pa.float32()))
    split = RowValidator(_mini().spec).split(b)
    assert split.bad.column("reason").to_pylist() == ["bad_feature:price", "bad_feature:price"]  # the column named
    assert not np.isnan(BatchConverter(_mini().spec)(split.good).dense.numpy()).any()


def test_a_dense_fill_value_keeps_null_and_nan_rows_and_serves_them_alike():
    """With `fill:`, null and NaN take the fill value in training and serving (one converter);
    an infinite value is still quarantined, naming the column."""
    from mtrec.config import parse_config

    d = _mini().model_dump(mode="json")
    d["features"]["dense"] = [{"name": "price", "fill": -1.0}]
    spec = parse_config(d).spec
    b = _batch(price=pa.array([1.0, None, float("nan"), float("inf")], pa.float32()))
    split = RowValidator(spec).split(b)
    assert split.good.num_rows == 3 and split.bad.column("reason").to_pylist() == ["bad_feature:price"]
    assert BatchConverter(spec)(split.good).dense[:, 0].tolist() == [1.0, -1.0, -1.0]


def test_log1p_regression_label_below_minus_one_is_out_of_range():
    cfg = _mini(
        {"watch_time": "regression"},
        [{"name": "ctr", "label": "click"}, {"name": "w", "label": "watch_time", "log1p": True}],
    )
    b = _batch(watch_time=pa.array([0.0, -1.0, -0.5, 3.0], pa.float32()))
    assert RowValidator(cfg.spec).split(b).bad_index.tolist() == [1]


def test_multiclass_label_outside_its_classes_is_out_of_range():
    cfg = _mini(
        {"level": "multiclass"}, [{"name": "ctr", "label": "click"}, {"name": "lv", "label": "level", "classes": 3}]
    )
    b = _batch(level=pa.array([0, 2, 3, -1, None, 1, 7], pa.int64()))
    split = RowValidator(cfg.spec).split(b)
    assert split.bad_index.tolist() == [2, 3, 4, 6]
    assert split.bad.column("reason").to_pylist() == [
        "label_out_of_range",
        "label_out_of_range",
        "null_label",
        "label_out_of_range",
    ]
    assert BatchConverter(cfg.spec)(split.good).labels["level"].tolist() == [0.0, 2.0, 1.0]
    with pytest.raises(DataValidationError, match=r"column `level` has type double, expected an integer class label"):
        RowValidator(cfg.spec).check_schema(_batch(level=pa.array([0.0])).schema, "day")
