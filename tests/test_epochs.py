"""`train.epochs`: a full retrain passes over its good rows several times, each pass in another
order, every pass training every good row once; a job killed mid-pass resumes in that pass."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import DAY1, WORLD_ROWS

from mtrec.config import load_config
from mtrec.data.io import DataFile
from mtrec.errors import ConfigError
from mtrec.train.position import FILE_COL, ROW_COL, Position, skip_trained
from mtrec.train.stream import day_batches, epoch_seed, job_reads, read_order, shuffle_epochs, shuffle_rows

FILES, PER_FILE = 3, 2000  # a synthetic job: 3 files of 2,000 good rows


def _stream(epochs: int, batch: int = 700, start_epoch: int = 0) -> list[pa.RecordBatch]:
    """A job's rows with positions, file by file, epoch after epoch (from `start_epoch`); requests
    of 5 rows, one user each."""
    parts = []
    for e in range(start_epoch, epochs):
        for f in range(FILES):
            rows = np.arange(PER_FILE, dtype=np.int64)
            parts.append(
                pa.table(
                    {
                        "user_id": (f * PER_FILE + rows) // 5,
                        FILE_COL: np.full(PER_FILE, e * FILES + f, np.int32),
                        ROW_COL: rows,
                    }
                )
            )
    return pa.concat_tables(parts).to_batches(max_chunksize=batch)


def _positions(batches) -> np.ndarray:
    """(file index, row) per row, in stream order: N x 2."""
    return np.concatenate(
        [np.stack([b.column(FILE_COL).to_numpy(), b.column(ROW_COL).to_numpy()], axis=1) for b in batches]
    )


def test_epochs_tell_retrain_jobs_apart_but_do_not_stop_a_nightly_warm_start():
    from mtrec.jobs.protocol import job_id

    cfg = load_config("esmm")
    two = cfg.with_train(epochs=2)
    # a nightly (one pass) under the unchanged config warm-starts from a 2-pass retrain's checkpoint
    assert "epochs" not in two.training_settings() and two.training_fingerprint() == cfg.training_fingerprint()
    assert cfg.fingerprint() == two.fingerprint()  # the saved state's shape is the same
    files = [DataFile("file:///x/part-0.parquet", "part-0.parquet", 10)]
    ids = {c.train.epochs: job_id(c, "full_retrain", [DAY1], None, None, files) for c in (cfg, two)}
    assert ids[1] != ids[2]  # a rerun with another number of passes does not resume the other's checkpoint
    assert job_id(cfg, "nightly", [DAY1], "p", None, files) == job_id(two, "nightly", [DAY1], "p", None, files)
    with pytest.raises(ConfigError, match=r"train.epochs.*greater than or equal to 1"):
        cfg.with_train(epochs=0)


def test_train_epochs_flag_is_checked_before_anything_runs(tmp_path, capsys):
    from mtrec.cli import main

    code = main(["train", "--from", "2026-01-01", "--to", "2026-01-02", "--epochs", "0", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "`train.epochs` got 0" in err
    assert not any(tmp_path.iterdir())  # no lock taken, nothing validated


def test_each_epoch_reads_every_file_once_in_its_own_order():
    day1, day2 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)
    listed = [
        (d, [DataFile(f"file:///{d}/part-{i}.parquet", f"part-{i}.parquet", 1) for i in range(6)]) for d in (day1, day2)
    ]
    files, reads = job_reads(listed, 0, True, epochs=3)
    one_files, one_reads = job_reads(listed, 0, True)
    assert files == one_files == read_order(listed[0][1], 0, day1, True) + read_order(listed[1][1], 0, day2, True)
    assert one_reads == list(range(12)) and reads[:12] == one_reads  # epoch 0 reads as a 1-pass job
    assert len(reads) == 36
    for e in range(3):
        epoch = reads[e * 12 : (e + 1) * 12]
        assert sorted(epoch[:6]) == [e * 12 + i for i in range(6)]  # day 1's files first, every one once
        assert sorted(epoch[6:]) == [e * 12 + i for i in range(6, 12)]
    assert [v % 12 for v in reads[12:24]] != reads[:12]  # epoch 1 reads the files in another order
    assert [files[v % 12] for v in reads[12:18]] == read_order(listed[0][1], 0, day1, True, epoch=1)
    assert job_reads(listed, 0, False, epochs=2)[1] == list(range(24))  # files unshuffled: by name every epoch
    assert epoch_seed([0, 5, 1], 0) == [0, 5, 1] and epoch_seed([0, 5, 1], 2) == [0, 5, 1, 2]


def test_each_epoch_is_shuffled_on_its_own_and_a_resumed_epoch_continues_at_its_row():
    n = FILES * PER_FILE
    one = _positions(shuffle_epochs(_stream(1), FILES, 2000, [0, 7, 0]))
    assert np.array_equal(one, _positions(shuffle_rows(_stream(1), 2000, [0, 7, 0])))  # 1 epoch: as before epochs
    two = _positions(shuffle_epochs(_stream(2), FILES, 2000, [0, 7, 0]))
    assert np.array_equal(two, _positions(shuffle_epochs(_stream(2, batch=333), FILES, 2000, [0, 7, 0])))
    first, second = two[:n], two[n:]
    assert np.array_equal(first, one)  # epoch 0 keeps the 1-pass order
    assert (second[:, 0] >= FILES).all()  # no row of one epoch mixes into the other
    assert np.array_equal(np.unique(second - [FILES, 0], axis=0), np.unique(first, axis=0))  # every row again
    assert len(np.unique(second, axis=0)) == n
    assert (np.mean(np.all(second - [FILES, 0] == first, axis=1))) < 0.01  # in another order: < 1% in place

    # killed 1,500 rows into epoch 1: the trained positions skip out of the replayed stream, and the
    # rest equals the uninterrupted stream's; a rerun that reads only epoch 1 (the finished epoch 0 left
    # out at the read, `protocol._reads_left`) gives the same rest
    done = Position()
    done.add_batch(*two[: n + 1500].T)
    assert done.rows_per_epoch(FILES, 2) == [n, 1500] and done.rows == n + 1500
    replayed = _positions(skip_trained(shuffle_epochs(_stream(2), FILES, 2000, [0, 7, 0]), done))
    epoch1_only = _positions(skip_trained(shuffle_epochs(_stream(2, start_epoch=1), FILES, 2000, [0, 7, 0]), done))
    assert np.array_equal(replayed, two[n + 1500 :]) and np.array_equal(epoch1_only, two[n + 1500 :])


def test_a_resumed_job_reads_only_the_epochs_it_has_not_finished():
    from mtrec.jobs.protocol import _reads_left

    reads = [0, 1, 2, 4, 3, 5, 8, 6, 7]  # 3 files, 3 epochs
    plan = SimpleNamespace(files=[None] * 3, reads=reads, epochs=3, expected_rows=300, done=Position())
    assert _reads_left(plan) == reads
    plan.done = Position({0: [[0, 99]], 1: [[0, 99]], 2: [[0, 99]], 4: [[0, 49]]})  # epoch 0 done, epoch 1 half
    assert _reads_left(plan) == [4, 3, 5, 8, 6, 7]
    assert _reads_left(SimpleNamespace(files=[None] * 2, reads=[], epochs=1, expected_rows=10, done=Position())) == [
        0,
        1,
    ]


def test_a_full_retrain_plans_its_epochs_and_a_nightly_one_pass(cfg):
    from mtrec.jobs.protocol import plan_job

    two = cfg.with_train(epochs=2)
    retrain = plan_job(two, [DAY1], "full_retrain", None)
    assert (retrain.epochs, len(retrain.files), retrain.manifest["epochs"]) == (2, 4, 2)
    assert retrain.expected_rows is None  # the training read counts the good rows
    assert sorted(retrain.reads) == list(range(8)) and retrain.reads[:4] == [0, 1, 2, 3]
    nightly = plan_job(two, [DAY1], "nightly", None)  # nightlies learn each new day once
    assert (nightly.epochs, nightly.reads, nightly.manifest["epochs"]) == (1, [0, 1, 2, 3], 1)
    assert retrain.job_id != plan_job(cfg, [DAY1], "full_retrain", None).job_id  # a 1-pass run's checkpoints differ


def test_two_epochs_train_twice_the_good_rows_and_reorder_the_second(world):
    """In process, as a 1-worker job reads: epoch 0's rows come in the 1-epoch order, epoch 1 holds
    every good row once more, in another order (files and buffer)."""
    cfg = load_config("esmm", logs=world)
    plan = cfg.train.shuffle_plan(DAY1.toordinal(), rank=0)
    one = _positions(day_batches(cfg.spec, world, [DAY1], 4096, shuffle=plan))
    two = _positions(day_batches(cfg.spec, world, [DAY1], 4096, shuffle=plan, epochs=2))
    assert len(one) == WORLD_ROWS and len(two) == 2 * WORLD_ROWS
    first, second = two[:WORLD_ROWS], two[WORLD_ROWS:]
    assert np.array_equal(first, one)
    files = 4  # the world's files per day
    assert (second[:, 0] >= files).all()
    assert np.array_equal(np.unique(second - [files, 0], axis=0), np.unique(first, axis=0))
    # the files come in another order, and the rows are reshuffled: under 1% at their epoch-0 place
    assert [f for f in dict.fromkeys(second[:, 0] - files)] != [f for f in dict.fromkeys(first[:, 0])]
    assert np.mean(np.all(second - [files, 0] == first, axis=1)) < 0.01


def test_two_epochs_in_process_train_every_row_twice_and_lower_the_loss(world):
    from test_train_eval import small

    from mtrec.train.local import train_days

    cfg = small(world)
    res = train_days(cfg, [DAY1], log_every=10, epochs=2)
    assert res.counts.good == 2 * WORLD_ROWS and res.counts.read == 2 * WORLD_ROWS and len(res.counts.files) == 8
    loss = np.array([x["loss"] for x in res.losses])
    # 156 steps, a record every 10 (16): records 2-7 lie in epoch 1 after its start, records 10-16 in
    # epoch 2, on the same rows. Measured: mean loss 0.244 -> 0.199
    assert len(loss) == 16 and loss[9:].mean() < 0.9 * loss[1:7].mean()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_killed_two_epoch_job_resumes_in_its_second_epoch_to_the_uninterrupted_model(world, tmp_path, monkeypatch):
    """2 epochs of day 1 on one Ray worker, killed in epoch 2 with no restart left, rerun (it reads
    epoch 2 only), killed again and restarted by Ray Train: 2 x the good rows, bit-identical to
    one uninterrupted in-process run of the 2 epochs."""
    from test_incremental import assert_same, in_memory_state, inc_cfg

    from mtrec.errors import MtrecError
    from mtrec.jobs.retrain import run_train
    from mtrec.train import checkpoint as ck
    from mtrec.train.local import train_days

    cfg = inc_cfg(world, tmp_path / "work", epochs=2)  # 256-row batches, a checkpoint every 20 steps
    monkeypatch.setenv("MTREC_KILL_WORKER", "0:110")  # epoch 2 starts at row 20,000 (step 79); saved at step 100
    with pytest.raises(MtrecError, match=r"worker 0 .*died.*resumes from .*step-00000100\.\S+ \(step 100\)"):
        run_train(cfg.with_train(max_failures=0), DAY1, DAY1)
    monkeypatch.setenv("MTREC_KILL_WORKER", "0:25")  # resumed at step 100: dies at step 125, restarts from 120
    s = run_train(cfg.with_train(max_failures=1), DAY1, DAY1)
    assert (s.resumed["step"], s.resumed["rows"], s.restarts) == (100, 100 * 256, 1)
    assert (s.rows, s.expected_rows, s.epochs) == (2 * WORLD_ROWS, WORLD_ROWS, 2)
    man = ck.read_manifest(ck.checkpoint_url(cfg, DAY1))
    assert man["rows_trained"] == 2 * WORLD_ROWS and man["rows_per_epoch"] == [WORLD_ROWS, WORLD_ROWS]
    assert (man["epochs"], man["resumed_at_step"], man["steps"]) == (2, 120, 156)
    uninterrupted = train_days(cfg, [DAY1], epochs=2)
    assert_same(
        ck.read_full(ck.checkpoint_url(cfg, DAY1)),
        in_memory_state(cfg, uninterrupted, tmp_path),
        "2 epochs killed twice in epoch 2 vs uninterrupted",
        tol=0.0,
    )


def test_a_fresh_model_can_start_its_root_towers_at_the_base_rate(world):
    """`train.start_at_base_rate`: before the first step the root binary task's output bias is the
    log-odds of its label's rate in that step's rows; a `given` task's is left as initialised."""
    from conftest import _batch

    from mtrec.train.local import build_sharded
    from mtrec.train.loop import start_at_base_rate

    cfg = load_config("esmm", logs=world).with_train(start_at_base_rate=True)
    dmp, _ = build_sharded(cfg)
    towers = dmp.module.model.towers
    cvr_before = towers["cvr"].out.bias.detach().clone()
    rb = _batch(click=pa.array([1] + [0] * 9, pa.int8()))  # 10% clicks
    assert start_at_base_rate(dmp, cfg, rb, 1, torch.device("cpu")) == pytest.approx({"ctr": np.log(0.1 / 0.9)})
    assert float(towers["ctr"].out.bias.detach()) == pytest.approx(np.log(0.1 / 0.9))
    assert torch.equal(towers["cvr"].out.bias, cvr_before)
    assert "start_at_base_rate" not in cfg.training_settings()  # a start, not a training setting


def test_train_days_starts_a_fresh_model_at_the_base_rate_only_when_asked(world):
    from mtrec.train.local import train_days

    cfg = load_config("esmm", logs=world).with_train(batch_size=256)
    first = {}
    for flag in (False, True):
        res = train_days(cfg.with_train(start_at_base_rate=flag), [DAY1], log_every=1)
        first[flag] = res.losses[0]["loss"]
    # p = 0.5 costs ~0.69 nats per task on the first batch; at the base rate the first loss is far lower
    assert first[True] < 0.6 * first[False], first
