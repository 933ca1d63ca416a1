"""Jobs on a real S3 server (moto's, in its own process, behind a proxy that counts requests and
can fail or hold them: `mtrec.testing.s3`): logs, quarantine, intra-day and published
checkpoints, the lease and MLflow's artifacts all on `s3://`, with the results of the same jobs
on a local disk."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import without_floors

from mtrec.config import load_config, parse_config
from mtrec.data.io import filesystem
from mtrec.data.synth import write_world
from mtrec.errors import ConfigError, GateRefused, MtrecError
from mtrec.jobs.plan import RunOptions
from mtrec.testing.s3 import S3Server
from mtrec.train import checkpoint as ck

DAY1, DAY2, DAY3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)
ROWS = 6_000
BAD = 5  # rows of day 2 whose conversion has no click: quarantined
BUCKET = "mtrec"


@pytest.fixture(scope="module")
def s3():
    """One S3 server for the module, bucket `mtrec`; this process's AWS environment points at it
    (the standard way, read by s3fs and by MLflow's boto3)."""
    import copy

    import fsspec

    conf = copy.deepcopy(fsspec.config.conf)  # the jobs apply job.storage_options to this process
    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for k, v in server.env().items():
            mp.setenv(k, v)
        server.make_bucket(BUCKET)
        yield server
    fsspec.config.conf.clear()
    fsspec.config.conf.update(conf)


@pytest.fixture(scope="module")
def worlds(s3, tmp_path_factory) -> tuple[str, str]:
    """3 days x 6,000 rows in 3 files a day, day 2 with BAD rows to quarantine: (local root, the
    same files uploaded to s3://mtrec/world)."""
    root = tmp_path_factory.mktemp("s3-world")
    write_world(str(root), days=3, rows_per_day=ROWS, seed=21, files_per_day=3)
    f = root / f"dt={DAY2}" / "part-00001.parquet"
    t = pq.read_table(f)
    conv = t.column("conversion").to_numpy().copy()
    conv[np.flatnonzero(t.column("click").to_numpy() == 0)[:BAD]] = 1
    pq.write_table(t.set_column(t.schema.get_field_index("conversion"), "conversion", pa.array(conv, pa.int8())), f)
    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.put(str(root), f"{BUCKET}/world", recursive=True)
    return str(root), f"s3://{BUCKET}/world"


def job_config(logs: str, workdir: str, db, s3: S3Server | None = None, **train):
    """A small ESMM job: MLflow's store a local sqlite file `db`, its artifacts in the workdir; on
    S3 the endpoint and keys also as fsspec storage options (Ray workers that started before this
    test have no AWS environment) and a short lease."""
    d = load_config("esmm", logs=logs, workdir=workdir).model_dump(mode="json")
    d["train"].update({"batch_size": 256, "num_workers": 2, "checkpoint_every_batches": 10, **train})
    d["model"]["batch_norm"] = False  # each worker normalises its own batch: 2 vs 1 worker differ
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 20_000)
    d["tracking"].update(uri=f"sqlite:///{db}", artifacts=f"{workdir}/mlartifacts")
    if s3 is not None:
        d["job"]["storage_options"] = {"s3": s3.storage_options()}
        d["job"]["lease_ttl_s"] = 6
    return parse_config(without_floors(d))


def _chain(cfg, kill: bool, monkeypatch):
    """Day 1 on 2 workers; day 2 a nightly on 1 worker (DCP reshards the warm start), first killed
    mid-day when `kill` (its rerun resumes from the intra-day checkpoint); then the gate on day 3."""
    from mtrec.jobs.nightly import run_nightly
    from mtrec.jobs.retrain import run_train
    from mtrec.tracking import promote

    first = run_train(cfg, DAY1, DAY1)
    one = cfg.with_train(num_workers=1, sharding_types=["table_wise"])
    if kill:
        monkeypatch.setenv("MTREC_KILL_WORKER", "0:15")  # after 15 batches: the step-10 checkpoint exists
        with pytest.raises(MtrecError, match=r"worker 0 .*died.*resumes from s3://mtrec/.*step-00000010"):
            run_nightly(one.with_train(max_failures=0), DAY2)
        monkeypatch.delenv("MTREC_KILL_WORKER")
    (second,) = run_nightly(one, DAY2)
    try:
        d = promote(one)
        gate = ("promoted" if d.promoted else "kept", d.champion, d.figures)
    except GateRefused as e:
        gate = ("refused", str(e))
    return first, second, gate


