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
  a small JSON object with the holder, a random token and an expiry `job.lease_ttl_s` ahead, renewed
  by a background thread every third of it and deleted on release. A job that finds an unexpired
  lease of another holder exits; an expired one (its holder died without releasing) is taken
  over. Every write is conditional on the object being as the job last read it (its ETag):
  - `s3://` (AWS S3, MinIO, any store enforcing S3's conditional writes) and `memory://`: a lease
    is created with `If-None-Match: *` and renewed or taken over with `If-Match: <ETag read>`, so
    of two racing jobs the store lets exactly one write: two jobs can never both acquire the lease.
    Each acquisition checks that the store enforces this (a second create must fail) and refuses
    to run on one that ignores it (ConfigError, exit code 2).
  - Other object stores (`gs://`, `abfs://`, ...): best effort. The lease is checked before a
    write and read back after it, and a job gives way if another job's write won; two jobs
    starting within the same second could both pass (a warning says so, once per process).
    A scheduler that never starts two at once (Kubernetes `concurrencyPolicy: Forbid`, a systemd
    timer) is the first line there, the lock the second.

A job whose lease was taken over (it missed its renewals for `job.lease_ttl_s`, e.g. the store was
unreachable or the process was paused) must not publish over the new holder's work: the job
calls `ensure_held` right before publishing and fails there with exit code 8.

A job takes the lock once, for its whole run (a backfill for its whole range); a second
acquisition is refused like any other holder's, in the same process too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
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
from mtrec.data.io import filesystem, is_local_fs, join, protocols
from mtrec.errors import ConfigError, LockHeld

# the lease's lifetime when set (tests); else the config's `job.lease_ttl_s`
LEASE_TTL_S: float | None = None
# lock URL -> None for a flock (it cannot be lost), or for a lease the check that raises
# LockHeld once another job has taken it over (`ensure_held`)
_held: dict[str, Callable[[], None] | None] = {}
_guard = threading.Lock()
_memory_guard = threading.Lock()  # makes memory:// compare-and-swaps atomic (one process's store)
_warned: set[str] = set()  # protocols whose best-effort lease has been warned about
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


def _encode(lease: dict) -> bytes:
    return json.dumps(lease).encode()


def _decode(data: bytes) -> dict:
    try:
        lease = json.loads(data.decode())
    except ValueError:
        lease = None
    # torn or foreign content: an expired lease of nobody (no token)
    return lease if isinstance(lease, dict) else {"expires": 0}


def _etag(data: bytes) -> str:
    """A content ETag, as S3's for a single-part object, for stores that report none."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class _Store:
    """Compare-and-swap on one small object: all the lease needs of a store. `create` and
    `replace` return the new ETag, or None when their condition failed (the object exists / its
    ETag is no longer `etag`). `enforced`: the store itself refuses a write whose condition
    failed, so two racing jobs can never both succeed."""

    enforced = True

    def __init__(self, fs) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[dict | None, str | None]:
        """The lease and its ETag; (None, None) when there is none."""
        data, etag = self._get(path)
        return (None, None) if data is None else (_decode(data), etag)

    def _get(self, path: str) -> tuple[bytes | None, str | None]:
        raise NotImplementedError

    def create(self, path: str, body: bytes) -> str | None:
        raise NotImplementedError

    def replace(self, path: str, body: bytes, etag: str) -> str | None:
        raise NotImplementedError

    def delete(self, path: str, etag: str) -> bool:
        """Delete the object if its ETag is still `etag`; False when it was not."""
        raise NotImplementedError


def _s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind an exception: s3fs translates botocore's
    ClientError into OSError subclasses (a failed If-None-Match into FileExistsError, a failed
    If-Match into OSError(EINVAL)) with the ClientError as the cause."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        e = e.__cause__ or e.__context__
    return None, None


def _precondition_failed(exc: BaseException) -> bool:
    code, status = _s3_error(exc)
    return code == "PreconditionFailed" or status == 412 or (code is None and isinstance(exc, FileExistsError))


class _S3Store(_Store):
    """S3's conditional writes, by direct requests: no listing cache in between."""

    def _call(self, method: str, path: str, **kwargs) -> dict:
        bucket, key, _ = self.fs.split_path(path)
        for attempt in range(4):
            try:
                return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
            except Exception as e:
                # 409: another conditional write on this key is in flight; S3 asks the client to retry
                if _s3_error(e)[0] != "ConditionalRequestConflict":
                    raise
                time.sleep(0.1 * 2**attempt)
        return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)

    def _get(self, path: str) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:  # body and ETag of one response: they belong together
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def _put(self, path: str, body: bytes, **condition: str) -> str | None:
        try:
            return self._call("put_object", path, Body=body, **condition)["ETag"]
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise

    def create(self, path: str, body: bytes) -> str | None:
        return self._put(path, body, IfNoneMatch="*")

    def replace(self, path: str, body: bytes, etag: str) -> str | None:
        return self._put(path, body, IfMatch=etag)

    def delete(self, path: str, etag: str) -> bool:
        try:
            self._call("delete_object", path, IfMatch=etag)
        except FileNotFoundError:
            return False
        except Exception as e:
            if _precondition_failed(e):
                return False
            if _s3_error(e)[0] != "NotImplemented":
                raise
            # a store without conditional deletes: the caller has just read its token there
            self._call("delete_object", path)
        return True


