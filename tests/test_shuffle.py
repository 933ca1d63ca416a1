"""Rows in a random order within a day: the shuffle buffer and the files' read order."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from mtrec.config import load_config
from mtrec.data.io import DataFile
from mtrec.train.stream import SHUFFLE_RUN, read_order, rebatch, shuffle_rows

N = 10_000


def _rows(n: int = N, batch: int = 700, users=None) -> list[pa.RecordBatch]:
    """Rows i = 0..n-1 in order; by default requests of 5 rows, one user each."""
    users = np.arange(n, dtype=np.int64) // 5 if users is None else users
    t = pa.table({"i": np.arange(n, dtype=np.int64), "x": np.arange(n, dtype=np.float32) * 0.5, "user_id": users})
    return t.to_batches(max_chunksize=batch)


def _order(batches) -> np.ndarray:
    return np.concatenate([b.column("i").to_numpy() for b in batches])


def test_every_row_once_in_an_order_that_depends_on_the_seed_only():
    out = _order(shuffle_rows(_rows(), 2000, [0, 1, 0]))
    assert sorted(out.tolist()) == list(range(N))  # a permutation: no row lost or repeated
    assert not np.array_equal(out, np.arange(N))
    # the same rows, batched differently on the way in: the same order out
    assert np.array_equal(out, _order(shuffle_rows(_rows(batch=333), 2000, [0, 1, 0])))
    assert np.array_equal(out, _order(shuffle_rows(_rows(batch=N), 2000, [0, 1, 0])))
    assert not np.array_equal(out, _order(shuffle_rows(_rows(), 2000, [0, 1, 1])))  # another rank's seed
    # columns travel with their row
    rows = list(shuffle_rows(_rows(), 2000, [0, 1, 0]))
    for b in rows:
        np.testing.assert_array_equal(b.column("x").to_numpy(), b.column("i").to_numpy() * 0.5)
    assert np.array_equal(_order(shuffle_rows(_rows(), 0, [0])), np.arange(N))  # 0: as read


def test_a_users_consecutive_rows_move_together_up_to_a_run_length():
    out = _order(shuffle_rows(_rows(), 2000, [0, 1, 0]))
    runs = out.reshape(-1, 5)  # each request's 5 rows leave together, in their order
    np.testing.assert_array_equal(runs - runs[:, :1], np.tile(np.arange(5), (len(runs), 1)))
    assert (runs[:, 0] % 5 == 0).all()
    # one user's 1,000 consecutive rows (a file sorted by user): cut into runs of SHUFFLE_RUN
    users = np.where(np.arange(N) < 1000, -1, np.arange(N))
    out = _order(shuffle_rows(_rows(users=users), 2000, [0, 1, 0]))
    mine = np.flatnonzero(out < 1000)
    assert np.diff(mine).max() > 1  # the user's rows no longer form one block
    pieces = np.split(out[mine], np.flatnonzero(np.diff(mine) > 1) + 1)
    assert max(len(p) for p in pieces) <= SHUFFLE_RUN


def test_the_buffer_bounds_how_far_a_row_moves_forward_and_mixes_the_stream():
    """A row cannot leave before the buffer has read it: out position >= in position - buffer
    (at most a buffer of rows ahead); sorted input (e.g. by label) leaves mixed at buffer scale."""
    buffer = 2000
    out = _order(shuffle_rows(_rows(), buffer, [3, 4, 0]))
    where = np.empty(N, dtype=np.int64)
    where[out] = np.arange(N)
    assert (where >= np.arange(N) - 1.5 * buffer).all()
    # a window of 1,000 output rows draws from a spread of input rows, not one run
    first = out[:1000]
    assert first.max() - first.min() > buffer / 2
    # rank correlation between input and output order stays high at buffer scale (bounded), < 1
    assert 0.5 < np.corrcoef(np.arange(N), where)[0, 1] < 0.999


def test_a_resumed_stream_continues_exactly_where_it_stopped():
    """Replaying the stream through the same buffer and dropping the first k rows gives the same
    batches as the uninterrupted stream from row k (what a resumed day relies on)."""
    full = [b.column("i").to_numpy() for b in rebatch(shuffle_rows(_rows(), 2000, [5, 6, 0]), 256)]
    done = set(np.concatenate(full[:13]).tolist())
    rest = (
        b.filter(pa.array([i not in done for i in b.column("i").to_pylist()]))
        for b in shuffle_rows(_rows(batch=900), 2000, [5, 6, 0])
    )
    resumed = [b.column("i").to_numpy() for b in rebatch(rest, 256)]
    assert len(resumed) == len(full) - 13
    for a, b in zip(resumed, full[13:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_files_are_read_in_a_seeded_order_per_day():
    files = [DataFile(f"file:///d/part-{i:05d}.parquet", f"part-{i:05d}.parquet", 1) for i in range(8)]
    day = dt.date(2026, 1, 3)
    a = read_order(files, 0, day, True)
    assert sorted(f.name for f in a) == [f.name for f in files] and a != files
    assert a == read_order(files, 0, day, True)
    assert a != read_order(files, 0, day + dt.timedelta(days=1), True)
    assert read_order(files, 0, day, False) == files


def test_shuffle_is_on_by_default_and_out_of_the_training_fingerprint_while_default():
    cfg = load_config("esmm")
    assert cfg.train.shuffle.buffer_rows > 0 and cfg.train.shuffle.files
    assert "shuffle" not in cfg.training_settings()  # checkpoints from before it warm-start unchanged
    off = cfg.with_train(shuffle={"buffer_rows": 0, "files": False})
    assert off.training_settings()["shuffle"] == {"buffer_rows": 0, "files": False}
    assert off.training_fingerprint() != cfg.training_fingerprint()
    with pytest.raises(Exception, match="buffer_rows"):
        cfg.with_train(shuffle={"buffer_rows": -1})
    single = cfg.with_train(shuffle={"user_runs": False})
    assert single.training_settings()["shuffle"]["user_runs"] is False
    assert cfg.train.shuffle_plan(7, 1) == (32768, True, [0, 7, 1], "user_id")
    assert single.train.shuffle_plan(7, 1)[3] is None


def test_without_user_runs_single_rows_move():
    """`together=None` (train.shuffle.user_runs: false): a request's rows no longer leave as one run."""
    out = _order(shuffle_rows(_rows(), 2000, [0, 1, 0], together=None))
    assert sorted(out) == list(range(N))
    runs = out.reshape(-1, 5)
    assert not (runs - runs[:, :1] == np.arange(5)).all(axis=1).all()


