"""Incremental training on real Ray: nightly warm starts, exactness against one uninterrupted
process, resharding, resume after a killed worker or a killed job, idempotence, gaps, backfill.

The model has dropout and a shallow tower with feature dropout, so the per-step seeds matter.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import DAY1
from test_train_eval import small

from mtrec.errors import CheckpointError, ConfigError, DataValidationError, MtrecError
from mtrec.jobs.nightly import plan_nightly, run_backfill, run_nightly
from mtrec.jobs.plan import RunOptions
from mtrec.jobs.retrain import run_train
from mtrec.train import checkpoint as ck
from mtrec.train.local import build_sharded, train_days

DAY2, DAY3, DAY4 = (DAY1 + dt.timedelta(days=i) for i in (1, 2, 3))
TOL = 1e-5
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]  # every test trains on Ray


def inc_cfg(world, workdir, **train):
    cfg = small(world).with_overrides(workdir=str(workdir))
    d = cfg.model_dump(mode="json")
    d["model"]["dropout"] = 0.1
    d["model"]["shallow_tower"] = {"hidden": [8]}
    d["train"].update({"checkpoint_every_batches": 20, **train})
    d["tracking"]["enabled"] = False  # MLflow is tested in test_tracking.py; these jobs test training
    return type(cfg).model_validate(d)


def tree_digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def in_memory_state(cfg, res, tmp_path) -> dict:
    """The full tensors of a local process's model and optimizers (through a DCP save)."""
    url = str(tmp_path / "local-state")
    ck.save(res.dmp, res.optimizer, url, {"model": cfg.name})
    return ck.read_full(url)


def assert_same(a: dict, b: dict, what: str, tol: float = TOL) -> None:
    kinds = {k.split(".")[0] for k in a}
    assert kinds == {"model", "fused_optimizer", "dense_optimizer"}, kinds
    assert any(k.endswith("momentum1") for k in a)  # the tables' row-wise Adagrad state is compared too
    diff, where = ck.max_abs_diff(a, b)
    assert diff <= tol, f"{what}: max abs diff {diff:.2e} at {where}"


@pytest.fixture(scope="module")
def chain(world, tmp_path_factory):
    """Days 1 and 2 as two nightly jobs (1 worker): backfill with a cold start."""
    cfg = inc_cfg(world, tmp_path_factory.mktemp("chain"))
    summaries = run_backfill(cfg, DAY1, DAY2, RunOptions(cold_start=True))
    return cfg, summaries


@pytest.fixture(scope="module")
def continuous(chain, tmp_path_factory):
    """Days 1 and 2 trained in one process, no checkpoint in between."""
    cfg, _ = chain
    first = train_days(cfg, [DAY1])
    second = train_days(cfg, [DAY2], dmp=first.dmp, optimizer=first.optimizer)
    return in_memory_state(cfg, second, tmp_path_factory.mktemp("continuous"))


def test_warm_started_day_matches_one_uninterrupted_process(chain, continuous):
    cfg, summaries = chain
    assert [s.kind for s in summaries] == ["nightly", "nightly"]
    assert summaries[0].parent is None and summaries[1].parent == ck.checkpoint_url(cfg, DAY1)
    man = ck.read_manifest(ck.checkpoint_url(cfg, DAY2))
    assert man["parent"] == ck.checkpoint_url(cfg, DAY1) and man["rows_trained"] == summaries[1].expected_rows == 20_000
    assert man["parent_date"] == str(DAY1) and 0 < man["metrics"]["train_loss_last_window"] < 1
    assert 0 < man["metrics"]["train_loss_first_tenth"] < 1 and 0 < man["metrics"]["train_loss_last_tenth"] < 1
    assert_same(ck.read_full(ck.checkpoint_url(cfg, DAY2)), continuous, "day 1 -> checkpoint -> day 2 vs continuous")
    root = Path(ck.checkpoint_root(cfg))
    assert not any((root / "_partial").rglob("*")) and not any(
        (root / "_staging").rglob("*")
    )  # cleaned after publishing


