"""A user's own logs as they come: the contract's columns under other names, positions from 1,
click-only and position-free logs, per-feature fills, other day-folder layouts and days without
logs. The end-to-end run (validate -> train -> nightly -> evaluate -> predict) is in
test_own_logs_e2e.py; these are the pieces, in-process."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DAY1, _batch

from mtrec.config import load_config, parse_config
from mtrec.data.batch import BatchConverter
from mtrec.data.io import LogsRoot, list_day_files, list_days
from mtrec.data.validate import RowValidator, contract_view, validate_day
from mtrec.errors import ConfigError, DataValidationError
from mtrec.jobs.nightly import plan_nightly
from mtrec.jobs.protocol import days_with_logs
from mtrec.train.stream import day_batches

RENAME = {"user_id": "uid", "item_id": "hotel_id", "position": "rank", "click": "clicked", "conversion": "booked"}
MAPPING = {
    "user_id": "uid",
    "item_id": "hotel_id",
    "position": "rank",
    "position_base": 1,
    "labels": {"click": "clicked", "conversion": "booked"},
}


def _export(world: str, out: Path, change, day: dt.date = DAY1, folder: str | None = None) -> str:
    """Day `day` of the session world rewritten by `change` (a table -> table) under `out`."""
    src = Path(world) / f"dt={day}"
    dst = out / (folder or f"dt={day}")
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.parquet")):
        pq.write_table(change(pq.read_table(f)), dst / f.name)
    return str(out)


def _renamed(t: pa.Table) -> pa.Table:
    t = t.rename_columns([RENAME.get(c, c) for c in t.column_names])
    rank = pa.compute.add(t.column("rank"), 1)  # positions counted from 1
    return t.set_column(t.schema.get_field_index("rank"), "rank", rank)


def _esmm(**top) -> dict:
    import yaml

    from mtrec.config import example_path

    d = yaml.safe_load(example_path("esmm").read_text())
    d.update(top)
    return d


def test_mapped_columns_and_1_based_positions_read_as_the_contract(world, tmp_path):
    logs = _export(world, tmp_path / "logs", _renamed)
    plain = load_config("esmm", logs=world, workdir=str(tmp_path / "w0"))
    mapped = parse_config(_esmm(columns=MAPPING)).with_overrides(logs=logs, workdir=str(tmp_path / "w1"))
    a, b = (
        validate_day(plain.spec, world, DAY1, plain.job.workdir),
        validate_day(mapped.spec, logs, DAY1, mapped.job.workdir),
    )
    assert (b.input_rows, b.good_rows, b.warnings) == (a.input_rows, a.good_rows, []) and b.good_rows == 20_000
    rows = lambda cfg, root: pa.Table.from_batches(list(day_batches(cfg.spec, root, [DAY1], 4096)))  # noqa: E731
    ta, tb = rows(plain, world), rows(mapped, logs)
    for col in ("user_id", "item_id", "position", "click", "conversion"):
        assert tb.column(col).equals(ta.column(col)), col  # read as the contract names them, positions from 0


def test_a_0_in_a_1_based_log_is_bad_position_and_quarantined_as_logged(world, tmp_path):
    def change(t):
        t = _renamed(t)
        rank = t.column("rank").to_numpy().copy()
        rank[:3] = 0
        return t.set_column(t.schema.get_field_index("rank"), "rank", pa.array(rank, t.schema.field("rank").type))

    logs = _export(world, tmp_path / "logs", change)
    cfg = parse_config(_esmm(columns=MAPPING))
    report = validate_day(cfg.spec, logs, DAY1, str(tmp_path / "work"))
    assert report.by_reason["bad_position"] == 3 * 4  # 3 rows in each of the 4 files
    q = pq.read_table(tmp_path / "work" / "quarantine" / f"dt={DAY1}")
    assert "rank" in q.column_names and "position" not in q.column_names  # the log's own columns
    assert set(q.column("rank").to_pylist()) == {0}


def test_a_0_based_config_that_sees_no_0_warns(world, tmp_path, caplog):
    logs = _export(
        world,
        tmp_path / "logs",
        lambda t: t.set_column(
            t.schema.get_field_index("position"), "position", pa.compute.add(t.column("position"), 1)
        ),
    )
    cfg = load_config("esmm")
    with caplog.at_level(logging.WARNING, logger="mtrec"):
        report = validate_day(cfg.spec, logs, DAY1, str(tmp_path / "work"))
    assert report.warnings == [
        "no position 0 in 20,000 good rows (the smallest is 1): if the logs count slots from 1, set "
        "`columns.position_base: 1`, else the learned position curve is off by one"
    ]
    assert "set `columns.position_base: 1`" in caplog.text and "warning: no position 0" in report.summary()


def test_click_only_log_without_position_or_conversion_validates(world, tmp_path):
    logs = _export(world, tmp_path / "logs", lambda t: t.drop_columns(["conversion", "position", "daction"]))
    d = _esmm(labels={"click": "binary"}, tasks=[{"name": "ctr", "label": "click"}])
    d["features"]["bias"] = []
    d["model"] = {"arch": "mmoe"}
    cfg = parse_config(d)
    assert "position" not in cfg.spec.required_columns() and "conversion" not in cfg.spec.required_columns()
    report = validate_day(cfg.spec, logs, DAY1, str(tmp_path / "work"))
    assert report.good_rows == 20_000 and "bad_position" not in report.by_reason


def test_ids_nobody_reads_are_optional(world, tmp_path):
    logs = _export(world, tmp_path / "logs", lambda t: t.drop_columns(["user_id"]))
    d = _esmm()
    d["features"]["sparse"] = [f for f in d["features"]["sparse"] if f["name"] != "user_id"]
    cfg = parse_config(d)
    report = validate_day(cfg.spec, logs, DAY1, str(tmp_path / "work"))
    assert report.good_rows == 20_000 and "null_id" in report.by_reason  # item_id is still read
    batches = list(day_batches(cfg.spec, logs, [DAY1], 4096, shuffle=(8192, True, [0, 1, 0], "user_id")))
    assert sum(b.num_rows for b in batches) == 20_000  # user runs fall back to single rows


def test_sparse_fill_and_dense_missing_indicator():
    cfg = parse_config(
        {
            "name": "t",
            "labels": {"click": "binary"},
            "features": {
                "sparse": [
                    {"name": "user_id", "hash_size": 1000},
                    {"name": "shop", "hash_size": 1000, "fill": "unknown"},
                    {"name": "tags", "hash_size": 1000, "multi_hot": True, "fill": 7},
                ],
                "dense": [{"name": "price", "fill": 0.0, "missing_indicator": True}],
            },
            "tasks": [{"name": "ctr", "label": "click"}],
            "model": {"arch": "esmm"},
        }
    )
    rb = _batch(
        shop=pa.array(["a", None, "unknown"]),
        tags=pa.array([[1, 2], None, []], pa.list_(pa.int64())),
        price=pa.array([2.0, None, float("nan")], pa.float32()),
    )
    b = BatchConverter(cfg.spec)(rb)
    shop = b.sparse["ebc"]["shop"]
    assert shop.lengths().tolist() == [1, 1, 1] and shop.values()[1] == shop.values()[2]  # null -> "unknown"
    tags = b.sparse["ebc"]["tags"]
    assert tags.lengths().tolist() == [2, 1, 0]  # a null list -> [7]; an empty one stays empty
    assert b.dense.tolist() == [[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]]  # value, then its indicator
    with pytest.raises(ConfigError, match=r"`missing_indicator: true` needs `fill`"):
        parse_config(
            {
                **cfg.model_dump(mode="json"),
                "features": {
                    "sparse": [{"name": "user_id", "hash_size": 10}],
                    "dense": [{"name": "price", "missing_indicator": True}],
                },
            }
        )
    # the indicator adds a weight column: it changes the fingerprint; a fill alone does not
    plain = cfg.model_dump(mode="json")
    plain["features"]["dense"] = [{"name": "price", "fill": 0.0}]
    no_fill = cfg.model_dump(mode="json")
    no_fill["features"]["dense"] = [{"name": "price"}]
    no_fill["features"]["sparse"] = [{**f, "fill": None} for f in no_fill["features"]["sparse"]]
    assert parse_config(plain).fingerprint() == parse_config(no_fill).fingerprint() != cfg.fingerprint()


def test_bad_dense_value_is_quarantined_naming_its_column():
    cfg = parse_config(
        {
            "name": "t",
            "labels": {"click": "binary"},
            "features": {"sparse": [{"name": "user_id", "hash_size": 10}], "dense": [{"name": "price_usd"}]},
            "tasks": [{"name": "ctr", "label": "click"}],
            "model": {"arch": "esmm"},
        }
    )
    split = RowValidator(cfg.spec).split(_batch(price_usd=pa.array([1.0, None, 3.0])))
    assert split.bad.column("reason").to_pylist() == ["bad_feature:price_usd"]


def test_partition_patterns_and_hour_subfolders(world, tmp_path):
    day2 = DAY1 + dt.timedelta(days=1)
    for day in (DAY1, day2):
        src = Path(world) / f"dt={day}"
        for i, f in enumerate(sorted(src.glob("*.parquet"))):
            dst = tmp_path / "logs" / f"dt={day:%Y%m%d}" / f"hour={i:02d}"
            dst.mkdir(parents=True)
            (dst / "part-0.parquet").write_bytes(f.read_bytes())
    (tmp_path / "logs" / f"dt={DAY1:%Y%m%d}" / "_SUCCESS").write_text("")
    root = LogsRoot(str(tmp_path / "logs"), "dt=YYYYMMDD")
    assert list_days(root) == [DAY1, day2]
    files = list_day_files(root, DAY1)
    assert [f.name for f in files] == [f"hour={i:02d}/part-0.parquet" for i in range(4)]
    cfg = load_config("esmm").with_overrides(logs=str(tmp_path / "logs"), workdir=str(tmp_path / "w"))
    with pytest.raises(DataValidationError, match=r"holds no dt=YYYY-MM-DD folder \(set `job.partition`"):
        list_day_files(cfg.job.logs, DAY1)
    d = _esmm()
    d["job"] = {"partition": "dt=YYYYMMDD", "logs": str(tmp_path / "logs"), "workdir": str(tmp_path / "w")}
    cfg = parse_config(d)
    report = validate_day(cfg.spec, cfg.job.logs, DAY1, cfg.job.workdir)
    assert report.good_rows == 20_000 and report.logs.endswith(f"dt={DAY1:%Y%m%d}")
    d["job"]["partition"] = "day=YYYY-MM"
    with pytest.raises(ConfigError, match=r"`job.partition` is 'day=YYYY-MM'; it names one folder per day"):
        parse_config(d)


def test_days_without_logs_are_skipped_only_when_gaps_are_allowed(world, tmp_path, caplog):
    d = _esmm()
    d["job"] = {"logs": world, "workdir": str(tmp_path / "w")}
    cfg = parse_config(d)
    days = [DAY1 + dt.timedelta(days=i) for i in range(5)]  # the world has 3
    assert days_with_logs(cfg, days, "t") == days  # off: unchanged, the checks refuse the missing day
    d["job"]["allow_gaps"] = True
    cfg = parse_config(d)
    with caplog.at_level(logging.INFO, logger="mtrec"):
        assert days_with_logs(cfg, days, "mtrec train") == days[:3]
    assert "mtrec train: no logs for 2026-01-04, 2026-01-05 (2 day(s)): skipped (job.allow_gaps)" in caplog.text
    with pytest.raises(DataValidationError, match=r"no day of 2026-02-01 .. 2026-02-02 has logs"):
        days_with_logs(cfg, [dt.date(2026, 2, 1), dt.date(2026, 2, 2)], "t")


def test_a_nightly_warm_starts_over_days_without_logs(world, tmp_path):
    logs = tmp_path / "logs"
    for day in (DAY1, DAY1 + dt.timedelta(days=2)):  # the day between has no logs
        _export(world, logs, lambda t: t, day=day)
    d = _esmm()
    d["job"] = {"logs": str(logs), "workdir": str(tmp_path / "w")}
    ckpt = tmp_path / "w" / "checkpoints" / "esmm_synth" / f"dt={DAY1}"
    ckpt.mkdir(parents=True)
    (ckpt / "_SUCCESS").write_text("")
    cfg = parse_config(d)
    from mtrec.train import checkpoint

    assert checkpoint.published_days(cfg) == [DAY1]
    third = DAY1 + dt.timedelta(days=2)
    with pytest.raises(Exception, match=r"missing day\(s\) 2026-01-02"):
        plan_nightly(cfg, third)
    d["job"]["allow_gaps"] = True
    days, parent = plan_nightly(parse_config(d), third)
    assert days == [third] and parent.endswith(f"dt={DAY1}")


def test_an_empty_day_is_refused_by_validate_too(world, tmp_path):
    logs = _export(world, tmp_path / "logs", lambda t: t.slice(0, 0))
    with pytest.raises(DataValidationError, match=r"hold no rows .* set `job.allow_gaps: true`"):
        validate_day(load_config("esmm").spec, logs, DAY1, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_contract_view_shares_arrays_and_replaces_a_same_named_column():
    cfg = parse_config(_esmm(columns={"user_id": "uid"}))
    rb = pa.record_batch({"uid": pa.array([5, 6]), "user_id": pa.array([0, 0])})
    out = contract_view(rb, cfg.spec.columns)
    assert out.column("user_id").to_pylist() == [5, 6] and out.column("uid").to_pylist() == [5, 6]
    assert np.shares_memory(out.column("user_id").to_numpy(), rb.column("uid").to_numpy())


def test_a_shallow_tower_learns_a_falling_position_curve_on_5000_rows_with_the_small_data_recipe(tmp_path):
    """docs/training.md "Small logs": 5 passes, dense lr 0.01, batches of 256, a fresh model at p = 0.5
    (`start_at_base_rate: false`). On 5,000 rows in a
    random order the day's own click rates per position are noisy (Spearman -0.69 .. -0.90 over 6
    worlds, bench/position_curve.py); the learned curve falls from the top slot down."""
    from mtrec.data.synth import world_params, write_world
    from mtrec.eval.plots import SHALLOW_TOWER, bias_curve, shallow_tower, spearman
    from mtrec.train.local import train_days

    write_world(
        str(tmp_path),
        days=1,
        rows_per_day=5000,
        seed=0,
        params=world_params(["policy_noise=1000", "policy_boost=0"], None),
    )
    d = load_config("mmoe", logs=str(tmp_path)).model_dump(mode="json")
    d["features"]["bias"] = [f for f in d["features"]["bias"] if f["name"] == "position"]
    d["train"].update(batch_size=256, epochs=5, dense_optimizer={"name": "adam", "lr": 0.01}, start_at_base_rate=False)
    cfg = parse_config(d)
    res = train_days(cfg, [DAY1], epochs=cfg.train.epochs)
    full = {f"model.{k}": v for k, v in res.dmp.state_dict().items() if f"model.{k}".startswith(SHALLOW_TOWER)}
    curve = bias_curve(shallow_tower(cfg.spec, full), cfg.spec.features.bias, 0)
    # measured -0.903 on this world with the example's batch norm (-0.915 without; its own click rates per
    # position: -0.716); one pass at the defaults: -0.648; with start_at_base_rate: -0.846 mean over 6 worlds
    assert spearman(curve) <= -0.9, curve
    assert curve[0] > curve[1] > np.mean(curve[2:4]) > np.mean(curve[4:])


def test_chain_rules_follow_the_tasks_given_structure_under_any_label_names():
    cfg = parse_config(
        {
            "name": "t",
            "labels": {"clicked": "binary", "purchase": "binary"},
            "columns": {"labels": {"purchase": "booking_bool"}},
            "features": {"sparse": [{"name": "item_id", "hash_size": 10}]},
            "tasks": [{"name": "ctr", "label": "clicked"}, {"name": "cvr", "label": "purchase", "given": "ctr"}],
            "model": {"arch": "esmm"},
        }
    )
    rb = pa.record_batch(
        {
            "item_id": pa.array([1, 2, 3]),
            "clicked": pa.array([1, 0, 0], pa.int8()),
            "booking_bool": pa.array([1, 1, 0], pa.int8()),
        }
    )
    split = RowValidator(cfg.spec).split(contract_view(rb, cfg.spec.columns))
    assert split.bad.column("reason").to_pylist() == ["purchase_without_clicked"]
    assert split.good.num_rows == 2 and cfg.train.sampling.label == "clicked"


def test_a_gap_is_a_day_without_rows_never_a_broken_export_or_a_missing_root(world, tmp_path):
    from mtrec.data.validate import day_rows

    logs = tmp_path / "logs"
    _export(world, logs, lambda t: t)  # day 1: 20,000 rows
    (logs / f"dt={DAY1 + dt.timedelta(days=1)}").mkdir()  # a folder, no Parquet file
    _export(world, logs, lambda t: t.slice(0, 0), day=DAY1 + dt.timedelta(days=2))  # files without rows
    assert [day_rows(str(logs), DAY1 + dt.timedelta(days=i)) for i in range(4)] == [20_000, 0, 0, 0]
    with pytest.raises(DataValidationError, match=r"the logs root .*nope does not exist"):
        day_rows(str(tmp_path / "nope"), DAY1)
    (logs / f"dt={DAY1}" / "part-00000.parquet").write_bytes(b"not parquet")
    d = _esmm()
    d["job"] = {"logs": str(logs), "workdir": str(tmp_path / "w"), "allow_gaps": True}
    with pytest.raises(DataValidationError, match=r"part-00000.parquet: not a readable Parquet file"):
        days_with_logs(parse_config(d), [DAY1], "t")  # not skipped as a gap


def test_catch_up_on_a_day_without_logs_trains_up_to_the_newest_day_that_has_them(world, tmp_path):
    from mtrec.jobs.nightly import _catch_up_target

    d = _esmm()
    d["job"] = {"logs": world, "workdir": str(tmp_path / "w"), "allow_gaps": True}
    cfg = parse_config(d)  # the world has logs for days 1-3
    day5 = DAY1 + dt.timedelta(days=4)
    assert _catch_up_target(cfg, day5, [DAY1]) == DAY1 + dt.timedelta(days=2)
    assert _catch_up_target(cfg, day5, [DAY1 + dt.timedelta(days=2)]) is None  # nothing with logs to catch up
