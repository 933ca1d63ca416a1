"""`mtrec submit`'s client: run any mtrec job on a Ray cluster through the Ray Job Submission API.

    mtrec submit --address http://HEAD:8265 -- nightly --config my.yaml --date yesterday --promote

The command after `--` is checked here first (it must parse as an `mtrec` command, and every
local path it names must be absolute: the job runs in another directory, usually on another
machine). What is sent, as the job's runtime environment:

- a working dir holding the code this `mtrec` runs (the `mtrec` package, so the
  cluster runs exactly the submitter's version; `--installed` uses the cluster's own install
  instead) and the `--config` file when it is a local file (it is read on the cluster from the
  uploaded copy; URLs and the shipped examples are passed as they are);
- env vars: MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI and the store endpoints (MLFLOW_S3_ENDPOINT_URL,
  AWS_ENDPOINT_URL[_S3], AWS_REGION, AWS_DEFAULT_REGION) when set here, and each `--env KEY[=VALUE]`.

The job's driver runs `python -m mtrec.cli <command>` on the head node, joins the cluster (Ray sets
RAY_ADDRESS for it) and starts its Ray Train workers there. `submit` streams the job's output and
exits with the job's own exit code (0 when it SUCCEEDED; a refused gate gives 5, a held lock 8,
...), or 9 when the job never ran its command (runtime environment failed, stopped) or the job
server cannot be reached. `--no-wait` prints the submission id and returns; `--status ID`,
`--attach ID` (stream and wait) and `--stop ID` act on a submitted job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import getpass
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from mtrec.config import EXAMPLES, JobConfig, example_path
from mtrec.data.io import is_local, local_path
from mtrec.errors import ClusterError, ConfigError, first_line
from mtrec.retry import retry

log = logging.getLogger(__name__)

# what a job needs to reach the same stores as this shell; credentials are not forwarded unless
# named with --env (a cluster's nodes should have their own: an instance role, a mounted secret)
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
PATH_FLAGS = ("--logs", "--workdir", "--out", "--summary", "--checkpoint")
SUBMITTABLE = ("train", "nightly", "backfill", "evaluate", "predict", "promote", "bn-check", "validate", "synth")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STAGE_DIR = "_submit"


def _flag_values(argv: Sequence[str], flag: str) -> list[tuple[int, str]]:
    """(index of the value, value) of every `flag VALUE` / `flag=VALUE` in argv."""
    out = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out.append((i + 1, argv[i + 1]))
        elif a.startswith(flag + "="):
            out.append((i, a.split("=", 1)[1]))
    return out


def check_command(argv: Sequence[str]) -> argparse.Namespace:
    """The mtrec command to submit, parsed here so a typo fails before anything is sent.

    Raises:
        ConfigError: empty, not a job command, does not parse, or names a relative local path.
    """
    from mtrec.cli import build_parser

    argv = list(argv)
    if not argv:
        raise ConfigError(
            "mtrec submit needs the command to run after `--`, e.g. "
            "`mtrec submit --address http://HEAD:8265 -- nightly --config my.yaml --date yesterday`"
        )
    if argv[0] not in SUBMITTABLE:
        raise ConfigError(
            f"`{argv[0]}` cannot be submitted; submit one of: {', '.join(SUBMITTABLE)} "
            "(the command after `--` is an mtrec sub-command without the word `mtrec`)"
        )
    parser = build_parser(abbrev=False)  # flags in full: the checks and the --config rewrite below look for exact names
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise ConfigError(
            f"the command to submit does not parse: `mtrec {shlex.join(argv)}` (argparse's reason is printed above; "
            "write every flag in full); fix it and submit again"
        ) from None
    for flag in PATH_FLAGS:
        for _, value in _flag_values(argv, flag):
            if is_local(value) and not Path(local_path(value)).is_absolute():
                raise ConfigError(
                    f"{flag} {value} is a relative path: the job runs in another directory, "
                    "usually on another machine; "
                    "pass an absolute path on storage every node sees (a shared file system) or a URL such as s3://..."
                )
    return args


def _raw_config(source: str) -> dict:
    path = example_path(source) if source in EXAMPLES else Path(local_path(source))
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_config_paths(argv: Sequence[str], config: str) -> None:
    """A config whose job.logs / job.workdir (or their defaults) are relative local paths would
    resolve inside the job's working dir on the cluster: refuse unless the command overrides them."""
    if not is_local(config):  # file:// counts as local
        return  # read on the cluster; checked there
    job = _raw_config(config).get("job") or {}
    for key, flag in (("logs", "--logs"), ("workdir", "--workdir")):
        if _flag_values(argv, flag):
            continue
        value = job.get(key, JobConfig.model_fields[key].default)
        if isinstance(value, str) and is_local(value) and not Path(local_path(value)).expanduser().is_absolute():
            raise ConfigError(
                f"the config's job.{key} is the relative path {value!r}; on the cluster it would resolve inside the "
                f"job's working dir: set an absolute path or URL in the config, or pass {flag}"
            )


