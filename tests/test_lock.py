"""Safe to schedule: one training job per model at a time, and `--date yesterday` in job.timezone."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from mtrec import lock
from mtrec.cli import main
from mtrec.config import load_config
from mtrec.data.io import parse_date
from mtrec.errors import ConfigError, LockHeld, MtrecError


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_frees_on_exit(cfg):
    with lock.model_lock(cfg, "mtrec nightly 2026-01-02") as url:
        holder = json.loads(Path(url).read_text())
        assert holder["job"] == "mtrec nightly 2026-01-02" and holder["pid"] > 0
        # another open file description (as another process would have) is refused
        refused = (
            r"esmm_synth is being trained by `mtrec nightly 2026-01-02` \(pid \d+ on .*started .*UTC\), "
            r"which holds .*locks/esmm_synth.lock; this job did nothing"
        )
        with pytest.raises(LockHeld, match=refused), lock._flock(cfg, url, "mtrec nightly 2026-01-02"):
            pass
        with pytest.raises(LockHeld, match="`mtrec nightly 2026-01-02`"), lock.model_lock(cfg, "nested"):
            pass  # a job takes the lock once: a second acquisition is refused, in the same process too
        lock.ensure_held(cfg)  # a flock cannot be lost
    assert Path(url).read_text() == ""  # released: the holder's description is gone
    with lock.model_lock(cfg, "again"):
        pass


def test_a_killed_holder_leaves_no_stale_lock(cfg):
    """flock is released by the kernel when the holder dies, even by SIGKILL."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from mtrec.config import load_config
        from mtrec.lock import model_lock
        cfg = load_config("esmm", logs={cfg.job.logs!r}, workdir={cfg.job.workdir!r})
        with model_lock(cfg, "doomed job"):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=r"`doomed job` \(pid " + str(proc.pid)), lock.model_lock(cfg, "second"):
            pass
    finally:
        proc.kill()
        proc.wait()
    with lock.model_lock(cfg, "after the kill"):
        pass


@pytest.mark.slow  # sleeps past a renewal
def test_object_store_lease_refuses_while_fresh_and_is_taken_over_when_expired(monkeypatch):
    import fsspec

    cfg = load_config("esmm", logs="memory://w/logs", workdir="memory://lease-test/work")
    fs = fsspec.filesystem("memory")
    path = lock.lock_url(cfg).removeprefix("memory://")
    monkeypatch.setattr(lock, "LEASE_TTL_S", 3.0)
    with lock.model_lock(cfg, "first"):
        lease = json.loads(fs.cat(path))
        assert lease["holder"]["job"] == "first" and lease["expires"] > time.time()
        with pytest.raises(LockHeld, match="`first`"), lock.model_lock(cfg, "second"):
            pass
        time.sleep(1.6)  # renewed every ttl/3: still held past the first expiry
        assert json.loads(fs.cat(path))["expires"] > lease["expires"]
    assert not fs.exists(path)  # released
    # a holder that died: its lease expires and the next job takes over
    fs.pipe(path, json.dumps({"token": "dead", "holder": {"job": "crashed"}, "expires": time.time() - 1}).encode())
    with lock.model_lock(cfg, "takeover"):
        assert json.loads(fs.cat(path))["holder"]["job"] == "takeover"


