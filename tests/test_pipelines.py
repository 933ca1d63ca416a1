"""The Python entry points for schedulers (pipelines/): the jobs' own checks and errors."""

import pytest

import pipelines
from mtrec.errors import CheckpointError, ConfigError


def test_nightly_from_python_refuses_before_anything_runs(world, tmp_path):
    """The job's own checks and errors, as the command line meets them (nothing trained, no Ray)."""
    with pytest.raises(CheckpointError, match="no published checkpoint of esmm_synth before 2026-01-09") as e:
        pipelines.nightly("esmm", "2026-01-09", logs=world, workdir=str(tmp_path / "work"), promote=False)
    assert e.value.exit_code == 4  # what `mtrec nightly` would exit with
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_retrain_from_python_checks_its_range(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--to 2026-01-01 is before --from 2026-01-02"):
        pipelines.retrain("esmm", "2026-01-02", "2026-01-01")