def stage(argv: Sequence[str], installed: bool, into: Path) -> list[str]:
    """Fill the working dir to upload; returns the command with `--config` pointing at the
    uploaded copy when it is a local file."""
    import mtrec

    argv = list(argv)
    if not installed:
        src = Path(mtrec.__file__).parent
        shutil.copytree(src, into / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    configs = _flag_values(argv, "--config") or [(-1, "esmm")]
    for i, value in configs if argv[0] != "synth" else []:
        local = local_path(value)
        if is_local(value) and value not in EXAMPLES and not Path(local).is_file():
            raise ConfigError(
                f"config file `{value}` not found here; pass an existing file, a URL, or a shipped example: "
                f"{', '.join(EXAMPLES)}"
            )
        _check_config_paths(argv, value)
        if i >= 0 and is_local(value) and Path(local).is_file():
            (into / STAGE_DIR).mkdir(exist_ok=True)
            shutil.copyfile(local, into / STAGE_DIR / Path(local).name)
            rel = f"{STAGE_DIR}/{Path(local).name}"
            argv[i] = rel if argv[i] == value else f"--config={rel}"
    return argv


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for item in items:
        key, eq, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE or KEY (taken from this shell's environment)")
        if not eq:
            if key not in os.environ:
                raise ConfigError(f"--env {key}: {key} is not set in this shell; pass --env {key}=VALUE")
            value = os.environ[key]
        env[key] = value
    return env


def submission_id(argv: Sequence[str]) -> str:
    days = [v for f in ("--date", "--from", "--to") for _, v in _flag_values(argv, f)]
    parts = ["mtrec", argv[0], *days, dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"), secrets.token_hex(3)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts))


def client(address: str | None):
    """A JobSubmissionClient for `address` (or RAY_ADDRESS when it is an http(s) URL)."""
    address = address or (
        os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None
    )
    if not address:
        raise ConfigError(
            "mtrec submit needs the Ray job server: pass --address http://HEAD:8265 (the head's dashboard port), "
            "or set RAY_ADDRESS to that URL"
        )
    if "://" not in address:
        address = f"http://{address}"
    # Ray 2.60 clusters authenticate with a token by default; the SDK sends one only in token mode
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    from mtrec.jobs.cluster import quiet_ray

    quiet_ray()  # after Ray's import, which sets its loggers up: the SDK's INFO lines are not the job's output
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - requests/aiohttp/Ray raise many kinds; one line for all
        first = first_line(e)
        # a status code, not digits of the address (a port such as 40393)
        if re.search(r"authenticat|unauthori[sz]ed|\b40[13]\b", str(e).replace(address, ""), re.I):
            raise ClusterError(
                f"the Ray job server at {address} refused the request ({first}): it needs the cluster's token; set "
                "RAY_AUTH_TOKEN to it (the head keeps it in ~/.ray/auth_token, or it is the RAY_AUTH_TOKEN the cluster "
                "was started with)"
            ) from None
        raise ClusterError(
            f"cannot reach the Ray job server at {address} ({first}); start the head with the dashboard "
            "(`ray start --head --dashboard-host 0.0.0.0`, port 8265 by default) or fix --address"
        ) from None


def submit(
    address: str | None,
    argv: Sequence[str],
    *,
    wait: bool = True,
    env: Sequence[str] = (),
    installed: bool = False,
    entrypoint_cpus: float = 0.0,
) -> int:
    """Submit `mtrec <argv>` as a Ray job; with `wait`, stream its output and return its exit code.

    Raises:
        ConfigError: the command or its paths are wrong (nothing was submitted).
        ClusterError: the job server cannot be reached.
    """
    argv = list(argv)
    check_command(argv)
    sid = submission_id(argv)
    env_vars = {"PYTHONUNBUFFERED": "1", **parse_env(env), "MTREC_SUBMISSION_ID": sid}  # named by a held lock
    c = client(address)
    with tempfile.TemporaryDirectory(prefix="mtrec-submit-") as tmp:
        sent = stage(argv, installed, Path(tmp))
        runtime_env: dict = {"env_vars": env_vars}
        if any(Path(tmp).iterdir()):
            runtime_env["working_dir"] = tmp
        submit_job(
            c,
            entrypoint=f"python -m mtrec.cli {shlex.join(sent)}",
            submission_id=sid,
            runtime_env=runtime_env,
            entrypoint_num_cpus=entrypoint_cpus,
            metadata={
                "mtrec_command": shlex.join(argv),
                "submitted_by": f"{getpass.getuser()}@{socket.gethostname()}",
            },
        )
    code = "uploaded" if not installed else "the cluster's installed mtrec"
    log.info(
        f"submitted {sid} to {c.get_address()}: mtrec {shlex.join(argv)} ({code}; env: {', '.join(sorted(env_vars))})"
    )
    if not wait:
        log.info(f"follow it: mtrec submit --address {c.get_address()} --attach {sid}   stop it: ... --stop {sid}")
        print(sid, flush=True)
        return 0
    return attach(c, sid)


# the job server's answer while its job agent is still starting (a head or node that just came up)
AGENT_NOT_READY = re.compile(r"no available agent|try again later", re.I)


def submit_job(c, tries: int = 8, **job) -> None:
    """`c.submit_job(**job)`, retried for about 30 s while the job server says its agent is not
    ready yet (a cluster that has just started); any other refusal at once.

    Raises:
        ClusterError: the job server refused the job (one line, with its reason).
    """
    try:
        retry(lambda: c.submit_job(**job), tries, 1.0, lambda e: bool(AGENT_NOT_READY.search(str(e))), factor=1.5)
    except Exception as e:  # noqa: BLE001
        raise ClusterError(f"the Ray job server at {c.get_address()} refused the job ({first_line(e)})") from None


def attach(c, sid: str) -> int:
    """Stream a job's output until it ends; its exit code (see module doc). SIGTERM (Kubernetes
    deleting the pod, a deadline, systemd stopping the unit) stops the job too, so a retried
    submission never meets its own orphan; Ctrl-C only stops waiting."""

    async def tail() -> None:
        async for lines in c.tail_job_logs(sid):
            print(lines, end="", flush=True)

    def terminated(_signum, _frame):
        raise _Terminated

    previous = (
        signal.signal(signal.SIGTERM, terminated) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        info = _job_info(c, sid)  # an unknown id fails here, before any streaming
        try:
            asyncio.run(tail())
        except _Terminated:
            raise
        except Exception as e:  # noqa: BLE001 - the log stream broke; the status below still decides
            log.info(f"(log stream interrupted: {type(e).__name__}; waiting for the job's status)")
        while (info := _job_info(c, sid, retries=30)).status not in TERMINAL:
            time.sleep(2.0)
    except KeyboardInterrupt:
        log.info(
            f"stopped waiting; job {sid} keeps running on the cluster. Stop it: "
            f"mtrec submit --address {c.get_address()} --stop {sid}"
        )
        return 130
    except _Terminated:
        with contextlib.suppress(Exception):
            c.stop_job(sid)
        log.info(f"terminated: stop requested for job {sid}")
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    status = str(info.status)
    if status == "SUCCEEDED":
        log.info(f"job {sid} SUCCEEDED")
        return 0
    code = info.driver_exit_code
    if status == "FAILED" and code:
        code = int(code) if code > 0 else 128 - int(code)  # killed by a signal: 128 + its number, as a shell reports it
        log.info(f"job {sid} FAILED: mtrec exited {code}")
        return code
    last = next(iter((info.message or "").strip().splitlines()[-1:]), "")
    log.info(f"job {sid} {status}: {last}")
    return ClusterError.exit_code


class _Terminated(BaseException):
    """SIGTERM while attached."""


def _job_info(c, sid: str, retries: int = 0):
    """The job's details; transient errors (a head restarting) are retried `retries` times, 2 s apart.

    Raises:
        ClusterError: no such job, or the job server stays unreachable.
    """

    def transient(e: Exception) -> bool:
        return "does not exist" not in str(e) and "404" not in str(e)

    try:
        return retry(lambda: c.get_job_info(sid), retries + 1, 2.0, transient, factor=1.0)
    except Exception as e:  # noqa: BLE001
        raise ClusterError(
            f"cannot read job {sid} at {c.get_address()} ({first_line(e)}); list jobs with "
            f"`ray job list --address {c.get_address()}`"
        ) from None


def status(address: str | None, sid: str) -> int:
    c = client(address)
    info = _job_info(c, sid)
    took = ""
    if info.start_time:
        end = info.end_time or time.time() * 1000
        took = f", {(end - info.start_time) / 1000:.0f}s"
    print(f"{sid}: {info.status}{took}; exit code {info.driver_exit_code}; {(info.message or '').strip()}")
    return 0


def stop(address: str | None, sid: str) -> int:
    c = client(address)
    try:
        stopped = c.stop_job(sid)
    except Exception as e:  # noqa: BLE001
        raise ClusterError(f"cannot stop {sid} at {c.get_address()} ({first_line(e)})") from None
    print(f"{sid}: {'stop requested' if stopped else 'not running (already ended)'}")
    return 0