@pytest.mark.slow
@pytest.mark.integration
def test_train_nightly_resume_publish_and_gate_on_s3_equal_local_disk(ray_local, s3, worlds, tmp_path, monkeypatch):
    """The same jobs with logs, workdir and MLflow artifacts on S3, with 5% of the requests failing
    (503 SlowDown), 1% done but unanswered, and the nightly killed once mid-day, give what they
    give on a local disk: the same rows, quarantine, metrics, gate decision and bit-identical
    checkpoints."""
    local = job_config(worlds[0], str(tmp_path / "work"), tmp_path / "local.db")
    remote = job_config(worlds[1], f"s3://{BUCKET}/work", tmp_path / "s3.db", s3)
    want = _chain(local, False, monkeypatch)
    s3.reset_counts()
    s3.set_faults(0.05, seed=7, lose=0.01)  # 5% fail (503); 1% are done but their answer is lost
    try:
        got = _chain(remote, True, monkeypatch)
    finally:
        s3.set_faults(0.0)
    counts = s3.counts()
    assert counts["failed"] > 20 and counts["lost"] > 3, counts
    assert min(counts["GET"], counts["PUT"], counts["HEAD"]) > 50, counts  # the faults hit every kind of request

    for w, g in zip(want[:2], got[:2], strict=True):
        assert (g.rows, g.input_rows, g.quarantined_rows) == (w.rows, w.input_rows, w.quarantined_rows)
        assert g.mlflow["metrics"] == w.mlflow["metrics"] and g.mlflow["eval_day"] == w.mlflow["eval_day"]
        assert g.checkpoint.startswith(f"s3://{BUCKET}/work/checkpoints/")
        diff, where = ck.max_abs_diff(ck.read_full(g.checkpoint), ck.read_full(w.checkpoint))
        assert diff == 0.0, f"{g.checkpoint}: max abs diff {diff} at {where}"
    assert got[1].quarantined_rows == BAD and got[1].resumed["step"] == 10 and got[1].kind == "nightly"
    assert got[1].parent == got[0].checkpoint
    assert got[2] == want[2]  # the gate's decision and figures, on day 3

    fs, _ = filesystem(f"s3://{BUCKET}")
    quarantined = {p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/work/quarantine/dt={DAY2}")}
    assert quarantined == {p.name for p in (tmp_path / "work" / "quarantine" / f"dt={DAY2}").iterdir()}
    with fs.open(f"{BUCKET}/work/quarantine/dt={DAY2}/part-00001.parquet", "rb") as f:
        rows = pq.read_table(f)
    assert rows.equals(pq.read_table(tmp_path / "work" / "quarantine" / f"dt={DAY2}" / "part-00001.parquet"))
    assert rows.num_rows == BAD
    assert not fs.exists(f"{BUCKET}/work/checkpoints/esmm_synth/_partial/dt={DAY2}")  # pruned at publish
    assert sorted(ck.published_days(remote)) == [DAY1, DAY2]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 's3.db'}")
    run = client.get_run(got[1].mlflow["run_id"])
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/work/mlartifacts/")
    assert {"config.json", "manifest.json", "plots"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    assert fs.find(run.info.artifact_uri.removeprefix("s3://"))  # the objects are on the server
    # the keys in job.storage_options reach every process, never a record
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    assert run.data.params["job.storage_options.s3.secret"] == "<redacted>"
    assert secret not in str(ck.read_manifest(got[1].checkpoint)) and secret not in str(run.data.params)


def test_a_missing_or_denied_bucket_is_one_line_and_nothing_is_written(s3, worlds, tmp_path):
    """Refused before anything is written, the bucket named: the S3 client would otherwise create
    a missing one on the first write."""
    from mtrec.jobs.nightly import run_nightly
    from mtrec.jobs.retrain import run_train

    before = {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
    cfg = job_config(worlds[1], "s3://no-such-bucket/work", tmp_path / "m.db", s3)
    with pytest.raises(ConfigError, match=r"^job.workdir s3://no-such-bucket/work: bucket no-such-bucket does not ex"):
        run_nightly(cfg, DAY2, RunOptions(cold_start=True))
    with pytest.raises(ConfigError, match="bucket no-such-bucket does not exist"):
        run_train(cfg, DAY1, DAY1)
    logs = job_config("s3://no-such-logs/world", f"s3://{BUCKET}/other", tmp_path / "m.db", s3)
    with pytest.raises(MtrecError, match=r"^the logs root s3://no-such-logs/world does not exist"):
        run_train(logs, DAY1, DAY1)
    assert {b["Name"] for b in s3.client().list_buckets()["Buckets"]} == before
    fs, _ = filesystem(f"s3://{BUCKET}")
    assert not fs.exists(f"{BUCKET}/other/checkpoints")
    s3.make_bucket("no-access")
    s3.deny("/no-access")  # as a bucket policy that does not grant these credentials would
    try:
        denied = job_config(worlds[1], "s3://no-access/work", tmp_path / "m.db", s3)
        with pytest.raises(ConfigError, match=r"^job.workdir s3://no-access/work: access to bucket no-access is den"):
            run_nightly(denied, DAY2, RunOptions(cold_start=True))
    finally:
        s3.deny()


@pytest.mark.slow
@pytest.mark.integration
def test_a_writer_killed_between_objects_of_a_publish_is_repaired_by_the_next_run(ray_local, s3, worlds, tmp_path):
    """`mtrec nightly` SIGKILLed while it copies the day's checkpoint into dt=D/ (the server holds
    its next request): no reader accepts the half-copied day; the next run, once the dead job's
    lease has expired, trains the day again and publishes it whole."""
    cfg = job_config(worlds[1], f"s3://{BUCKET}/killed", tmp_path / "k.db", s3, num_workers=1)
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    import ray

    # the jobs join the session's Ray cluster (a driver killed there takes only its own job along)
    env = {**os.environ, **s3.env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    day = f"{BUCKET}/killed/checkpoints/esmm_synth/dt={DAY1}/"
    s3.hold(f"/{day}", after=3)  # the old marker's check and two objects pass, the third copy hangs
    argv = [sys.executable, "-m", "mtrec.cli", "nightly", "--config", str(cfg_file), "--date", str(DAY1)]
    proc = subprocess.Popen([*argv, "--cold-start"], env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while s3.counts().get("held", 0) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert s3.counts().get("held", 0) >= 1, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        s3.release()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    fs, _ = filesystem(f"s3://{BUCKET}")
    half = fs.find(day)
    assert half and not any(p.endswith("/_SUCCESS") for p in half)  # copied objects, no marker
    assert ck.published_days(cfg) == []
    with pytest.raises(MtrecError, match="is not a published checkpoint"):
        ck.read_manifest(f"s3://{day}")

    time.sleep(cfg.job.lease_ttl_s)  # the killed job's lease expires
    r = subprocess.run([*argv, "--cold-start"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ck.published_days(cfg) == [DAY1]
    staged = fs.find(f"{BUCKET}/killed/checkpoints/esmm_synth/_staging")
    assert staged == []  # the dead job's staged copy was cleaned up
    man = ck.read_manifest(f"s3://{day}")
    assert man["rows_trained"] == ROWS and fs.exists(f"{day}_SUCCESS")


@pytest.mark.slow
@pytest.mark.integration
def test_a_job_opens_each_file_once_for_its_footer_and_once_for_its_rows(ray_local, s3, worlds, tmp_path):
    """A job training day 2 (BAD rows to quarantine) and scoring day 3, on S3, 2 workers: every
    log file of both days is opened exactly twice (each s3fs open is one HEAD): once for its
    footer, the cheap check before Ray starts, and once by the read that validates, quarantines
    and trains (day 2) or scores (day 3) its rows. Validation counts and quarantine come from that
    read and stay exact."""
    from mtrec.jobs.retrain import run_train

    _, logs = worlds
    cfg = job_config(logs, f"s3://{BUCKET}/opens", tmp_path / "mlflow.db", s3)
    s3.reset_counts()
    s = run_train(cfg, DAY2, DAY2)
    heads = [unquote(urlsplit(p).path) for _, m, p in s3.requests() if m == "HEAD"]
    opened = Counter(p for p in heads if p.startswith(f"/{BUCKET}/world/dt="))
    want = {f"/{BUCKET}/world/dt={d}/part-{i:05d}.parquet": 2 for d in (DAY2, DAY3) for i in range(3)}
    assert dict(opened) == want
    assert (s.input_rows, s.quarantined_rows, s.rows) == (ROWS, BAD, ROWS - BAD)
    assert s.mlflow["eval_day"] == str(DAY3) and s.mlflow["metrics"]["ctr/auc"] > 0
    fs, _ = filesystem(f"s3://{BUCKET}")
    assert fs.find(f"{BUCKET}/opens/quarantine/dt={DAY2}") == [
        f"{BUCKET}/opens/quarantine/dt={DAY2}/_report.json",
        f"{BUCKET}/opens/quarantine/dt={DAY2}/part-00001.parquet",
    ]
    with fs.open(f"{BUCKET}/opens/quarantine/dt={DAY2}/part-00001.parquet", "rb") as f:
        bad = pq.read_table(f)
    assert bad.num_rows == BAD and set(bad.column("reason").to_pylist()) == {"conversion_without_click"}
