"""`mtrec train` on Ray: Ray Data -> Ray Train workers -> DistributedModelParallel.

In-process tests share the session's local Ray cluster; tests/test_cluster.py runs `mtrec train`
and `mtrec nightly` on a real two-node cluster started with `ray start`, through `mtrec submit`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DAY1

from mtrec.config import load_config
from mtrec.data.synth import write_world
from mtrec.errors import MtrecError
from mtrec.jobs.evaluate import evaluate_checkpoint
from mtrec.jobs.plan import RunOptions
from mtrec.jobs.protocol import worker_failure
from mtrec.jobs.retrain import run_train

DAY2 = DAY1 + dt.timedelta(days=1)
ROWS = 6_001  # per day, 3 files: shares of the stream cannot be equal


def small_config(logs: str, workdir: str, workers: int = 2, **train):
    cfg = load_config("esmm", logs=logs, workdir=workdir).model_dump(mode="json")
    cfg["train"].update(batch_size=256, num_workers=workers, **train)
    # a few thousand rows: the small-logs setting (docs/training.md); BatchNorm would also normalise
    # each worker's own batch, a real difference between 1 and 2 workers that the tests here do not measure
    cfg["model"]["batch_norm"] = False
    cfg["tracking"]["enabled"] = False  # MLflow is tested in test_tracking.py; these jobs test training
    for f in cfg["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 20_000)
    return type(load_config("esmm")).model_validate(cfg)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> tuple[str, int]:
    """2 days x 6,001 rows in 3 files per day, 7 rows of day 1 breaking the label chain."""
    root = tmp_path_factory.mktemp("ray-world")
    write_world(str(root), days=2, rows_per_day=ROWS, seed=11, files_per_day=3)
    f = root / f"dt={DAY1}" / "part-00001.parquet"
    t = pq.read_table(f)
    conv = t.column("conversion").to_numpy().copy()
    no_click = np.flatnonzero(t.column("click").to_numpy() == 0)[:7]
    conv[no_click] = 1  # conversion without click: quarantined, never trained
    pq.write_table(t.set_column(t.schema.get_field_index("conversion"), "conversion", pa.array(conv, pa.int8())), f)
    return str(root), 7


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "file-order"])
def test_two_workers_train_every_good_row_exactly_once(ray_local, small_world, tmp_path, progress, shuffle):
    logs, bad = small_world
    order = {} if shuffle else {"shuffle": {"buffer_rows": 0, "files": False}}
    # from p = 0.5, not the click rate: the first progress window's loss is then the untrained model's
    cfg = small_config(logs, str(tmp_path / "work"), start_at_base_rate=False, **order)
    s = run_train(cfg, DAY1, DAY2, RunOptions(log_every=5))
    assert s.input_rows == 2 * ROWS and s.quarantined_rows == bad
    assert s.rows == s.expected_rows == 2 * ROWS - bad  # summed per worker, checked by the job too
    rows = [w["rows"] for w in s.workers]
    assert len(rows) == 2 and min(rows) > 0
    assert len({w["pid"] for w in s.workers}) == 2
    # lockstep: every rank took the same steps; a rank whose share ran out padded (no row twice)
    steps = {w["steps"] for w in s.workers}
    assert steps == {max(w["batches"] for w in s.workers)}
    assert all(w["batches"] + w["pad_steps"] == w["steps"] for w in s.workers)
    # both workers hold embedding shards (table_wise over 2 ranks)
    assert {r for t in s.plan.values() for r in t["ranks"]} == {0, 1}
    assert all(t["sharding_type"] == "table_wise" for t in s.plan.values())
    # the loss fell (mean batch loss of the first progress window vs the last)
    assert s.progress[-1]["loss"] < 0.7 * s.progress[0]["loss"]
    assert s.progress[-1]["rows"] == rows
    assert any(line.startswith("  step ") and "rows/s" in line for line in progress())
    assert s.ray["mode"] == "existing"
    # published only after the row check: manifest written by rank 0, shards by both ranks
    m = json.loads(Path(s.checkpoint, "manifest.json").read_text())
    assert Path(s.checkpoint, "_SUCCESS").exists() and s.checkpoint.endswith(f"dt={DAY2}")
    assert m["rows_trained"] == s.rows and m["rows_per_worker"] == rows and m["world_size"] == 2
    assert m["quarantined_rows"] == bad and len(m["files"]) == 6 and m["kind"] == "full_retrain"
    assert sorted(p.name for p in Path(s.checkpoint).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_world_size_1_and_2_reach_the_same_quality(ray_local, world, tmp_path):
    """Same data (days 1-2) and the same global batch (512 rows: 1 x 512 vs 2 x 256, so the same
    number of dense steps), 1 vs 2 workers; the 2-worker checkpoint loads resharded at world size
    1 for scoring; next-day AUCs agree within 0.01. Rows in file order: each rank shuffles with
    its own seed, so with the shuffle on the two runs would also differ in row order, whose effect
    on this small world's CTCVR AUC alone is ~0.02 (measured: 0.6035 vs 0.5842)."""
    day3 = DAY1 + dt.timedelta(days=2)
    metrics = {}
    for workers in (1, 2):
        # both from p = 0.5: the base-rate start reads the first step's rows, which are other rows at 1
        # and 2 workers (measured with it: ctr AUC 0.5883 vs 0.5998 on this 40,000-row world)
        cfg = small_config(
            world,
            str(tmp_path / f"w{workers}"),
            workers=workers,
            shuffle={"buffer_rows": 0, "files": False},
            start_at_base_rate=False,
        ).with_train(batch_size=512 // workers)
        run_train(cfg, DAY1, DAY2)
        metrics[workers], url, manifest = evaluate_checkpoint(cfg, day3)
        assert manifest["world_size"] == workers and url.endswith(f"dt={DAY2}")
    for key in ("ctr/auc", "ctcvr/auc"):
        assert abs(metrics[1][key] - metrics[2][key]) < 0.01, (key, metrics[1][key], metrics[2][key])
    assert min(metrics[1]["ctr/auc"], metrics[2]["ctr/auc"]) > 0.53, metrics  # learned (untrained: ~0.50)


@pytest.mark.slow
def test_a_killed_worker_fails_the_job_naming_it(ray_local, small_world, tmp_path, monkeypatch):
    logs, _ = small_world
    monkeypatch.setenv("MTREC_KILL_WORKER", "1:3")
    with pytest.raises(
        MtrecError, match=r"^training failed: worker 1 \(node \S+, pid \d+\) died: .*nothing was published"
    ):
        run_train(small_config(logs, str(tmp_path / "work")).with_train(max_failures=0), DAY1, DAY1)


def test_worker_failure_message():
    from ray.train import WorkerGroupError

    err = WorkerGroupError("boom", {1: RuntimeError("CUDA out of memory\nlong trace")})
    msg = str(worker_failure(err, {1: {"node": "10.0.0.7", "pid": 42}}))
    assert msg.startswith("training failed: worker 1 (node 10.0.0.7, pid 42): RuntimeError: CUDA out of memory;")
    mine = MtrecError("bad thing; fix it")
    assert worker_failure(WorkerGroupError("x", {0: mine}), {}) is mine


def test_date_range_is_checked(cfg):
    with pytest.raises(MtrecError, match="--to 2026-01-01 is before --from 2026-01-02"):
        run_train(cfg, DAY2, DAY1)
