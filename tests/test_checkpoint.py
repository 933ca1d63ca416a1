"""Checkpoints: DCP shards + manifest + _SUCCESS; exact round trip of weights and optimizer state;
unpublished, foreign or damaged checkpoints fail with one clear line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import torch
from conftest import DAY1
from test_train_eval import small

from mtrec.errors import CheckpointError
from mtrec.train import checkpoint as ck
from mtrec.train.local import build_sharded, train_days


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v.local_shards()[0].tensor if hasattr(v, "local_shards") else v


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):
    cfg = small(world).with_overrides(workdir=str(tmp_path_factory.mktemp("ckpt")))
    res = train_days(cfg, [DAY1])
    url = ck.checkpoint_url(cfg, DAY1)
    ck.save(
        res.dmp, res.optimizer, url, {"model": cfg.name, "config_fingerprint": cfg.fingerprint(), "date": str(DAY1)}
    )
    return cfg, res, url


def test_layout_and_success_marker_last(saved):
    cfg, _, url = saved
    files = sorted(p.name for p in Path(url).iterdir())
    assert files == [".metadata", "_SUCCESS", "__0_0.distcp", "manifest.json"]
    assert Path(url, "_SUCCESS").stat().st_mtime_ns >= Path(url, "manifest.json").stat().st_mtime_ns
    assert ck.published_days(cfg) == [DAY1]
    assert ck.latest_before(cfg, DAY1 + dt.timedelta(days=1)) == url


def test_round_trip_restores_weights_and_both_optimizers_exactly(saved):
    cfg, res, url = saved
    dmp, opt = build_sharded(cfg)
    ck.load(dmp, opt, url, cfg)
    before, after = dict(_flat(ck.state_to_save(res.dmp, res.optimizer))), dict(_flat(ck.state_to_save(dmp, opt)))
    assert before.keys() == after.keys()
    kinds = {k.split("/")[0] for k in before}
    assert kinds == {"model", "fused_optimizer", "dense_optimizer"}
    assert any(k.endswith("momentum1") for k in before)  # row-wise Adagrad state, not in model.state_dict()
    assert any(k.endswith("exp_avg_sq") for k in before)  # Adam state of the towers
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)


def test_unpublished_foreign_and_damaged_checkpoints_are_refused(saved, tmp_path):
    cfg, _, url = saved
    dmp, _ = build_sharded(cfg)
    with pytest.raises(CheckpointError, match="no published checkpoint of .* before 2026-01-01"):
        ck.latest_before(cfg, DAY1)
    with pytest.raises(CheckpointError, match="not a published checkpoint"):
        ck.load(dmp, None, str(tmp_path), cfg)
    other = cfg.model_copy(update={"name": "other_model"})
    with pytest.raises(CheckpointError, match="holds model 'esmm_synth', not 'other_model'"):
        ck.load(dmp, None, url, other)
    d = cfg.model_dump(mode="json")
    d["model"]["tower"] = [32]
    with pytest.raises(CheckpointError, match="another model shape"):
        ck.load(dmp, None, url, type(cfg).model_validate(d))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(url).iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".distcp" else data)
    with pytest.raises(CheckpointError, match="shards cannot be read .* damaged"):
        ck.load(dmp, None, str(broken), cfg)


def test_damaged_message_names_the_root_cause(saved, tmp_path):
    cfg, _, url = saved
    dmp, _ = build_sharded(cfg)
    for f in Path(url).iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".distcp" else f.read_bytes())
    with pytest.raises(CheckpointError) as e:
        ck.load(dmp, None, str(tmp_path), cfg)
    assert "RuntimeError: PytorchStreamReader failed reading zip archive" in str(e.value) and "\n" not in str(e.value)


def test_publish_is_atomic_locally_and_marker_last_on_an_object_store(saved, tmp_path):
    cfg, res, url = saved
    # local: a staged checkpoint replaces a published one in one rename; the old one stays whole until then
    target = str(tmp_path / "dt=2026-01-01")
    for n in (1, 2):
        staged = str(tmp_path / "_staging" / f"run{n}")
        ck.save(
            res.dmp,
            res.optimizer,
            staged,
            {"model": cfg.name, "config_fingerprint": cfg.fingerprint(), "run": n},
            marker=False,
        )
        assert not Path(staged, "_SUCCESS").exists()
        ck.publish(staged, target)
        assert ck.read_manifest(target)["run"] == n and not Path(staged).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_staging", "dt=2026-01-01"] and not any(
        (tmp_path / "_staging").iterdir()
    )
    # object store (fsspec memory://): copied object by object, then the marker
    staged, final = "memory://mtrec-test/_staging/run", "memory://mtrec-test/dt=2026-01-01"
    ck.save(res.dmp, res.optimizer, staged, {"model": cfg.name, "config_fingerprint": cfg.fingerprint()}, marker=False)
    with pytest.raises(CheckpointError, match="not a published checkpoint"):
        ck.read_manifest(staged)
    ck.publish(staged, final)
    assert ck.read_manifest(final)["model"] == cfg.name
    assert ck.max_abs_diff(ck.read_full(final), ck.read_full(url)) == (0.0, "")
    import fsspec

    assert not fsspec.filesystem("memory").exists("/mtrec-test/_staging/run")


def test_an_object_that_is_not_readable_whole_after_its_copy_is_never_covered_by_success(saved, monkeypatch):
    """The store answered a copy, but the object is not there whole: the day stays unpublished
    (no `_SUCCESS`), the error names the object, and the staged copy is kept for the rerun."""
    import fsspec

    cfg, res, _ = saved
    staged, final = "memory://mtrec-short/_staging/run", "memory://mtrec-short/dt=2026-01-01"
    ck.save(res.dmp, res.optimizer, staged, {"model": cfg.name}, marker=False)
    fs = fsspec.filesystem("memory")
    copy = type(fs).copy

    def short_copy(self, path1, path2, **kw):
        copy(self, path1, path2, **kw)
        if str(path2).endswith("manifest.json"):
            self.pipe_file(path2, self.cat_file(path2)[:-1])

    monkeypatch.setattr(type(fs), "copy", short_copy)
    with pytest.raises(CheckpointError, match=r"dt=2026-01-01/manifest.json holds \d+ bytes after the copy"):
        ck.publish(staged, final)
    assert not fs.exists("/mtrec-short/dt=2026-01-01/_SUCCESS") and fs.exists("/mtrec-short/_staging/run/manifest.json")


def test_a_force_run_that_died_between_renames_gets_the_old_checkpoint_back(saved, tmp_path):
    cfg, res, url = saved
    here = cfg.with_overrides(workdir=str(tmp_path / "work"))
    final = Path(ck.checkpoint_url(here, DAY1))
    final.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(url, final)
    staged = ck.staging_url(here, DAY1)
    ck.save(res.dmp, res.optimizer, staged, {"model": cfg.name}, marker=False)
    final.rename(staged + ".replaced")  # publish's first rename happened, the second did not
    assert ck.published_days(here) == []
    lines = ck.recover_staging(here, DAY1)
    assert lines[0].startswith("removed an unpublished staged checkpoint") and lines[1].startswith("restored ")
    assert ck.published_days(here) == [DAY1] and ck.read_manifest(str(final))["date"] == str(DAY1)
    assert not any(Path(ck.checkpoint_root(here), "_staging").iterdir())


def test_a_one_row_batch_trains_with_batchnorm(world):
    """A rank's last batch can hold a single row (uneven split, resumed day): BatchNorm cannot
    take batch statistics of one row, so that batch runs BatchNorm on its running statistics."""
    from mtrec.train.loop import train_stream
    from mtrec.train.stream import day_batches

    d = small(world).model_dump(mode="json")
    d["model"]["batch_norm"] = True
    cfg = type(small(world)).model_validate(d)
    dmp, opt = build_sharded(cfg)
    first = next(day_batches(cfg.spec, cfg.job.logs, [DAY1], 64))
    stats = train_stream(dmp, opt, [first, first.slice(0, 1)], cfg, torch.device("cpu"))
    assert (stats.rows, stats.batches) == (65, 2)
