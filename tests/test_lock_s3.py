"""The model lock's lease on a real S3 server (moto's, in its own process, behind a proxy that
counts requests and can fail some: `mtrec.testing.s3`): S3's conditional writes decide which of
two racing jobs holds it, never both."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import pytest

from mtrec import lock
from mtrec.config import load_config
from mtrec.errors import ConfigError, LockHeld
from mtrec.testing.s3 import S3Server

BUCKET = "locks"


@pytest.fixture(scope="module")
def s3():
    """One S3 server for the module, bucket `locks`; `s3.boto` a client of it, for what other
    jobs write and for looking at the store."""
    with S3Server() as server:
        server.make_bucket(BUCKET)
        server.boto = server.client()
        yield server


@pytest.fixture
def cfg(s3, monkeypatch):
    """A config whose workdir (so its lock) is a fresh prefix of the bucket; this process's AWS
    environment points at the server and s3fs's cached instances are dropped, so the lock's
    `filesystem(url)` builds one that talks to it."""
    import s3fs

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield load_config("esmm", logs="memory://lock-s3/logs", workdir=f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/work")
    s3.set_faults(0.0)
    s3fs.S3FileSystem.clear_instance_cache()


def key(cfg) -> str:
    return lock.lock_url(cfg).removeprefix(f"s3://{BUCKET}/")


def stored(s3, cfg) -> dict | None:
    """The lease object as the store has it (None: there is none)."""
    try:
        return json.loads(s3.boto.get_object(Bucket=BUCKET, Key=key(cfg))["Body"].read())
    except s3.boto.exceptions.NoSuchKey:
        return None


def put(s3, cfg, lease: dict) -> None:
    """Another job's write of the lease object."""
    s3.boto.put_object(Bucket=BUCKET, Key=key(cfg), Body=json.dumps(lease).encode())