def test_lease_gives_way_to_a_concurrent_writer_and_never_overwrites_a_takeover(monkeypatch):
    import fsspec

    cfg = load_config("esmm", logs="memory://w/logs", workdir="memory://lease-race/work")
    fs = fsspec.filesystem("memory")
    path = lock.lock_url(cfg).removeprefix("memory://")
    other = {"token": "other", "holder": {"job": "the other job", "pid": 7, "host": "h2"}, "expires": time.time() + 60}
    read = lock._MemoryStore.read

    def racing_read(self, path_):  # another job's write lands right after our read, before our write
        seen = read(self, path_)
        fs.pipe(path, json.dumps(other).encode())
        return seen

    monkeypatch.setattr(lock._MemoryStore, "read", racing_read)
    for before in (None, {"token": "dead", "holder": {"job": "crashed"}, "expires": time.time() - 1}):
        if before:  # an expired lease: the other job takes it over first
            fs.pipe(path, json.dumps(before).encode())
        with pytest.raises(LockHeld, match="`the other job` \\(pid 7 on h2"), lock.model_lock(cfg, "mine"):
            pass
        assert json.loads(fs.cat(path))["token"] == "other"  # its lease is left alone
        fs.rm(path)
    monkeypatch.setattr(lock._MemoryStore, "read", read)
    # we hold it, miss renewals, and another job takes over: our renewal must not overwrite it
    monkeypatch.setattr(lock, "LEASE_TTL_S", 0.6)
    with lock.model_lock(cfg, "mine"):
        fs.pipe(path, json.dumps(other).encode())
        time.sleep(0.5)  # > ttl/3: the renewer has looked
        assert json.loads(fs.cat(path))["token"] == "other"
    assert json.loads(fs.cat(path))["token"] == "other"  # and the release does not delete it


def test_other_object_stores_get_a_best_effort_lease_and_say_so_once(monkeypatch, caplog):
    """gs://, abfs://, ...: mtrec uses no conditional writes there; the lease is checked before
    its write and read back after it (a writer landing in between wins), and a warning says the
    lease is best effort, once per process."""
    from fsspec.implementations.memory import MemoryFileSystem

    class OtherStore(MemoryFileSystem):  # all the lock looks at: the protocol
        protocol = ("gs", "gcs")

    cfg = load_config("esmm", logs="memory://w/logs", workdir="memory://best-effort/work")
    url = lock.lock_url(cfg)
    fs, path = OtherStore(), url.removeprefix("memory://")
    other = {"token": "other", "holder": {"job": "the other job", "pid": 7, "host": "h2"}, "expires": time.time() + 60}
    real_sleep = time.sleep

    def racing_sleep(seconds):  # another job's write lands between our write and our read-back
        fs.pipe(path, json.dumps(other).encode())
        real_sleep(seconds)

    monkeypatch.setattr(lock, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="mtrec.lock"):
        with lock._lease(cfg, fs, path, url, "first", ttl=1.0):
            assert json.loads(fs.cat(path))["holder"]["job"] == "first"
            with pytest.raises(LockHeld, match="`first`"), lock._lease(cfg, fs, path, url, "second", ttl=1.0):
                pass
        assert not fs.exists(path)  # released
        monkeypatch.setattr(lock.time, "sleep", racing_sleep)
        with pytest.raises(LockHeld, match="`the other job` \\(pid 7 on h2"), lock._lease(cfg, fs, path, url, "mine"):
            pass
        assert json.loads(fs.cat(path))["token"] == "other"  # its lease is left alone
    assert caplog.text.count("the model lock on gs:// is a best-effort lease") == 1
    fs.rm(path)


