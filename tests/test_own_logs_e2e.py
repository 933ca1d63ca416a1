"""Two real-shaped exports, run as a new user would: `mtrec import` and the config's mapping, no
conversion code, through validate -> train -> nightly -> evaluate -> predict.

- A hotel-search log: Parquet in dt=YYYYMMDD/hour=HH/ folders, its own column names, string ids,
  slots counted from 1, a booking label called `purchase`, NULL prices, and a day without logs.
- A bandit log: one CSV with epoch timestamps, click only, no position, no user id.

The exports are made from the synthetic world below: that is the user's data, not a conversion.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from mtrec.cli import main
from mtrec.data.synth import write_world

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

D1 = dt.date(2026, 4, 1)
DAYS = [D1 + dt.timedelta(days=i) for i in range(4)]
ROWS = 4_000


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    write_world(str(root), days=4, rows_per_day=ROWS, seed=11, start=D1, files_per_day=4)
    return root


def _day(source: Path, day: dt.date) -> list[pa.Table]:
    return [pq.read_table(f) for f in sorted((source / f"dt={day}").glob("*.parquet"))]


def _hotel(t: pa.Table) -> pa.Table:
    """The hotel site's export of one file: its names, string ids, slots from 1, NULL prices."""
    price = t.column("item_price").to_numpy().copy()
    price[::17] = np.nan
    cols = {
        "srch_uid": pc.binary_join_element_wise("u", pc.cast(t.column("user_id"), pa.string()), ""),
        "prop_id": pc.binary_join_element_wise("p", pc.cast(t.column("item_id"), pa.string()), ""),
        "srch_rank": pc.add(t.column("position"), 1),
        "click_bool": t.column("click"),
        "booking_bool": t.column("conversion"),
        "prop_category": t.column("item_category"),
        "price_usd": pa.array(price, mask=np.isnan(price)),
        "device": t.column("device"),
    }
    return pa.table(cols)


def _cli(*args: str) -> int:
    return main(list(args))