class _MemoryStore(_Store):
    """fsspec's memory://, one process's store: each compare-and-swap runs under a lock."""

    def _current(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _get(self, path: str) -> tuple[bytes | None, str | None]:
        with _memory_guard:
            data = self._current(path)
        return data, None if data is None else _etag(data)

    def create(self, path: str, body: bytes) -> str | None:
        with _memory_guard:
            if self._current(path) is not None:
                return None
            self.fs.pipe_file(path, body)
        return _etag(body)

    def replace(self, path: str, body: bytes, etag: str) -> str | None:
        with _memory_guard:
            data = self._current(path)
            if data is None or _etag(data) != etag:
                return None
            self.fs.pipe_file(path, body)
        return _etag(body)

    def delete(self, path: str, etag: str) -> bool:
        with _memory_guard:
            data = self._current(path)
            if data is None or _etag(data) != etag:
                return False
            self.fs.rm_file(path)
        return True


class _ReadBackStore(_Store):
    """Any other object store: the condition is checked before the write and the write read back
    `settle` seconds after it. Best effort: two writers within that window can both pass the check."""

    enforced = False

    def __init__(self, fs, settle: float) -> None:
        super().__init__(fs)
        self.settle = settle

    def _get(self, path: str) -> tuple[bytes | None, str | None]:
        self.fs.invalidate_cache(path)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        return data, _etag(data)

    def _put(self, path: str, body: bytes) -> str | None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, body)
        time.sleep(self.settle)  # let a concurrent writer's object land, then see who won
        data, etag = self._get(path)
        return etag if data == body else None

    def create(self, path: str, body: bytes) -> str | None:
        return None if self._get(path)[0] is not None else self._put(path, body)

    def replace(self, path: str, body: bytes, etag: str) -> str | None:
        return self._put(path, body) if self._get(path)[1] == etag else None

    def delete(self, path: str, etag: str) -> bool:
        if self._get(path)[1] != etag:
            return False
        self.fs.rm(path)
        return True


def _store(fs, ttl: float) -> _Store:
    names = protocols(fs)
    if "s3" in names:
        return _S3Store(fs)
    if "memory" in names:
        return _MemoryStore(fs)
    with _guard:
        first = names[0] not in _warned
        _warned.add(names[0])
    if first:
        log.warning(
            "the model lock on %s:// is a best-effort lease (this store's conditional writes are not used): "
            "two jobs starting within a second could both hold it; let the scheduler never start two at once",
            names[0],
        )
    return _ReadBackStore(fs, settle=min(0.5, ttl / 10))


