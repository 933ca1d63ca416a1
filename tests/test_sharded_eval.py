"""Scoring where the model lives: the figures a job records come from its Ray Train workers
(the tables sharded, rows split across the workers, merged on rank 0), and equal what one process
computes with the whole model, at world size 1 and 2, on one day and on days pooled."""

from __future__ import annotations

import datetime as dt
import math

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from conftest import DAY1, without_floors

from mtrec import bn
from mtrec.config import load_config
from mtrec.errors import ConfigError, GateRefused
from mtrec.eval.evaluate import evaluate_days
from mtrec.eval.sharded import Moments, Scored, ShardFailed, failure_line, lockstep, merge, score_shard, with_truth
from mtrec.jobs.evaluate import score_checkpoint
from mtrec.jobs.predict import predict_on_workers, predict_to_parquet
from mtrec.jobs.retrain import run_train
from mtrec.models import build_model
from mtrec.serving import ServedModel
from mtrec.tracking import Tracker, promote
from mtrec.tracking.gate import gate_slice

DAY2 = DAY1 + dt.timedelta(days=1)
DAY3 = DAY1 + dt.timedelta(days=2)


def bn_config(world: str, workdir: str, workers: int = 1):
    d = load_config("esmm", logs=world, workdir=workdir).model_dump(mode="json")
    d["model"].update(batch_norm=True, tower=[16, 8])
    d["train"].update(num_workers=workers, batch_size=512)
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 5000)
    return type(load_config("esmm")).model_validate(without_floors(d))


def assert_same(got: dict[str, float], want: dict[str, float], what: str, tol: float = 1e-6) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    for k, v in want.items():
        same = (math.isnan(v) and math.isnan(got[k])) or abs(got[k] - v) <= tol
        assert same, (what, k, got[k], v)