def test_a_job_whose_lease_is_taken_over_mid_training_publishes_nothing_and_names_the_new_holder(monkeypatch, caplog):
    """The job's renewals fail while it trains (the store refuses its writes), its lease expires
    and another job takes it over: the job fails with exit code 8 before publishing, naming that
    job. The same protocol code with the lease kept publishes. Ray Train and the workers are
    faked: no cluster is started."""
    import ray

    from mtrec.data.io import filesystem
    from mtrec.jobs import protocol
    from mtrec.jobs.plan import JobPlan, RunOptions
    from mtrec.train import checkpoint
    from mtrec.train.position import Position

    cfg = load_config("esmm", logs="memory://lease-lost/logs", workdir="memory://lease-lost/work")
    url = lock.lock_url(cfg)
    fs, path = filesystem(url)
    monkeypatch.setattr(lock, "LEASE_TTL_S", 0.6)
    others = ExitStack()  # the other job's lease, released at the end
    mid_training: list = []  # what happens while the (fake) workers train
    unreachable = False
    replace = lock._MemoryStore.replace

    def flaky_replace(self, path_, body, etag):  # this job's renewals fail for a while, the other job's writes land
        if unreachable and json.loads(body)["holder"]["job"] == "mtrec nightly 2026-01-03":
            raise OSError("store unreachable")
        return replace(self, path_, body, etag)

    def wait_for(condition, what):
        deadline = time.time() + 10
        while not condition():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def take_over() -> None:  # mid-training: this job's lease expires and another job takes it
        nonlocal unreachable
        unreachable = True
        wait_for(lambda: json.loads(fs.cat(path))["expires"] < time.time(), "the lease to expire")
        others.enter_context(lock._lease(cfg, fs, path, url, "mtrec backfill 2026-01-01 .. 2026-01-03"))
        unreachable = False  # the store is back: this job's next renewal finds the other job's lease
        wait_for(lambda: "lost the lease" in caplog.text, "the renewer to notice")

    class Trainer:  # Ray Train: fit() is the training
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            for event in mid_training:
                event()

    class Collector:  # the driver's view of the workers: rank 0 reported a result
        drain = SimpleNamespace(remote=lambda: [])
        snapshot = SimpleNamespace(
            remote=lambda: {
                "attempts": 1,
                "starts": [],
                "workers": {},
                "marks": {},
                "history": [],
                "result": {"workers": [], "plan": {}, "rows_trained": 0},
            }
        )

        @classmethod
        def remote(cls):
            return cls()

    published = []
    publish = checkpoint.publish

    def recorded_publish(staged: str, final: str) -> None:
        published.append(final)
        publish(staged, final)

    monkeypatch.setattr(lock._MemoryStore, "replace", flaky_replace)
    monkeypatch.setattr(protocol, "trainer_class", lambda: Trainer)
    monkeypatch.setattr(protocol, "good_rows_dataset", lambda *a, **k: None)
    monkeypatch.setattr(protocol, "_exact_split_config", lambda *a: None)
    monkeypatch.setattr("mtrec.train.worker.RunCollector", Collector)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(checkpoint, "publish", recorded_publish)

    def train_and_publish(day: dt.date) -> str:
        staged = checkpoint.staging_url(cfg, day)
        plan = JobPlan(
            kind="nightly",
            days=[day],
            parent=None,
            files=[],
            reports=[],
            job_id="job",
            done=Position(),
            staged=staged,
            checkpoint=checkpoint.checkpoint_url(cfg, day),
            manifest={"input_rows": 0, "quarantined_rows": 0},
        )
        fs.pipe(filesystem(staged)[1] + "/model.pt", b"weights")  # what the workers stage
        job = protocol._Job(cfg, plan, RunOptions(), {})  # tracking's own steps are not what this test is about
        try:
            job.train()
            job.publish()
        finally:
            assert not fs.exists(filesystem(staged)[1])  # published or discarded, never left behind
        return plan.checkpoint

    lost = (
        r"^esmm_synth: `mtrec backfill 2026-01-01 \.\. 2026-01-03` \(pid \d+ on .*, started .* UTC\) "
        r"took over this job's lease memory://lease-lost/work/locks/esmm_synth\.lock, so this job published nothing; "
        r"that job owns the model now: "
        r"let it finish, then rerun this one if its day is still unpublished$"
    )
    lock.ensure_held(cfg)  # no lock held: nothing to check
    with caplog.at_level(logging.WARNING, logger="mtrec.lock"), lock.model_lock(cfg, "mtrec nightly 2026-01-03"):
        try:
            lock.ensure_held(cfg)  # still its own
            day2 = train_and_publish(dt.date(2026, 1, 2))  # the lease kept: published
            assert published == [day2] and fs.exists(filesystem(day2)[1] + "/_SUCCESS")
            mid_training.append(take_over)
            with pytest.raises(LockHeld, match=lost):
                train_and_publish(dt.date(2026, 1, 3))
            assert published == [day2]  # publish was never reached
            assert not fs.exists(filesystem(checkpoint.checkpoint_url(cfg, dt.date(2026, 1, 3)))[1])
            with pytest.raises(LockHeld, match=lost):
                lock.ensure_held(cfg)
            assert "renewing the lease" in caplog.text and "not renewing it" in caplog.text
            assert (
                json.loads(fs.cat(path))["holder"]["job"] == "mtrec backfill 2026-01-01 .. 2026-01-03"
            )  # never overwritten
        finally:
            others.close()
    lock.ensure_held(cfg)  # released: nothing to check
    assert checkpoint.published_days(cfg) == [dt.date(2026, 1, 2)]