def _ignores_conditions(cfg: MtrecConfig, url: str) -> ConfigError:
    return ConfigError(
        f"{cfg.name}: the store of the lock {url} ignores conditional writes (If-None-Match), so mtrec refuses "
        "to run rather than risk two jobs writing the model at once; put job.workdir on a store that enforces "
        "them (AWS S3, MinIO) or on a shared file system"
    )


def _acquire(cfg: MtrecConfig, store: _Store, path: str, url: str, lease: dict) -> str:
    """Write our lease if there is none or an expired one; its ETag.

    Raises:
        LockHeld: another job holds it, or wrote it first.
        ConfigError: the store ignores conditional writes.
    """
    current, etag = store.read(path)
    if current is not None and current.get("expires", 0) > time.time():
        raise _refused(cfg, url, current.get("holder"))
    body = _encode(lease)
    # none: create it unless it exists by now; an expired (or torn) one: take it over unless it changed since read
    new = store.create(path, body) if current is None else store.replace(path, body, etag)
    if new is None:  # another job wrote first, or our write landed, its answer was lost and a retry failed
        current, new = store.read(path)
        if current is None or current.get("token") != lease["token"]:
            raise _refused(cfg, url, (current or {}).get("holder"))
    # the lease exists now: a create must fail, else the store ignores the condition and the lease is no lock
    probe = store.create(path, body) if store.enforced else None
    if probe is not None:
        try:
            store.delete(path, probe)
        except Exception as e:  # noqa: BLE001 - the refusal matters more; the lease then expires by itself
            log.warning("removing the lease %s failed (%s)", url, e)
        raise _ignores_conditions(cfg, url)
    return new


@contextmanager
def _lease(
    cfg: MtrecConfig, fs, path: str, url: str, job: str, ttl: float | None = None
) -> Iterator[Callable[[], None]]:
    ttl = ttl if ttl is not None else (LEASE_TTL_S or cfg.job.lease_ttl_s)
    store = _store(fs, ttl)
    token = secrets.token_hex(8)
    lease = {"token": token, "holder": _holder(job), "expires": time.time() + ttl}
    etag: str | None = _acquire(cfg, store, path, url, lease)  # of our last write; only the renewer changes it
    stop = threading.Event()
    taker: list[dict | None] = []  # the holder that took the lease over, once lost (the renewer and ensure() both look)

    def taken_over(current: dict | None) -> bool:
        with _guard:
            # another holder's lease (a torn or foreign file, without a token, is nobody's: not a takeover)
            if current is not None and current.get("token") not in (token, None) and not taker:
                taker.append(current.get("holder"))
            return bool(taker)

    def renew_once() -> bool:
        """Extend our lease if it is still ours; False once another job has taken it over."""
        nonlocal etag
        for _ in range(3):
            lease["expires"] = time.time() + ttl
            body = _encode(lease)
            new = store.create(path, body) if etag is None else store.replace(path, body, etag)
            if new is not None:
                etag = new
                return True
            current, etag = store.read(path)  # it changed since our last write: whose is it?
            if taken_over(current):  # never overwrite the new holder's lease
                return False
            # ours (a write whose answer was lost), nobody's (torn), or gone (etag None: create it): write again
        raise OSError("the lease object kept changing between this job's reads and writes")

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                if not renew_once():
                    log.warning("lost the lease %s to %s; not renewing it", url, describe(taker[0]))
                    return
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried; the lease lasts ttl
                log.warning("renewing the lease %s failed (%s); retrying", url, e)

    def ensure() -> None:
        try:  # read it now too: the renewer looks only every ttl/3
            current = store.read(path)[0]
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
            current, now = store.read(path)
            if not beat.is_alive() and current and current.get("token") == token:
                store.delete(path, now)  # only if unchanged since that read: never another job's lease
        except Exception as e:  # noqa: BLE001
            log.warning("releasing the lease %s failed (%s); it expires within %.0f s", url, e, ttl)
