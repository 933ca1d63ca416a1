"""Safe to schedule: one training job per model at a time, and `--date yesterday` in job.timezone."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
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
        refused = r"esmm_synth is being trained by `mtrec nightly 2026-01-02` \(pid \d+ on .*started .*UTC\), which holds .*locks/esmm_synth.lock; this job did nothing"
        with pytest.raises(LockHeld, match=refused), lock._flock(cfg, url, "mtrec nightly 2026-01-02"):
            pass
        with lock.model_lock(cfg, "nested"):  # re-entrant in the same process (backfill -> nightly days)
            pass
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


def test_object_store_lease_refuses_while_fresh_and_is_taken_over_when_expired(monkeypatch):
    import fsspec

    cfg = load_config("esmm", logs="memory://w/logs", workdir="memory://lease-test/work")
    fs = fsspec.filesystem("memory")
    path = lock.lock_url(cfg).removeprefix("memory://")
    monkeypatch.setattr(lock, "LEASE_TTL_S", 3.0)
    with lock.model_lock(cfg, "first"):
        lease = json.loads(fs.cat(path))
        assert lease["holder"]["job"] == "first" and lease["expires"] > time.time()
        saved = dict(lock._held)
        lock._held.clear()  # pretend to be another process
        with pytest.raises(LockHeld, match="`first`"), lock.model_lock(cfg, "second"):
            pass
        lock._held.update(saved)
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
    real_sleep = time.sleep

    def racing_sleep(seconds):  # another job's write lands between our write and our read-back
        fs.pipe(path, json.dumps(other).encode())
        real_sleep(seconds)

    monkeypatch.setattr(lock.time, "sleep", racing_sleep)
    with pytest.raises(LockHeld, match="`the other job` \\(pid 7 on h2"), lock.model_lock(cfg, "mine"):
        pass
    assert json.loads(fs.cat(path))["token"] == "other"  # its lease is left alone
    monkeypatch.setattr(lock.time, "sleep", real_sleep)
    fs.rm(path)
    # we hold it, miss renewals, and another job takes over: our renewal must not overwrite it
    monkeypatch.setattr(lock, "LEASE_TTL_S", 0.6)
    with lock.model_lock(cfg, "mine"):
        fs.pipe(path, json.dumps(other).encode())
        real_sleep(0.5)  # > ttl/3: the renewer has looked
        assert json.loads(fs.cat(path))["token"] == "other"
    assert json.loads(fs.cat(path))["token"] == "other"  # and the release does not delete it


def test_train_nightly_and_backfill_take_the_lock_before_anything_else(cfg, capsys):
    """A held lock: each training command exits 8 at once, naming the holder; nothing is trained."""
    with lock.model_lock(cfg, "mtrec nightly 2026-01-02"):
        saved = dict(lock._held)
        lock._held.clear()  # the commands below behave as another process would
        base = ["--config", "esmm", "--logs", cfg.job.logs, "--workdir", cfg.job.workdir]
        try:
            for argv in (["nightly", *base, "--date", "2026-01-02", "--cold-start"],
                         ["backfill", *base, "--from", "2026-01-01", "--to", "2026-01-02", "--cold-start"],
                         ["train", *base, "--from", "2026-01-01", "--to", "2026-01-02"]):
                assert main(argv) == 8
                err = capsys.readouterr().err
                assert "mtrec: error: esmm_synth is being trained by `mtrec nightly 2026-01-02`" in err
        finally:
            lock._held.update(saved)
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


def test_nightly_prints_the_resolved_day(cfg, capsys):
    """`mtrec nightly --date yesterday` on a world without that day: the resolved date and the
    timezone are printed before the (expected) refusal."""
    yesterday = parse_date("yesterday", "--date", cfg.job.timezone)
    code = main(["nightly", "--config", "esmm", "--logs", cfg.job.logs, "--workdir", cfg.job.workdir, "--date", "yesterday"])
    out, err = capsys.readouterr()
    assert f"mtrec nightly esmm_synth: {yesterday} (yesterday in UTC)" in out
    assert code == 4 and "no published checkpoint of esmm_synth before" in err