def test_published_day_is_a_noop_and_gaps_are_refused(chain, tmp_path, progress):
    cfg, _ = chain
    before = tree_digest(ck.checkpoint_root(cfg))
    (s,) = run_nightly(cfg, DAY2)
    assert s.skipped and "already published; nothing to do" in progress()[0]
    assert tree_digest(ck.checkpoint_root(cfg)) == before  # not one byte (or mtime) changed

    gap = inc_cfg(cfg.job.logs, tmp_path)
    shutil.copytree(ck.checkpoint_url(cfg, DAY1), ck.checkpoint_url(gap, DAY1))
    with pytest.raises(
        CheckpointError, match=r"missing day\(s\) 2026-01-02: .* newest before 2026-01-03 is dt=2026-01-01.*--catch-up"
    ):
        run_nightly(gap, DAY3)
    assert plan_nightly(gap, DAY3, catch_up=True) == ([DAY2, DAY3], ck.checkpoint_url(gap, DAY1))
    with pytest.raises(CheckpointError, match="no published checkpoint of esmm_synth before 2026-01-01.*--cold-start"):
        run_nightly(inc_cfg(cfg.job.logs, tmp_path / "empty"), DAY1)
    with pytest.raises(ConfigError, match="--cold-start and --catch-up contradict"):
        run_nightly(gap, DAY3, RunOptions(cold_start=True, catch_up=True))
    faster = gap.with_train(batch_size=512)
    with pytest.raises(
        CheckpointError, match=r"other training settings \(train.batch_size: 256 -> 512\); pass --allow-config-change"
    ):
        run_nightly(faster, DAY2)
    assert plan_nightly(faster, DAY2) == ([DAY2], ck.checkpoint_url(gap, DAY1))


def test_killed_job_resumes_and_killed_worker_restarts_to_the_same_model(chain, continuous, monkeypatch):
    """A job whose worker dies with no restart left fails and publishes nothing; its rerun resumes
    from the intra-day checkpoint, loses its worker again, Ray Train restarts it from a newer one.
    The result equals the uninterrupted run."""
    cfg, _ = chain
    published = tree_digest(ck.checkpoint_url(cfg, DAY2))
    monkeypatch.setenv("MTREC_KILL_WORKER", "0:30")  # after 30 batches: the step-20 checkpoint exists
    with pytest.raises(
        MtrecError, match=r"worker 0 .*died.*nothing was published.*resumes from .*step-00000020\.\S+ \(step 20\)"
    ):
        run_nightly(cfg.with_train(max_failures=0), DAY2, RunOptions(force=True))
    assert (
        tree_digest(ck.checkpoint_url(cfg, DAY2)) == published
    )  # --force keeps the old one until the new one is complete
    monkeypatch.setenv("MTREC_KILL_WORKER", "0:25")  # resumed at step 20: dies at step 45, restarts from step 40
    (s,) = run_nightly(cfg.with_train(max_failures=1), DAY2, RunOptions(force=True))
    assert (s.resumed["step"], s.resumed["rows"], s.restarts) == (20, 20 * 256, 1)
    assert "/_partial/dt=2026-01-02/step-00000020." in s.resumed["checkpoint"]
    man = ck.read_manifest(ck.checkpoint_url(cfg, DAY2))
    assert man["rows_trained"] == 20_000 and man["resumed_at_step"] == 40 and man["steps"] == 78
    # bit-identical: the resumed stream replays the shuffle and skips exactly the trained rows
    full = ck.read_full(ck.checkpoint_url(cfg, DAY2))
    assert_same(full, continuous, "killed twice, resumed twice vs continuous", tol=0.0)


def test_two_worker_checkpoint_warm_starts_one_worker(world, tmp_path):
    """Day 1 on 2 workers (column_wise), day 2 on 1 worker (table_wise): DCP reshards exactly, and
    day 2 equals a process that takes the day-1 state and trains day 2 without a checkpoint."""
    cfg = inc_cfg(world, tmp_path / "work", num_workers=2, cpus_per_worker=1, sharding_types=["column_wise"])
    run_train(cfg, DAY1, DAY1)
    day1 = ck.checkpoint_url(cfg, DAY1)
    assert ck.read_manifest(day1)["world_size"] == 2
    one = cfg.with_train(num_workers=1, sharding_types=["table_wise"])

    dmp, opt = build_sharded(one)
    ck.load(dmp, opt, day1, one)
    saved_again = str(tmp_path / "resaved")
    ck.save(dmp, opt, saved_again, {"model": cfg.name})
    assert ck.max_abs_diff(ck.read_full(day1), ck.read_full(saved_again))[0] == 0.0  # 2 ranks -> 1 rank: lossless
    reference = in_memory_state(one, train_days(one, [DAY2], dmp=dmp, optimizer=opt), tmp_path)

    (s,) = run_nightly(one, DAY2)
    assert s.world_size == 1 and {t["sharding_type"] for t in s.plan.values()} == {"table_wise"}
    assert_same(ck.read_full(ck.checkpoint_url(one, DAY2)), reference, "2-worker day 1 -> 1-worker day 2")


