"""One training job per model at a time.

`mtrec train`, `nightly` and `backfill` hold the model's lock for the whole job, from before
they look at the published checkpoints until they end, so two jobs can never train the same
model (or the same day) at once: a scheduler that fires twice, an operator who reruns a night by
hand while the timer's run is still going. The second job exits at once (exit code 8) with a line
naming the holder: job, dates, host, pid, start time.

Where the lock lives: `<workdir>/locks/<model name>.lock`, beside the checkpoints it protects.

- Local or network file systems (a path, `file://`): an exclusive `flock` on the file. The kernel
  drops it when the holder exits in any way (crash, OOM kill, SIGKILL): no stale lock to clean
  up. The file itself stays; it holds the current holder's description, emptied on release.
  NFS: Linux emulates flock with NFS byte-range locks (v4), which works across machines.
- Object stores (`s3://`, `gs://`, ... and `memory://`): there is no lock primitive, so a lease:
  a small JSON object with the holder and an expiry `LEASE_TTL_S` ahead, renewed by a background
  thread every third of it and deleted on release. A job that finds an unexpired lease of another
  holder exits; an expired one (its holder died without releasing) is taken over. After writing
  its lease a job reads it back and gives way if another job's write won. This is best effort:
  two jobs starting within the same second on a store without read-after-write consistency
  could both pass; a scheduler that never starts two at once (Kubernetes `concurrencyPolicy:
  Forbid`, a systemd timer) is the first line, the lock the second.

A job whose lease was taken over (it missed its renewals for `LEASE_TTL_S`, e.g. the store was
unreachable or the process was paused) must not publish over the new holder's work: the job
calls `ensure_held` right before publishing and fails there with exit code 8.

A job takes the lock once, for its whole run (a backfill for its whole range); a second
acquisition is refused like any other holder's, in the same process too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mtrec.config import MtrecConfig
from mtrec.data.io import filesystem, is_local_fs, join
from mtrec.errors import LockHeld

LEASE_TTL_S = 300.0
# lock URL -> None for a flock (it cannot be lost), or for a lease the check that raises
# LockHeld once another job has taken it over (`ensure_held`)
_held: dict[str, Callable[[], None] | None] = {}
_guard = threading.Lock()
log = logging.getLogger(__name__)


def lock_url(cfg: MtrecConfig) -> str:
    return join(cfg.job.workdir, "locks", f"{cfg.name}.lock")


def _holder(job: str) -> dict:
    return {
        "job": job,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "ray_job": os.environ.get("MTREC_SUBMISSION_ID") or None,
    }


def describe(holder: dict | None) -> str:
    if not holder:
        return "another job (it left no description)"
    where = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("ray_job"):
        where += f", Ray job {holder['ray_job']}"
    return f"`{holder.get('job')}` ({where}, started {holder.get('started')})"


def _refused(cfg: MtrecConfig, url: str, holder: dict | None) -> LockHeld:
    return LockHeld(
        f"{cfg.name} is being trained by {describe(holder)}, which holds {url}; this job did nothing. "
        "Run it again when that job has ended (a scheduler should not start two: see docs/operations.md)"
    )


@contextmanager
def model_lock(cfg: MtrecConfig, job: str) -> Iterator[str]:
    """Hold the lock of `cfg.name` for the body; `job` describes this job to whoever is refused
    (e.g. "mtrec nightly 2026-01-03").

    Yields:
        str: the lock's URL.

    Raises:
        LockHeld: another job holds it.
    """
    url = lock_url(cfg)
    fs, path = filesystem(url)
    hold = _flock(cfg, path, job) if is_local_fs(fs) else _lease(cfg, fs, path, url, job)
    with hold as ensure:
        with _guard:
            _held[url] = ensure
        try:
            yield url
        finally:
            with _guard:
                _held.pop(url, None)


def ensure_held(cfg: MtrecConfig) -> None:
    """Check, right before publishing, that this process still holds the lock of `cfg.name`.
    Only a lease can be lost; a flock, or no lock held at all, passes.

    Raises:
        LockHeld: another job took the lease over; it is named.
    """
    with _guard:
        ensure = _held.get(lock_url(cfg))
    if ensure is not None:
        ensure()


@contextmanager
def _flock(cfg: MtrecConfig, path: str, job: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refused(cfg, path, _read_holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(job)).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _read_lease(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except ValueError:  # torn or foreign content: treat as expired
        return {"expires": 0}


def _write_lease(fs, path: str, lease: dict) -> None:
    with fs.open(path, "wb") as f:
        f.write(json.dumps(lease).encode())


@contextmanager
def _lease(
    cfg: MtrecConfig, fs, path: str, url: str, job: str, ttl: float | None = None
) -> Iterator[Callable[[], None]]:
    ttl = LEASE_TTL_S if ttl is None else ttl
    current = _read_lease(fs, path)
    if current and current.get("expires", 0) > time.time():
        raise _refused(cfg, url, current.get("holder"))
    token = secrets.token_hex(8)
    lease = {"token": token, "holder": _holder(job), "expires": time.time() + ttl}
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    _write_lease(fs, path, lease)
    time.sleep(min(0.5, ttl / 10))  # let a concurrent writer's lease land, then see who won
    won = _read_lease(fs, path)
    if not won or won.get("token") != token:
        raise _refused(cfg, url, (won or {}).get("holder"))
    stop = threading.Event()
    taker: list[dict | None] = []  # the holder that took the lease over, once lost (the renewer and ensure() both look)

    def taken_over(current: dict | None) -> bool:
        with _guard:
            # another holder's lease (a torn or foreign file, without a token, is nobody's: not a takeover)
            if current is not None and current.get("token") not in (token, None) and not taker:
                taker.append(current.get("holder"))
            return bool(taker)

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                if taken_over(_read_lease(fs, path)):  # we missed renewals: never overwrite the new holder's lease
                    log.warning("lost the lease %s to %s; not renewing it", url, describe(taker[0]))
                    return
                lease["expires"] = time.time() + ttl
                _write_lease(fs, path, lease)
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried; the lease lasts ttl
                log.warning("renewing the lease %s failed (%s); retrying", url, e)

    def ensure() -> None:
        try:  # read it now too: the renewer looks only every ttl/3
            current = _read_lease(fs, path)
        except Exception:  # noqa: BLE001 - unreadable now: what the renewer saw decides
            current = None
        if taken_over(current):
            raise LockHeld(
                f"{cfg.name}: {describe(taker[0])} took over this job's lease {url}, so this job published nothing; "
                "that job owns the model now: let it finish, then rerun this one if its day is still unpublished"
            )

    beat = threading.Thread(target=renew, name=f"mtrec-lease-{cfg.name}", daemon=True)
    beat.start()
    try:
        yield ensure
    finally:
        stop.set()
        beat.join(timeout=max(ttl, 30.0))
        try:  # a failed release must not hide the job's own error: the lease then expires by itself
            current = _read_lease(fs, path)
            if not beat.is_alive() and current and current.get("token") == token:
                fs.rm(path)
        except Exception as e:  # noqa: BLE001
            log.warning("releasing the lease %s failed (%s); it expires within %.0f s", url, e, ttl)
