"""Running it for real: `mtrec submit` to a two-node Ray cluster started with `ray start`.

The integration test starts a head (with the job server on 127.0.0.1) and a second node, each
with `ray start --block` in its own process group, token-authenticated; with logs and workdir on
an S3 server (`mtrec.testing.s3`), it submits a full retrain with 2 workers (one per node), then
two nightlies for the next day at once: exactly one trains (warm-started from the retrain's
checkpoint), the other exits 8 naming the holder of the lease. Both nodes are
stopped at the end, also on failure (not with `ray stop`, which would also kill the session's
local cluster and this pytest process with it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from conftest import DAY1
from test_ray_train import small_config

from mtrec.cli import remote as submit
from mtrec.data.synth import write_world
from mtrec.errors import ClusterError, ConfigError

BIN = Path(sys.executable).parent
DAY2, DAY3 = DAY1 + dt.timedelta(days=1), DAY1 + dt.timedelta(days=2)
ROWS = 4_001


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group; returns once the node is up."""
    fh = log.open("w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", *args],
        env=env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_node(proc)
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def _stop_node(proc: subprocess.Popen) -> None:
    """Stop one node and everything it started (its process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def two_node_cluster(tmp_path):
    """A real Ray cluster of two nodes on 127.0.0.1, the head with its job server, token auth;
    stopped afterwards. Yields (job server URL, env for clients)."""
    port, dash = _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_DISABLE_USAGE_STATS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # the jobs' `python` is this venv's
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # earlier tests' MLflow URIs stay in
        env.pop(var, None)  # os.environ (mlflow.set_tracking_uri exports it), and submit forwards them to the job
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    # each node's dashboard agent (which runs the submitted jobs) on a port of its own: the default
    # 52365 may be held by the other node, or by the session's local cluster when it started first
    agents = [f"--dashboard-agent-listen-port={_free_port()}" for _ in range(2)]
    # one temp dir per node, as on separate machines: two nodes sharing /tmp/ray would also share
    # (and garbage-collect) each other's unpacked job working dirs. Short paths: Ray's sockets live there.
    temps = [tempfile.mkdtemp(prefix="mr", dir="/tmp") for _ in range(2)]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(
            _start_node(
                [
                    "--head",
                    f"--port={port}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    f"--temp-dir={temps[0]}",
                    agents[0],
                    *common,
                ],
                env,
                tmp_path / "head.log",
            )
        )
        nodes.append(
            _start_node(
                [f"--address=127.0.0.1:{port}", f"--temp-dir={temps[1]}", agents[1], *common],
                env,
                tmp_path / "node2.log",
            )
        )
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while True:  # the job server comes up after the node reports itself started
            probe = subprocess.run(
                [str(BIN / "mtrec"), "submit", "--address", url, "--status", "none"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if "cannot reach the Ray job server" not in probe.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        yield url, env
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


@pytest.fixture
def world3(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cluster-world")
    write_world(str(root), days=3, rows_per_day=ROWS, seed=5, files_per_day=2)
    return str(root)


def _mtrec(env: dict, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mtrec"), *argv], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def s3_world(world3):
    """An S3 server (`mtrec.testing.s3`) holding world3 under s3://mtrec/world: the only storage
    the two nodes share, as on separate machines. Yields (server, logs URL)."""
    import s3fs

    from mtrec.testing.s3 import S3Server

    with S3Server() as s3:
        s3.make_bucket("mtrec")
        fs = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)
        fs.put(world3, "mtrec/world", recursive=True)
        yield s3, "s3://mtrec/world"


@pytest.mark.slow
@pytest.mark.integration
def test_submit_a_retrain_and_a_nightly_to_a_two_node_cluster(two_node_cluster, s3_world, tmp_path):
    """Logs, workdir (checkpoints, the lease) and MLflow's artifacts on S3; the endpoint reaches the
    job because `submit` forwards AWS_ENDPOINT_URL, the keys because they are named with --env."""
    url, env = two_node_cluster
    s3, logs = s3_world
    env = {**env, **s3.env()}
    workdir = "s3://mtrec/work"
    cfg = small_config(logs, workdir, placement="spread")
    d = cfg.model_dump(mode="json")
    d["tracking"].update(enabled=True, uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=f"{workdir}/mlartifacts")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(d))
    summary = tmp_path / "summary.json"
    keys = ["--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]

    # 1. full retrain of days 1-2 with 2 workers, through the job server
    p = _mtrec(
        env,
        "submit",
        "--address",
        url,
        *keys,
        "--",
        "train",
        "--config",
        str(path),
        "--from",
        str(DAY1),
        "--to",
        str(DAY2),
        "--log-every",
        "5",
        "--summary",
        str(summary),
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "submitted mtrec-train-2026-01-01-2026-01-02-" in out and "SUCCEEDED" in out
    assert "AWS_ENDPOINT_URL" in out and "AWS_SECRET_ACCESS_KEY" in out  # the env names sent, not the values
    assert "ray: joined cluster" in out and "2 node(s)" in out  # the job's own output, streamed
    s = json.loads(summary.read_text())
    assert s["rows"] == s["expected_rows"] == 2 * ROWS
    assert len({w["node_id"] for w in s["workers"]}) == 2 and all(
        w["rows"] > 0 for w in s["workers"]
    )  # one worker per node
    assert {r for t in s["plan"].values() for r in t["ranks"]} == {0, 1}
    assert pc.sum(pa.array([w["pad_steps"] for w in s["workers"]])).as_py() == abs(
        s["workers"][0]["batches"] - s["workers"][1]["batches"]
    )
    ckpt = f"{workdir}/checkpoints/{cfg.name}/dt={DAY2}"
    bucket = s3.client()
    assert s["checkpoint"] == ckpt
    assert bucket.head_object(Bucket="mtrec", Key=f"work/checkpoints/{cfg.name}/dt={DAY2}/_SUCCESS")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["mtrec.kind"] == "full_retrain"
        and run.data.tags["mtrec.checkpoint"] == ckpt
    )
    assert (
        run.data.params["world_size"] == "2" and 0 < run.data.metrics["eval/ctr/auc"] < 1
    )  # evaluated on day 3 (8k rows: no quality claim)
    assert run.info.artifact_uri.startswith(f"{workdir}/mlartifacts/")
    listed = bucket.list_objects_v2(Bucket="mtrec", Prefix=run.info.artifact_uri.removeprefix("s3://mtrec/"))
    assert listed["KeyCount"] > 0  # the artifacts are on the server

    # 2. two nightlies for day 3 at once: one trains (warm start from day 2), the other is refused
    nightly = [*keys, "--", "nightly", "--config", str(path), "--date", str(DAY3)]
    ids = []
    for _ in range(2):
        p = _mtrec(env, "submit", "--address", url, "--no-wait", *nightly, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        ids.append(p.stdout.strip().splitlines()[-1])
    results = [_mtrec(env, "submit", "--address", url, "--attach", i) for i in ids]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 8], [r.stdout[-2000:] + r.stderr[-2000:] for r in results]
    winner, loser = (ids[0], ids[1]) if results[0].returncode == 0 else (ids[1], ids[0])
    refused = next(r for r in results if r.returncode == 8)
    # the job's own output (its one error line) streamed on stdout, submit's status line on stderr
    assert (
        f"esmm_synth is being trained by `mtrec nightly {DAY3}`" in refused.stdout
        and f"Ray job {winner}" in refused.stdout
        and f"{workdir}/locks/esmm_synth.lock" in refused.stdout
    )
    assert f"job {loser} FAILED: mtrec exited 8" in refused.stderr
    body = bucket.get_object(Bucket="mtrec", Key=f"work/checkpoints/{cfg.name}/dt={DAY3}/manifest.json")["Body"]
    manifest = json.loads(body.read())
    assert manifest["parent"] == ckpt and manifest["days"] == [str(DAY3)]
    status = _mtrec(env, "submit", "--address", url, "--status", winner, timeout=60)
    assert status.returncode == 0 and f"{winner}: SUCCEEDED" in status.stdout


def test_submit_checks_the_command_before_sending_anything(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs the command to run after `--`"):
        submit.check_command([])
    with pytest.raises(ConfigError, match="`demo` cannot be submitted"):
        submit.check_command(["demo"])
    with pytest.raises(ConfigError, match="the command to submit does not parse: `mtrec nightly --bogus`"):
        submit.check_command(["nightly", "--bogus"])
    with pytest.raises(ConfigError, match="write every flag in full"):  # --conf would slip past the --config upload
        submit.check_command(["nightly", "--date", "yesterday", "--conf", "/x.yaml"])
    with pytest.raises(ConfigError, match="config file `/no/such.yaml` not found here"):
        submit.stage(["nightly", "--config", "/no/such.yaml", "--date", "yesterday"], True, tmp_path)
    with pytest.raises(ConfigError, match="--workdir work is a relative path: the job runs in another directory"):
        submit.check_command(["nightly", "--date", "yesterday", "--workdir", "work"])
    # the shipped example's job.logs is ./world: refused unless --logs is given
    with pytest.raises(ConfigError, match=r"the config's job.logs is the relative path './world'.* or pass --logs"):
        submit.stage(["nightly", "--config", "esmm", "--date", "yesterday", "--workdir", "/w"], False, tmp_path / "a")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="pass --address http://HEAD:8265"):
        submit.client(None)


def test_stage_uploads_the_code_and_the_config_file(tmp_path):
    cfgfile = tmp_path / "my.yaml"
    cfgfile.write_text(
        yaml.safe_dump(
            {
                **yaml.safe_load(Path(submit.__file__).parents[1].joinpath("configs/esmm.yaml").read_text()),
                "job": {"logs": "/data/logs", "workdir": "s3://bucket/work"},
            }
        )
    )
    into = tmp_path / "stage"
    into.mkdir()
    argv = submit.stage(["nightly", "--config", str(cfgfile), "--date", "yesterday"], False, into)
    assert argv == ["nightly", "--config", "_submit/my.yaml", "--date", "yesterday"]
    assert (into / "_submit/my.yaml").read_bytes() == cfgfile.read_bytes()
    assert (
        (into / "mtrec/cli").is_dir()
        and (into / "mtrec/jobs/nightly.py").exists()
        and not list(into.rglob("__pycache__"))
    )
    only_config = tmp_path / "installed"
    only_config.mkdir()
    assert (
        submit.stage(["train", f"--config={cfgfile}", "--from", "2026-01-01", "--to", "2026-01-02"], True, only_config)[
            1
        ]
        == "--config=_submit/my.yaml"
    )
    assert [p.name for p in only_config.iterdir()] == ["_submit"]


def test_a_port_with_403_in_it_is_not_an_authentication_failure(monkeypatch):
    import ray.job_submission

    # `client` turns token mode on for the whole process when a token file exists; this test
    # process also runs the session's local cluster, which has no token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")

    from mtrec.cli import remote
    from mtrec.errors import ClusterError

    def refuse(address):
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    with pytest.raises(ClusterError, match=r"^cannot reach the Ray job server at http://127.0.0.1:40393 "):
        remote.client("http://127.0.0.1:40393")

    def unauthorized(address):
        raise RuntimeError(f"Request to {address} failed with status 401 Unauthorized")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", unauthorized)
    with pytest.raises(ClusterError, match=r"refused the request .* set RAY_AUTH_TOKEN"):
        remote.client("http://127.0.0.1:40393")


def test_unreachable_job_server_is_one_line(capsys, monkeypatch):
    from mtrec.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as above

    port = _free_port()
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--status", "x"]) == 9
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"mtrec: error: cannot reach the Ray job server at http://127.0.0.1:{port}") and "\n" not in err
    )


class _FakeJobs:
    """The few JobSubmissionClient calls `attach` makes, scripted."""

    def __init__(self, *infos, on_tail=None):
        self.infos, self.on_tail, self.stopped = list(infos), on_tail, []

    def get_address(self):
        return "http://head:8265"

    def get_job_info(self, sid):
        if isinstance(self.infos[0], Exception):
            raise self.infos[0]
        return self.infos.pop(0) if len(self.infos) > 1 else self.infos[0]

    async def tail_job_logs(self, sid):
        for line in ("mtrec nightly esmm_synth: 2026-01-03\n", "done\n"):
            if self.on_tail:
                self.on_tail()
            yield line

    def stop_job(self, sid):
        self.stopped.append(sid)
        return True


def _info(status, code=None, message=""):
    from types import SimpleNamespace

    return SimpleNamespace(status=status, driver_exit_code=code, message=message, start_time=None, end_time=None)


def test_attach_exits_with_the_jobs_own_code(capsys, progress):
    assert submit.attach(_FakeJobs(_info("RUNNING"), _info("SUCCEEDED", 0)), "j1") == 0
    assert "mtrec nightly esmm_synth: 2026-01-03" in capsys.readouterr().out and progress()[-1] == "job j1 SUCCEEDED"
    assert submit.attach(_FakeJobs(_info("FAILED", 8)), "j2") == 8  # the lock: as the command itself exits
    assert progress()[-1] == "job j2 FAILED: mtrec exited 8"
    assert submit.attach(_FakeJobs(_info("FAILED", -9)), "j3") == 137  # OOM-killed driver: 128 + SIGKILL
    assert submit.attach(_FakeJobs(_info("STOPPED", None, "Job was intentionally stopped.")), "j4") == 9
    assert progress()[-1] == "job j4 STOPPED: Job was intentionally stopped."
    with pytest.raises(
        ClusterError, match=r"cannot read job nope at http://head:8265 \(Request failed with status code 404"
    ):
        submit.attach(_FakeJobs(RuntimeError("Request failed with status code 404: Job nope does not exist.")), "nope")


def test_sigterm_while_attached_stops_the_job(progress):
    """Kubernetes deleting the CronJob's pod (or its deadline) must not leave the job running: a
    retried pod would meet its orphan's lock."""
    before = signal.getsignal(signal.SIGTERM)
    jobs = _FakeJobs(_info("RUNNING"), on_tail=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert submit.attach(jobs, "j5") == 143
    assert jobs.stopped == ["j5"] and progress()[-1] == "terminated: stop requested for job j5"
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_a_job_server_whose_agent_is_starting_gets_the_job_on_a_later_try(monkeypatch):
    """Right after `ray start` the job server answers 500 "No available agent to submit job, please
    try again later": submit waits and tries again; any other refusal is one line at once."""
    import mtrec.retry
    from mtrec.cli import remote
    from mtrec.errors import ClusterError

    monkeypatch.setattr(mtrec.retry.time, "sleep", lambda s: None)  # the waits, not their length, are tested

    class Server(_FakeJobs):
        def __init__(self, *answers):
            super().__init__()
            self.answers, self.jobs = list(answers), []

        def submit_job(self, **job):
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            self.jobs.append(job["submission_id"])

    starting = RuntimeError(
        "Request failed with status code 500: No available agent to submit job, please try again later."
    )
    c = Server(starting, starting, None)
    remote.submit_job(c, submission_id="j1")
    assert c.jobs == ["j1"] and not c.answers
    c = Server(RuntimeError("Request failed with status code 400: runtime_env is invalid"), None)
    with pytest.raises(
        ClusterError, match=r"^the Ray job server at http://head:8265 refused the job \(.*status code 400"
    ):
        remote.submit_job(c, submission_id="j2")
    with pytest.raises(ClusterError, match="No available agent"):
        remote.submit_job(Server(*[starting] * 8), submission_id="j3")