def test_a_resumed_job_skips_trained_rows_at_the_read_only_without_a_buffer():
    """With a buffer the workers must replay the whole stream (the buffer's order depends on every
    row), so the readers leave nothing out; in file order they skip the trained rows."""
    from types import SimpleNamespace

    from mtrec.jobs.protocol import _read_side_skip
    from mtrec.train.position import Position

    cfg = load_config("esmm")
    done = Position({0: [[0, 99]]})
    plan = SimpleNamespace(done=done)
    assert _read_side_skip(cfg, plan) is None
    off = cfg.with_train(shuffle={"buffer_rows": 0})
    assert _read_side_skip(off, plan) == {"0": [[0, 99]]}
    assert _read_side_skip(off, SimpleNamespace(done=Position())) is None


def test_positions_record_a_shuffled_stream_and_refuse_a_row_twice():
    """A shuffled stream trains rows out of order: the trained set stays exact, merges back to
    one interval per file once complete, and a row seen twice (in one batch, across batches or
    across ranks) is refused naming it."""
    from mtrec.errors import MtrecError
    from mtrec.train.position import Position

    out = np.concatenate([b.column("i").to_numpy() for b in shuffle_rows(_rows(), 2000, [0, 1, 0])])
    files, rows = out % 3, out // 3  # three files
    ranks = [Position(), Position()]
    for k, s in enumerate(range(0, N, 256)):
        ranks[k % 2].add_batch(files[s : s + 256], rows[s : s + 256])
        if s == 256 * 10:
            mid = Position(ranks[0].intervals)
            mid.merge(ranks[1])
            assert mid.rows == 256 * 11 and len(mid.intervals[0]) > 1  # holes while rows are in the buffer
            assert mid.trained_mask(files[: 256 * 12], rows[: 256 * 12]).tolist() == [True] * 256 * 11 + [False] * 256
    merged = Position.from_json(ranks[0].to_json())
    merged.merge(ranks[1])
    assert merged.rows == N and merged.intervals == {0: [[0, 3333]], 1: [[0, 3332]], 2: [[0, 3332]]}
    with pytest.raises(MtrecError, match=r"rows 7..7 of file 1 would be trained twice"):
        Position().add_batch(np.array([1, 1, 0]), np.array([7, 7, 3]))
    with pytest.raises(MtrecError, match=r"rows 20..25 of file 0 would be trained twice"):
        Position({0: [[20, 30]]}).add(0, 5, 25)
    with pytest.raises(MtrecError, match=r"would be trained twice"):
        merged.merge(ranks[1])