@pytest.mark.slow
def test_the_workers_figures_equal_one_process_at_world_size_1_and_2(ray_local, world, tmp_path):
    """A job trains day 1 at one worker and records its evaluation of day 2 and its BN check,
    both made on the worker; the published checkpoint is then scored by 2 workers (sharded, rows
    split) and by this process with the whole model (the single-process path). Every metric the
    job records, eval/... and bn/..., agrees within 1e-6; pooled days 2-3 too (truth joined per
    day)."""
    cfg = bn_config(world, str(tmp_path / "work"))
    s = run_train(cfg, DAY1, DAY1)
    run = mlflow.MlflowClient(s.mlflow["uri"]).get_run(s.mlflow["run_id"])
    job = {k.removeprefix("eval/"): v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    job_bn = {k: v for k, v in run.data.metrics.items() if k.startswith("bn/")}
    assert job and job_bn and "ctr/auc_unbiased" in job and "ctr/gauc" in job

    served = ServedModel.from_checkpoint(s.checkpoint)
    one = evaluate_days(served.model, served.spec, world, [DAY2])
    one_bn = bn.check(served.model, served.spec, world, DAY2, cfg.bn).metrics()
    assert_same(job, one, "the job (1 worker) vs one process")
    assert_same(job_bn, one_bn, "the job's BN check vs one process", tol=1e-6)

    two, figures, manifest = score_checkpoint(cfg.with_train(num_workers=2), [DAY2], s.checkpoint, bn_check=True)
    assert figures["rows"] == 20_000 and manifest["world_size"] == 1
    assert_same(two, one, "2 workers vs one process")
    assert_same(figures["bn"].metrics(), one_bn, "2 workers' BN check vs one process")

    pooled, figures, _ = score_checkpoint(cfg.with_train(num_workers=2), [DAY2, DAY3], s.checkpoint)
    assert figures["rows"] == 40_000
    assert_same(pooled, evaluate_days(served.model, served.spec, world, [DAY2, DAY3]), "days 2-3 pooled")

    try:  # the gate at 2 workers scores the version's checkpoint sharded; its figures go to the run as gate/...
        decision = promote(cfg.with_train(num_workers=2))
    except GateRefused as e:
        decision = e
    run = mlflow.MlflowClient(s.mlflow["uri"]).get_run(s.mlflow["run_id"])
    gate = {k.removeprefix("gate/"): v for k, v in run.data.metrics.items() if k.startswith("gate/")}
    days = gate_slice(cfg, Tracker(cfg).alias("challenger"))
    assert_same(gate, evaluate_days(served.model, served.spec, world, days), f"the gate at 2 workers ({decision})")

    # batch scoring: 2 workers, the checkpoint sharded, parts written by each worker, as the pyfunc scores
    uri = "models:/esmm_synth@challenger"
    out = predict_on_workers(cfg.with_train(num_workers=2), uri, DAY2, str(tmp_path / "scores"))
    one = pq.read_table(predict_to_parquet(uri, world, DAY2, str(tmp_path / "one.parquet"))["out"])
    parts = pq.read_table(str(tmp_path / "scores"))
    assert out["rows"] == parts.num_rows == one.num_rows == 20_000 and out["parts"] == 2
    assert (tmp_path / "scores" / "_SUCCESS").exists() and parts.column_names == one.column_names
    parts, one = parts.sort_by("row_id"), one.sort_by("row_id")
    assert parts.column("row_id").equals(one.column("row_id"))
    for k in ("ctr", "cvr", "ctcvr"):
        assert np.abs(parts.column(k).to_numpy() - one.column(k).to_numpy()).max() < 1e-6, k
    # a folder that is not an earlier output (no _SUCCESS), or a file, is refused and left as it was
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file.parquet").write_text("keep")
    for taken in ("mine", "file.parquet"):
        with pytest.raises(ConfigError, match=r"is not an earlier output of mtrec predict --workers.*new or empty"):
            predict_on_workers(cfg.with_train(num_workers=2), uri, DAY2, str(tmp_path / taken))
    assert (tmp_path / "mine" / "notes.txt").read_text() == (tmp_path / "file.parquet").read_text() == "keep"


def test_merge_at_world_size_1_is_the_rank_itself_and_moments_add_up():
    m = Moments(2)
    m.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    other = Moments(2)
    other.add(torch.tensor([[5.0, 6.0]]))
    m.merge(other)
    mean, var = m.mean_var()
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert m.n == 3 and np.allclose(mean, x.mean(0)) and np.allclose(var, x.var(0))
    assert not dist.is_initialized() or dist.get_world_size() == 1  # other tests may init a 1-rank group
    mine = Scored(rows=3, moments={"l": m})
    assert merge(mine) is mine


def test_a_rank_with_no_rows_scores_nothing_and_keeps_the_output_keys(world):
    """A rank whose share is empty (more workers than files) returns empty arrays, which the
    merge leaves out."""
    from mtrec.models import build_model

    cfg = bn_config(world, "/tmp/unused")
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    scored = score_shard(model, cfg.spec, iter(()), bn.served_bn_names(model))
    assert scored.rows == 0 and scored.head is None and all(m.n == 0 for m in scored.moments.values())
    assert all(len(v) == 0 for v in scored.predictions.labels.values())
    pred, aligned = with_truth(world, scored, [DAY2, DAY3], [0, 1])
    assert aligned is None and pred is scored.predictions


@pytest.mark.slow
def test_bn_check_and_recalibration_on_workers_equal_one_process(ray_local, world, tmp_path):
    """`mtrec bn-check` on 2 workers (the checkpoint sharded, moments summed across ranks) gives
    the one-process check; `--recalibrate` on 2 workers sets the statistics one process sets
    (exact, layer by layer), registers a version whose pyfunc (built by a Ray task from the
    checkpoint and those statistics) holds them, and workers that score that version apply them:
    the same metrics as its pyfunc."""
    from mtrec.jobs.bn_check import run_bn_check
    from mtrec.tracking import load_served
    from mtrec.tracking.gate import version_bn_stats

    cfg = bn_config(world, str(tmp_path / "work"))
    s = run_train(cfg, DAY1, DAY1)
    two = cfg.with_train(num_workers=2)
    one = run_bn_check(cfg, DAY2, url=s.checkpoint)
    got = run_bn_check(two, DAY2, url=s.checkpoint)
    assert got.before.rows == one.before.rows == 20_000 and got.before.layers
    assert_same(got.before.metrics(), one.before.metrics(), "the check on 2 workers vs one process")

    rec = run_bn_check(two, DAY2, model_uri="models:/esmm_synth/1", recalibrate=True)
    assert rec.version == "2" and rec.after.passed
    assert max(lc.smd_max for lc in rec.after.layers) < 1e-5  # the slice's own statistics: no drift left
    served = ServedModel.from_checkpoint(s.checkpoint)
    bn.recalibrate(served.model, served.spec, world, DAY2)
    want = bn.capture(served.model)
    version = Tracker(cfg).version(rec.version)
    assert version.tags["mtrec.bn_recalibrated_on"] == str(DAY2) and version.checkpoint == s.checkpoint
    stats = version_bn_stats(cfg, version)
    pyfunc = load_served(f"models:/esmm_synth/{rec.version}")
    assert set(stats) == set(want) == set(bn.capture(pyfunc.model))
    for name, w in want.items():
        for key in ("running_mean", "running_var"):
            for what, have in (("workers", stats[name][key]), ("pyfunc", bn.capture(pyfunc.model)[name][key])):
                diff = np.abs(np.array(have) - np.array(w[key])).max()
                assert diff < 1e-6 * max(1.0, np.abs(w[key]).max()), (what, name, key, diff)

    metrics, _, _ = score_checkpoint(two, [DAY3], s.checkpoint, bn_stats=stats)
    assert_same(metrics, evaluate_days(pyfunc.model, pyfunc.spec, world, [DAY3]), "the recalibrated version")


def _lockstep_rank(rank: int, store: str, logs: str, out: str) -> None:
    """One rank of a 2-process gloo group: rank 0 has 4 batches, rank 1's read fails after 1."""
    import json

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = bn_config(logs, "/tmp/unused")
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    batches = list(bn.serving_batches(cfg.spec, logs, DAY1, 1000))[:4]

    def mine():
        if rank == 0:
            yield from batches
        else:
            yield batches[0]
            raise OSError("the file went away")

    seen = []
    try:
        lockstep(model, cfg.spec, mine(), lambda rb, _: seen.append(rb.num_rows))
        got = {"raised": False}
    except ShardFailed as e:
        got = {"raised": True, "local": e.local, "line": failure_line(e), "seen": len(seen)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    dist.destroy_process_group()


def test_a_rank_whose_read_fails_stops_every_rank_at_the_same_step(world, tmp_path):
    """Lockstep on 2 ranks: rank 1's read raises after its first batch; both ranks raise
    ShardFailed at the next step (no rank left waiting in a collective), and rank 0 gets the
    failed rank's error as one line."""
    import json

    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_lockstep_rank, args=(r, str(tmp_path / "store"), world, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]  # None: a rank still waiting in a collective
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    got = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in (0, 1)]
    assert got[0] == {"raised": True, "local": False, "line": "worker 1: OSError: the file went away", "seen": 1}
    assert got[1] == {"raised": True, "local": True, "line": None, "seen": 1}


@pytest.mark.slow
def test_an_evaluation_read_that_fails_after_training_fails_the_job_without_retraining(ray_local, tmp_path):
    """Day 1 trained on 2 workers; a day-2 file whose footer reads but whose pages do not (the
    plan checks footers only) breaks the workers' next-day evaluation on one rank. Every rank
    stops at the same step, and the job fails in one line naming the worker and the error: the
    worker group is not restarted to retrain the day, and nothing is published."""
    from mtrec.data.synth import write_world
    from mtrec.errors import MtrecError
    from mtrec.train import checkpoint

    logs = str(tmp_path / "logs")
    write_world(logs, days=2, rows_per_day=4000, seed=5, files_per_day=2)
    broken = tmp_path / "logs" / f"dt={DAY1 + dt.timedelta(days=1)}" / "part-00001.parquet"
    data = bytearray(broken.read_bytes())
    data[4:260] = b"\xff" * 256  # the first pages' headers: unreadable, the footer intact
    broken.write_bytes(bytes(data))
    cfg = bn_config(logs, str(tmp_path / "work"), workers=2).with_train(max_failures=2)
    with pytest.raises(MtrecError, match=r"evaluating on 2026-01-02 failed on the workers: worker \d: ") as e:
        run_train(cfg, DAY1, DAY1)
    assert "\n" not in str(e.value) and "nothing was published" in str(e.value)
    assert checkpoint.published_days(cfg) == []