def test_train_nightly_and_backfill_take_the_lock_before_anything_else(cfg, capsys):
    """A held lock: each training command exits 8 at once, naming the holder; nothing is trained."""
    with lock.model_lock(cfg, "mtrec nightly 2026-01-02"):
        base = ["--config", "esmm", "--logs", cfg.job.logs, "--workdir", cfg.job.workdir]
        for argv in (
            ["nightly", *base, "--date", "2026-01-02", "--cold-start"],
            ["backfill", *base, "--from", "2026-01-01", "--to", "2026-01-02", "--cold-start"],
            ["train", *base, "--from", "2026-01-01", "--to", "2026-01-02"],
        ):
            assert main(argv) == 8
            err = capsys.readouterr().err
            assert "mtrec: error: esmm_synth is being trained by `mtrec nightly 2026-01-02`" in err
    assert not os.path.exists(f"{cfg.job.workdir}/checkpoints") and not os.path.exists(f"{cfg.job.workdir}/quarantine")


def test_yesterday_and_today_resolve_in_the_configured_timezone():
    now_utc = dt.datetime.now(dt.UTC)
    for tz in ("UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11: different dates most of the day
        today = now_utc.astimezone(ZoneInfo(tz)).date()
        assert parse_date("today", "--date", tz) in (today, today + dt.timedelta(days=1))  # a midnight may pass
        assert parse_date("yesterday", "--date", tz) in (today - dt.timedelta(days=1), today)
    assert parse_date("2026-01-02", "--date", "UTC") == dt.date(2026, 1, 2)
    with pytest.raises(MtrecError, match="`--date` must be a date YYYY-MM-DD, `today` or `yesterday`, got 'tomorrow'"):
        parse_date("tomorrow", "--date", "UTC")
    with pytest.raises(MtrecError, match="`--start yesterday` is not accepted here"):
        parse_date("yesterday", "--start")


def test_unknown_timezone_is_a_config_error(tmp_path):
    import yaml

    d = load_config("esmm").model_dump(mode="json")
    for bad in ("Mars/Olympus", "Europe"):  # "Europe" is a folder of zones, not a zone
        d["job"]["timezone"] = bad
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
        with pytest.raises(ConfigError, match=f"unknown timezone '{bad}'; use an IANA name"):
            load_config(str(tmp_path / "c.yaml"))


def test_nightly_names_the_resolved_day(cfg, capsys):
    """`mtrec nightly --date yesterday` on a world without that day: the (expected) refusal is one
    line on stderr naming the resolved date and the timezone; nothing on stdout."""
    yesterday = parse_date("yesterday", "--date", cfg.job.timezone)
    code = main(
        ["nightly", "--config", "esmm", "--logs", cfg.job.logs, "--workdir", cfg.job.workdir, "--date", "yesterday"]
    )
    out, err = capsys.readouterr()
    assert code == 4 and out == "" and err.count("\n") == 1
    assert "no published checkpoint of esmm_synth before" in err and f"(--date yesterday is {yesterday} in UTC)" in err


def test_a_torn_lease_file_is_not_a_takeover():
    """A lease file that cannot be parsed (a torn write on an object store) holds no other job's
    token: the holder keeps its lease and may publish."""
    import fsspec

    cfg = load_config("esmm", logs="memory://torn/logs", workdir="memory://torn/work")
    path = lock.lock_url(cfg).removeprefix("memory://")
    with lock.model_lock(cfg, "mtrec nightly 2026-01-03"):
        fsspec.filesystem("memory").pipe(path, b'{"token": "ab')  # torn mid-write
        lock.ensure_held(cfg)  # no LockHeld: nobody took it over
