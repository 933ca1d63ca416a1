"""Above `tracking.max_pyfunc_mb` a job logs no pyfunc: the size it measures is the served model's
real tensor bytes (taken from the spec, no table allocated), the version it registers has no
pyfunc and says so in its tags, every path that loads the pyfunc refuses it in one line naming
--workers, and the batch path (`predict_on_workers`) scores it from its checkpoint."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import DAY1, without_floors

from mtrec.cli import main
from mtrec.config import EXAMPLES, load_config, parse_config
from mtrec.errors import ConfigError, NoPyfunc, TrackingError
from mtrec.models import build_model
from mtrec.serving import WEIGHTS, ServedModel
from mtrec.tracking.pyfunc import no_pyfunc_reason
from mtrec.tracking.record import MIB, ServedSize, served_bytes, served_size

DAY2 = DAY1 + dt.timedelta(days=1)


def shrunk(name: str, hash_size: int = 1000, **tracking):
    """Example config `name` with every table at most `hash_size` rows and `tracking` keys set."""
    d = load_config(name).model_dump(mode="json")
    for f in d["features"]["sparse"]:
        if f.get("hash_size"):
            f["hash_size"] = min(f["hash_size"], hash_size)
    for g in d["features"].get("sequences", []):
        for f in g["features"]:
            if f.get("hash_size"):
                f["hash_size"] = min(f["hash_size"], hash_size)
    d["tracking"].update(tracking)
    return parse_config(d)


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_size_is_the_served_artifacts_tensor_bytes(name, tmp_path):
    """`served_bytes` (tables on the meta device) equals the bytes of the tensors a real served
    model saves as its pyfunc's weights, shallow tower left out (esmm has one), shared tables
    counted once."""
    spec = shrunk(name).spec
    served = ServedModel(spec, build_model(spec.serving(), "cpu").state_dict())
    served.save(tmp_path)
    saved = torch.load(tmp_path / WEIGHTS, map_location="cpu", weights_only=True)
    assert served_bytes(spec) == tensor_bytes(saved) == tensor_bytes(served.model.state_dict())
    # of which the tables: hash_size x dim x 4 bytes each, a table that features share once
    tables = {k: v for k, v in saved.items() if ".embedding_bags." in k or ".embeddings." in k}
    assert tensor_bytes(tables) == sum(t.hash_size * t.dim * 4 for t in spec.features.tables().values())
    if spec.model.shallow_tower is not None:  # the training model is larger: it has the shallow tower
        assert tensor_bytes(build_model(spec, "cpu").state_dict()) > served_bytes(spec)


def test_the_size_of_tens_of_gib_of_tables_is_taken_without_allocating_them():
    """One table of 1G rows (tens of GiB of float32) is counted exactly, in a test process that
    could not hold it: each extra row of a table is its dim x 4 bytes, nothing else changes."""
    small = shrunk("esmm", hash_size=1000)
    d = small.model_dump(mode="json")
    d["features"]["sparse"][0]["hash_size"] = 1_000_000_000
    big = parse_config(d)
    table = small.spec.features.tables()[small.spec.features.sparse[0].name]
    extra = (1_000_000_000 - table.hash_size) * table.dim * 4
    assert served_bytes(big.spec) - served_bytes(small.spec) == extra
    size = served_size(big)
    assert size.mb > extra / MIB > 8192 and not size.pyfunc and size.tags()["mtrec.served_model"] == "none"


def test_the_limit_default_null_and_zero():
    cfg = load_config("esmm")
    assert cfg.tracking.max_pyfunc_mb == 8192
    assert served_size(cfg).pyfunc  # the example's ~16 MiB
    assert ServedSize(10_000.0, None).pyfunc and ServedSize(8192.0, 8192.0).pyfunc
    assert not ServedSize(8192.5, 8192.0).pyfunc and not ServedSize(0.01, 0.0).pyfunc
    assert ServedSize(1.0, None).tags() == {
        "mtrec.served_model": "pyfunc",
        "mtrec.served_model_mb": "1.0000",
        "mtrec.max_pyfunc_mb": "",
    }
    assert shrunk("esmm", max_pyfunc_mb=None).tracking.max_pyfunc_mb is None
    with pytest.raises(ConfigError, match="max_pyfunc_mb"):
        shrunk("esmm", max_pyfunc_mb=-1)


def test_the_refusal_is_one_line_naming_the_sizes_and_workers():
    tags = ServedSize(12_345.4, 8192.0).tags()
    msg = no_pyfunc_reason("models:/big/3", tags)
    assert msg == (
        "models:/big/3 has no pyfunc: its model's tensors (12,345 MiB) were above tracking.max_pyfunc_mb (8,192) "
        "when it was trained; score it from its checkpoint on Ray workers with --workers N "
        "(mtrec predict/evaluate/promote)"
    )
    assert no_pyfunc_reason("models:/big/3", ServedSize(1.0, 8192.0).tags()) is None
    assert no_pyfunc_reason("models:/big/3", {}) is None  # versions registered before the setting


def test_above_the_limit_start_served_starts_no_task_and_tags_the_run():
    """What every caller of `start_served` (a training job, `bn-check --recalibrate --workers`)
    gets above the limit: no Ray task (Ray is not running here), the decision on the run, an empty
    model URI from `finish_served`."""
    from mtrec.tracking.record import finish_served, start_served

    class Tags:
        def __init__(self):
            self.calls = []

        def set_tags(self, run_id, tags):
            self.calls.append((run_id, tags))

    cfg, tracker = shrunk("esmm", max_pyfunc_mb=0.01), Tags()
    assert start_served(tracker, "r1", cfg, "/nowhere", None) is None
    assert tracker.calls == [("r1", served_size(cfg).tags())] and tracker.calls[0][1]["mtrec.served_model"] == "none"
    assert finish_served(None, "r1") == ""


def test_a_run_without_pyfunc_registers_once_and_load_served_refuses_it(tmp_path):
    """The registry's side on the embedded store: a run recorded without a pyfunc gets a version
    whose source is the run's artifacts and whose tags say why; registering again finds it; the
    challenger alias moves as for any version; `load_served` refuses it by number and by alias. A
    run that has neither a model nor the tags is refused as before."""
    from mtrec.tracking import Tracker, load_served

    cfg = shrunk("esmm", max_pyfunc_mb=0.01, uri=f"sqlite:///{tmp_path}/mlflow.db")
    tracker = Tracker(cfg)
    run_id = tracker.start_run("train", [DAY1], "/ck/dt=2026-01-01", None, None)
    with pytest.raises(TrackingError, match="has no logged model"):
        tracker.register(run_id, "", "/ck/dt=2026-01-01", DAY1)
    tracker.set_tags(run_id, {"mtrec.model_uri": "", **served_size(cfg).tags()})
    version = tracker.register(run_id, "", "/ck/dt=2026-01-01", DAY1)
    assert tracker.register(run_id, "", "/ck/dt=2026-01-01", DAY1) == version
    found = tracker.client.search_model_versions(f"name = '{cfg.name}'")
    assert [str(v.version) for v in found] == [version] and found[0].source == f"runs:/{run_id}"
    assert found[0].tags["mtrec.served_model"] == "none" and found[0].tags["mtrec.checkpoint"] == "/ck/dt=2026-01-01"
    assert tracker.alias("challenger").version == version
    with pytest.raises(NoPyfunc, match=rf"^models:/{cfg.name}@challenger \(version {version}\) has no pyfunc"):
        load_served(f"models:/{cfg.name}@challenger")
    with pytest.raises(TrackingError, match="cannot load"):  # a version that is not there: as before
        load_served(f"models:/{cfg.name}/99")


def job_config(world: str, workdir: str):
    """A one-worker ESMM job on the session world, small tables, its limit a quarter of its size."""
    d = load_config("esmm", logs=world, workdir=workdir).model_dump(mode="json")
    d["train"].update(num_workers=1, batch_size=512)
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 5000)
    cfg = type(load_config("esmm")).model_validate(without_floors(d))
    d["tracking"]["max_pyfunc_mb"] = round(served_size(cfg).mb / 4, 4)
    return type(cfg).model_validate(d)


@pytest.mark.slow
def test_a_job_above_the_limit_registers_a_version_without_pyfunc_that_workers_score(
    ray_local, world, tmp_path, capsys
):
    from mtrec.jobs.predict import predict_on_workers, predict_to_parquet
    from mtrec.jobs.protocol import ensure_registered
    from mtrec.jobs.retrain import run_train
    from mtrec.shims import dcp_reader
    from mtrec.tracking import Tracker, load_served
    from mtrec.train import checkpoint

    cfg = job_config(world, str(tmp_path / "work"))
    size = served_size(cfg)
    assert not size.pyfunc
    s = run_train(cfg, DAY1, DAY1)
    run_id, version = s.mlflow["run_id"], s.mlflow["version"]
    client = mlflow.MlflowClient(s.mlflow["uri"], s.mlflow["uri"])

    # the measure is the checkpoint's model tensors, as training wrote them (shallow tower left out)
    meta = dcp_reader(s.checkpoint).read_metadata().state_dict_metadata
    model = {
        k: m
        for k, m in meta.items()
        if k.startswith("model.model.") and not k.startswith("model.model.shallow_tower.") and hasattr(m, "size")
    }
    written = sum(m.size.numel() * m.properties.dtype.itemsize for m in model.values())
    assert written == served_bytes(cfg.spec) == round(size.mb * MIB)

    # the run logged no model, and says why; the version has no pyfunc, tagged with the size and the limit
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mtrec.model_uri"] == "" == s.mlflow["model_uri"]
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    assert not client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    mv = client.get_model_version(cfg.name, version)
    want = {
        "mtrec.served_model": "none",
        "mtrec.served_model_mb": f"{size.mb:.4f}",
        "mtrec.max_pyfunc_mb": f"{cfg.tracking.max_pyfunc_mb:g}",
    }
    assert {k: mv.tags.get(k) for k in want} == want == {k: run.data.tags.get(k) for k in want}
    assert mv.tags["mtrec.checkpoint"] == s.checkpoint and mv.run_id == run_id
    assert mv.source == f"runs:/{run_id}"
    assert str(client.get_model_version_by_alias(cfg.name, "challenger").version) == version

    # every path that loads the pyfunc refuses it in one line naming --workers
    for uri in (f"models:/{cfg.name}/{version}", f"models:/{cfg.name}@challenger"):
        with pytest.raises(NoPyfunc) as err:
            load_served(uri)
        assert "has no pyfunc" in str(err.value) and "--workers N" in str(err.value)
        assert "\n" not in str(err.value) and str(err.value).startswith(uri)
    cfg_file = tmp_path / "big.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    uri = f"models:/{cfg.name}@challenger"
    argv = ["predict", "--config", str(cfg_file), "--date", str(DAY2), "--model", uri, "--out", str(tmp_path / "o.pq")]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"mtrec: error: {uri} (version {version}) has no pyfunc")
    assert "--workers N" in err[-1] and not any("Traceback" in line for line in err)
    with pytest.raises(NoPyfunc):
        predict_to_parquet(uri, world, DAY2, str(tmp_path / "one.parquet"))

    # the batch path scores it from its checkpoint, as the whole model in one process does
    out = predict_on_workers(cfg, uri, DAY2, str(tmp_path / "scores"))
    assert out["rows"] == 20_000 and out["checkpoint"] == s.checkpoint
    parts = pq.read_table(str(tmp_path / "scores")).sort_by("row_id")
    rows = pa.concat_tables(pq.read_table(p) for p in sorted((Path(world) / f"dt={DAY2}").glob("*.parquet")))
    rows = rows.sort_by("row_id")
    want = ServedModel.from_checkpoint(s.checkpoint).predict(rows)
    assert parts.column("row_id").equals(rows.column("row_id"))
    for k in ("ctr", "cvr", "ctcvr"):
        assert np.abs(parts.column(k).to_numpy() - want[k]).max() < 1e-6, k

    # registering again finds the version; a registration lost after the publish is completed without pyfunc
    assert Tracker(cfg).register(run_id, "", s.checkpoint, DAY1) == version
    client.delete_model_version(cfg.name, version)
    client.set_terminated(run_id, "RUNNING")
    again = ensure_registered(cfg, s.checkpoint)
    assert again != version and ensure_registered(cfg, s.checkpoint) == again
    found = client.search_model_versions(f"name = '{cfg.name}' and tags.`mtrec.run_id` = '{run_id}'")
    assert [str(v.version) for v in found] == [again] and found[0].tags["mtrec.served_model"] == "none"
    assert str(client.get_model_version_by_alias(cfg.name, "challenger").version) == again
    assert checkpoint.read_manifest(s.checkpoint)["mlflow_run_id"] == run_id

    # the gate at one worker scores it from its checkpoint (a Ray Train worker), as the whole model scores
    from mtrec.errors import GateRefused
    from mtrec.eval.evaluate import evaluate_days
    from mtrec.tracking import promote
    from mtrec.tracking.gate import gate_slice

    assert cfg.train.num_workers == 1
    with contextlib.suppress(GateRefused):  # promoted or refused: either way it was scored
        promote(cfg)
    gate = {k.removeprefix("gate/"): v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("gate/")}
    whole = ServedModel.from_checkpoint(s.checkpoint)
    want = evaluate_days(whole.model, whole.spec, world, gate_slice(cfg, Tracker(cfg).alias("challenger")))
    assert gate and set(gate) == set(want)
    for k, v in want.items():
        assert (np.isnan(v) and np.isnan(gate[k])) or abs(gate[k] - v) <= 1e-6, k