def test_backfill_checks_its_range_first_and_skips_published_days(chain, progress):
    cfg, _ = chain
    # a day of the range without logs: refused before Ray starts, nothing trained
    with pytest.raises(
        DataValidationError, match=r"^no logs for 2026-01-04 under .*days present: 2026-01-01 \.\. 2026-01-03"
    ):
        run_backfill(cfg, DAY1, DAY4, RunOptions(cold_start=True))
    assert ck.published_days(cfg) == [DAY1, DAY2]
    # the rerun of a `--cold-start` backfill continues from the last published day, it does not start over
    run_backfill(cfg, DAY1, DAY3, RunOptions(cold_start=True))
    assert "already published, skipped: 2026-01-01, 2026-01-02" in progress()
    assert ck.published_days(cfg) == [DAY1, DAY2, DAY3]
    assert ck.read_manifest(ck.checkpoint_url(cfg, DAY3))["parent"] == ck.checkpoint_url(cfg, DAY2)
    assert json.loads(Path(ck.checkpoint_url(cfg, DAY3), "manifest.json").read_text())["kind"] == "nightly"


@pytest.mark.integration
def test_a_killed_nightly_process_leaves_nothing_published_and_the_next_run_resumes(chain, tmp_path, progress):
    """The whole `mtrec nightly` process tree (driver, its local Ray cluster, the workers) is
    SIGKILLed mid-day: no `_SUCCESS`, and the next run resumes from the intra-day checkpoint and
    publishes every row once. (The run changes the batch size: --allow-config-change end to end.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    cfg, _ = chain
    here = inc_cfg(cfg.job.logs, tmp_path / "work", batch_size=64)
    shutil.copytree(ck.checkpoint_url(cfg, DAY1), ck.checkpoint_url(here, DAY1))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(here.model_dump(mode="json")))
    cmd = [
        sys.executable,
        "-m",
        "mtrec.cli",
        "nightly",
        "--config",
        str(path),
        "--date",
        str(DAY2),
        "--allow-config-change",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MTREC_KILL_WORKER")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    partial = Path(ck.partial_root(here, DAY2))
    deadline = time.time() + 240
    try:
        while not any(partial.glob("step-*/_SUCCESS")):
            assert proc.poll() is None and time.time() < deadline, "the job ended before its first intra-day checkpoint"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ck.published_days(here) == [DAY1]
    with pytest.raises(CheckpointError, match="allow-config-change"):  # the flag is needed again: nothing was published
        run_nightly(here, DAY2)
    (s,) = run_nightly(here, DAY2, RunOptions(allow_config_change=True))
    # the workers resume from the newest intra-day checkpoint: a straggling worker of the killed
    # process may have written one after the driver died (in its own folder: step-N.<run>)
    assert s.resumed and s.resumed["step"] >= 20 and s.resumed["rows"] == s.resumed["step"] * 64
    assert any(ln.startswith("resuming from intra-day checkpoint") for ln in progress())
    man = ck.read_manifest(ck.checkpoint_url(here, DAY2))
    assert man["rows_trained"] == 20_000 and man["resumed_at_step"] == s.resumed["step"] and s.restarts == 0
    assert not partial.exists()  # the day's intra-day checkpoints go once it is published


def test_an_empty_day_is_refused_not_published(chain, tmp_path):
    import pyarrow.parquet as pq

    cfg, _ = chain
    logs = tmp_path / "logs"
    shutil.copytree(Path(cfg.job.logs) / f"dt={DAY1}", logs / f"dt={DAY1}")
    (logs / f"dt={DAY2}").mkdir()
    table = pq.read_table(next((logs / f"dt={DAY1}").glob("*.parquet")))
    pq.write_table(table.slice(0, 0), logs / f"dt={DAY2}" / "part-0.parquet")
    here = inc_cfg(str(logs), tmp_path / "work")
    shutil.copytree(ck.checkpoint_url(cfg, DAY1), ck.checkpoint_url(here, DAY1))
    with pytest.raises(DataValidationError, match=r"^the logs of 2026-01-02 hold no rows .*re-export the day"):
        run_nightly(here, DAY2)
    assert ck.published_days(here) == [DAY1]