def other(expires_in: float = 60.0) -> dict:
    return {
        "token": "other",
        "holder": {"job": "the other job", "pid": 7, "host": "h2"},
        "expires": time.time() + expires_in,
    }


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def race(cfg, jobs: list[str], monkeypatch) -> dict[str, str]:
    """Each job tries to take the lock in its own thread, all reading the lease before any of
    them writes (a barrier after each one's first read): only the store's conditions decide.
    The winner holds it until every job has tried. Returns job -> "held" or the refusal."""
    read = lock._S3Store.read
    first = threading.local()
    after_read = threading.Barrier(len(jobs), timeout=20)
    tried = threading.Barrier(len(jobs), timeout=20)
    outcome: dict[str, str] = {}

    def racing_read(self, path):
        seen = read(self, path)
        if getattr(first, "job", None):  # the acquisition's read; not the renewer's or a re-read
            first.job = None
            after_read.wait()
        return seen

    def attempt(job: str) -> None:
        first.job = job
        try:
            with lock.model_lock(cfg, job):
                outcome[job] = "held"
                tried.wait()
        except LockHeld as e:
            outcome[job] = str(e)
            tried.wait()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            outcome[job] = repr(e)
            tried.abort()

    monkeypatch.setattr(lock._S3Store, "read", racing_read)
    threads = [threading.Thread(target=attempt, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    monkeypatch.setattr(lock._S3Store, "read", read)
    return outcome


def assert_one_held(outcome: dict[str, str]) -> None:
    winners = [job for job, what in outcome.items() if what == "held"]
    assert len(winners) == 1, outcome
    for job, what in outcome.items():
        if job != winners[0]:
            assert f"esmm_synth is being trained by `{winners[0]}` (pid " in what, outcome


def test_a_second_acquirer_is_refused_naming_the_holder_and_release_deletes_the_lease(s3, cfg):
    with lock.model_lock(cfg, "mtrec nightly 2026-01-02") as url:
        assert url.startswith(f"s3://{BUCKET}/") and stored(s3, cfg)["holder"]["job"] == "mtrec nightly 2026-01-02"
        refused = (
            r"^esmm_synth is being trained by `mtrec nightly 2026-01-02` \(pid \d+ on .*started .*UTC\), "
            rf"which holds {url}; this job did nothing"
        )
        with pytest.raises(LockHeld, match=refused), lock.model_lock(cfg, "second"):
            pass
        lock.ensure_held(cfg)
    assert stored(s3, cfg) is None
    with lock.model_lock(cfg, "again"):
        pass


def test_racing_acquirers_of_a_free_lock_one_holds_the_others_are_refused(s3, cfg, monkeypatch):
    """All read "no lease", all create it with If-None-Match: the store lets exactly one in."""
    for attempt in range(8):
        assert_one_held(race(cfg, [f"job {attempt}.{i}" for i in range(3)], monkeypatch))
        assert stored(s3, cfg) is None  # the winner released it


def test_an_expired_lease_is_taken_over_exactly_once_by_racing_jobs(s3, cfg, monkeypatch):
    """Both read the dead holder's expired lease and its ETag, both replace it with If-Match:
    only the first replacement matches."""
    for attempt in range(4):
        put(s3, cfg, {"token": "dead", "holder": {"job": "crashed"}, "expires": time.time() - 1})
        assert_one_held(race(cfg, [f"job {attempt}.a", f"job {attempt}.b"], monkeypatch))
        assert stored(s3, cfg) is None


def test_a_job_whose_lease_is_taken_over_fails_ensure_held_and_leaves_the_new_lease(s3, cfg, monkeypatch, caplog):
    monkeypatch.setattr(lock, "LEASE_TTL_S", 0.6)
    lost = (
        r"^esmm_synth: `the other job` \(pid 7 on h2, started None\) took over this job's lease "
        r"s3://locks/.*/esmm_synth\.lock, so this job published nothing"
    )
    with caplog.at_level(logging.WARNING, logger="mtrec.lock"), lock.model_lock(cfg, "mine"):
        lock.ensure_held(cfg)
        put(s3, cfg, other())  # e.g. this job was paused past its lease's expiry
        wait_for(lambda: "lost the lease" in caplog.text, "the renewer to notice")  # its If-Match failed
        with pytest.raises(LockHeld, match=lost):
            lock.ensure_held(cfg)
        assert stored(s3, cfg)["token"] == "other"  # the renewer did not overwrite it
    assert stored(s3, cfg)["token"] == "other"  # nor did the release delete it


def test_release_deletes_only_this_jobs_lease(s3, cfg, monkeypatch):
    """The release reads its token in the lease, then deletes with If-Match: a takeover landing
    between the two is left alone."""
    read = lock._S3Store.read

    def taken_over_after_read(self, path):
        seen = read(self, path)
        put(s3, cfg, other())
        return seen

    with lock.model_lock(cfg, "mine"):
        monkeypatch.setattr(lock._S3Store, "read", taken_over_after_read)
    assert stored(s3, cfg)["token"] == "other"


def test_renewal_keeps_the_lease_under_injected_faults(s3, cfg, monkeypatch, caplog):
    """20% of the requests answer 503 SlowDown: the clients retry, every renewal lands."""
    monkeypatch.setattr(lock, "LEASE_TTL_S", 0.9)
    replace = lock._S3Store.replace
    renewed: list[str | None] = []

    def counted(self, path, body, etag):
        new = replace(self, path, body, etag)
        renewed.append(new)
        return new

    monkeypatch.setattr(lock._S3Store, "replace", counted)
    with caplog.at_level(logging.WARNING, logger="mtrec.lock"), lock.model_lock(cfg, "mine"):
        first = stored(s3, cfg)
        s3.reset_counts()
        s3.set_faults(0.2, seed=21)  # the 1st, 11th, 14th, 18th, 23rd request fail: each retry soon lands
        wait_for(lambda: len(renewed) >= 3, "three renewals")
        lock.ensure_held(cfg)
        failed = s3.counts().get("failed", 0)
        s3.set_faults(0.0)
        assert failed > 0 and all(renewed), renewed
        now = stored(s3, cfg)
        assert now["token"] == first["token"] and now["expires"] > first["expires"]
    assert "renewing the lease" not in caplog.text and "lost the lease" not in caplog.text
    assert stored(s3, cfg) is None


def test_a_write_whose_answer_was_lost_is_recognised_as_this_jobs_own(s3, cfg, monkeypatch, caplog):
    """A write lands but its answer is lost and the client's retry fails its condition (the object
    is now ours): the job reads its own token there and holds, or keeps renewing, the lease."""
    monkeypatch.setattr(lock, "LEASE_TTL_S", 0.6)
    create, replace = lock._S3Store.create, lock._S3Store.replace
    lost: list[str] = []

    def lost_create(self, path, body):
        new = create(self, path, body)
        if new is not None and not lost:
            lost.append("create")
            return None
        return new

    def lost_replace(self, path, body, etag):
        new = replace(self, path, body, etag)
        if new is not None and "replace" not in lost:
            lost.append("replace")
            return None
        return new

    monkeypatch.setattr(lock._S3Store, "create", lost_create)
    monkeypatch.setattr(lock._S3Store, "replace", lost_replace)
    with caplog.at_level(logging.WARNING, logger="mtrec.lock"), lock.model_lock(cfg, "mine"):
        wait_for(lambda: "replace" in lost, "a renewal whose answer is lost")
        time.sleep(0.5)  # the renewals after it land too
        lock.ensure_held(cfg)
        assert stored(s3, cfg)["expires"] > time.time()
    assert lost == ["create", "replace"] and "lease" not in caplog.text
    assert stored(s3, cfg) is None


def test_a_store_that_ignores_conditional_writes_is_refused(s3, cfg, monkeypatch):
    """An S3-compatible store that drops If-None-Match / If-Match: the lease would be no lock, so
    the job refuses to run (its probe: a second create of the lease succeeded) and removes it."""
    import s3fs
    from fsspec.asyn import sync_wrapper

    call = s3fs.S3FileSystem._call_s3

    async def unconditional(self, method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", unconditional)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", sync_wrapper(unconditional))
    refused = (
        r"^esmm_synth: the store of the lock s3://locks/.*/esmm_synth\.lock ignores conditional writes "
        r"\(If-None-Match\), so mtrec refuses to run rather than risk two jobs writing the model at once; "
        r"put job.workdir on a store that enforces them \(AWS S3, MinIO\) or on a shared file system$"
    )
    with pytest.raises(ConfigError, match=refused), lock.model_lock(cfg, "mine"):
        pytest.fail("the body must not run")
    assert stored(s3, cfg) is None