def _config(path: Path, d: dict) -> str:
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_hotel_search_log_mapped_1_based_with_a_gap(source, tmp_path, capsys):
    logs = tmp_path / "hotel"
    for day in (DAYS[0], DAYS[1], DAYS[3]):  # the third day has no logs
        for hour, t in enumerate(_day(source, day)):
            folder = logs / f"dt={day:%Y%m%d}" / f"hour={hour:02d}"
            folder.mkdir(parents=True)
            pq.write_table(_hotel(t), folder / "part-0.parquet")
    cfg = _config(
        tmp_path / "hotel.yaml",
        {
            "name": "hotel",
            "labels": {"click": "binary", "purchase": "binary"},
            "columns": {
                "user_id": "srch_uid",
                "item_id": "prop_id",
                "position": "srch_rank",
                "position_base": 1,
                "labels": {"click": "click_bool", "purchase": "booking_bool"},
            },
            "features": {
                "sparse": [
                    {"name": "user_id", "hash_size": 4096, "dim": 8},
                    {"name": "item_id", "hash_size": 4096, "dim": 8},
                    {"name": "category", "column": "prop_category", "hash_size": 128, "dim": 8},
                ],
                "dense": [
                    {"name": "price", "column": "price_usd", "log1p": True, "fill": 0.0, "missing_indicator": True}
                ],
                "bias": [{"name": "position", "num_values": 10}, {"name": "device", "num_values": 2}],
            },
            "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "purchase", "given": "ctr"}],
            "model": {
                "arch": "mmoe",
                "num_experts": 2,
                "expert": [32],
                "tower": [16],
                "shallow_tower": {"hidden": [8]},
            },
            "train": {"batch_size": 256, "cpus_per_worker": 0.5},
            "job": {
                "logs": str(logs),
                "workdir": str(tmp_path / "work"),
                "partition": "dt=YYYYMMDD",
                "allow_gaps": True,
            },
        },
    )
    assert _cli("validate", "--config", cfg, "--date", str(DAYS[0])) == 0
    assert _cli("train", "--config", cfg, "--from", str(DAYS[0]), "--to", str(DAYS[1])) == 0
    assert _cli("nightly", "--config", cfg, "--date", str(DAYS[2])) == 0  # no logs: nothing to do
    assert _cli("nightly", "--config", cfg, "--date", str(DAYS[3])) == 0  # warm start over the quiet day
    err = capsys.readouterr().err
    assert f"no logs for {DAYS[2]}: nothing to train (job.allow_gaps)" in err
    assert f"no logs for {DAYS[2]}: skipped (job.allow_gaps); {DAYS[3]} warm-starts from dt={DAYS[1]}" in err
    assert (tmp_path / "work" / "checkpoints" / "hotel" / f"dt={DAYS[3]}" / "_SUCCESS").exists()

    assert _cli("evaluate", "--config", cfg, "--from", str(DAYS[2]), "--to", str(DAYS[3]), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["days"] == [str(DAYS[3])] and doc["checkpoint"].endswith(f"dt={DAYS[1]}")
    print(doc["metrics"])
    assert doc["metrics"]["ctr/rows"] == ROWS and 0 < doc["metrics"]["ctr/auc"] < 1

    out = tmp_path / "pred.parquet"
    assert (
        _cli("predict", "--config", cfg, "--date", str(DAYS[3]), "--model", "models:/hotel/2", "--out", str(out)) == 0
    )
    pred = pq.read_table(out)
    assert pred.num_rows == ROWS and {"ctr", "cvr", "ctr_cvr"} <= set(pred.column_names)


def test_click_only_csv_without_position_or_user(source, tmp_path, capsys):
    parts = []
    for day in DAYS[:3]:
        t = pa.concat_tables(_day(source, day))
        ts = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
        parts.append(
            pa.table(
                {
                    "ts": pa.array(np.full(t.num_rows, ts + 3600), pa.int64()),
                    "offer": pc.binary_join_element_wise("o", pc.cast(t.column("item_id"), pa.string()), ""),
                    "segment": t.column("user_segment"),
                    "category": t.column("item_category"),
                    "clicked": t.column("click"),
                }
            )
        )
    csv = tmp_path / "bandit.csv"
    pacsv.write_csv(pa.concat_tables(parts), csv)
    logs = tmp_path / "bandit"
    assert _cli("import", str(csv), "--out", str(logs), "--day-column", "ts") == 0
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("dt=")) == [f"dt={d}" for d in DAYS[:3]]
    cfg = _config(
        tmp_path / "bandit.yaml",
        {
            "name": "bandit",
            "labels": {"click": "binary"},
            "columns": {"item_id": "offer", "labels": {"click": "clicked"}},
            "features": {
                "sparse": [
                    {"name": "item_id", "hash_size": 4096, "dim": 8},
                    {"name": "segment", "hash_size": 64, "dim": 4},
                    {"name": "category", "hash_size": 128, "dim": 8},
                ]
            },
            "tasks": [{"name": "ctr", "label": "click"}],
            "model": {"arch": "shared_bottom", "bottom": [32], "tower": [16]},
            "train": {"batch_size": 256, "cpus_per_worker": 0.5},
            "job": {"logs": str(logs), "workdir": str(tmp_path / "work")},
        },
    )
    assert _cli("validate", "--config", cfg, "--date", str(DAYS[0])) == 0
    assert _cli("train", "--config", cfg, "--from", str(DAYS[0]), "--to", str(DAYS[1])) == 0
    assert _cli("nightly", "--config", cfg, "--date", str(DAYS[2])) == 0
    capsys.readouterr()
    assert _cli("evaluate", "--config", cfg, "--date", str(DAYS[2]), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    print(doc["metrics"])
    assert doc["metrics"]["ctr/rows"] == ROWS and "ctr/gauc" not in doc["metrics"]  # no user id: no GAUC
    out = tmp_path / "pred.parquet"
    assert (
        _cli("predict", "--config", cfg, "--date", str(DAYS[2]), "--model", "models:/bandit/2", "--out", str(out)) == 0
    )
    assert pq.read_table(out).num_rows == ROWS
