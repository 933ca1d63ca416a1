"""`mtrec inspect position-bias`: the learned bias logits, read from a checkpoint as a user runs it."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import torch
import yaml

from mtrec.cli import main
from mtrec.config import load_config
from mtrec.eval.plots import spearman

DAY1 = dt.date(2026, 1, 1)


def _config(tmp_path, shallow_tower: dict | None) -> str:
    """A small mmoe config (bias features position x10, device x2) written to tmp_path; its path."""
    d = load_config("mmoe", workdir=str(tmp_path / "work")).model_dump(mode="json")
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 1_000)
    d["model"]["shallow_tower"] = shallow_tower
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> str:
    """A published checkpoint whose shallow tower computes logit = -0.5 position + device + 0.25
    (1-wide embeddings, no hidden layer), under the config's checkpoint root; the config's path."""
    from mtrec.train import checkpoint
    from mtrec.train.local import build_sharded

    tmp = tmp_path_factory.mktemp("inspect")
    config = _config(tmp, {"hidden": [], "dim": 1, "apply_to": ["ctr"]})
    cfg = load_config(config)
    dmp, opt = build_sharded(cfg)
    tower = dmp.module.model.shallow_tower
    with torch.no_grad():
        tower.embeddings[0].weight.copy_(-0.5 * torch.arange(10.0).unsqueeze(1))  # position 0..9
        tower.embeddings[1].weight.copy_(torch.tensor([[0.0], [1.0]]))  # device 0, 1
        tower.tower.out.weight.fill_(1.0)
        tower.tower.out.bias.fill_(0.25)
    checkpoint.save(
        dmp, opt, checkpoint.checkpoint_url(cfg, DAY1), {**checkpoint.spec_manifest(cfg), "date": "2026-01-01"}
    )
    return config


def test_the_curve_per_bias_feature_averaged_or_held_and_its_spearman(published, capsys):
    code = main(["inspect", "position-bias", "--config", published, "--json"])  # the newest published checkpoint
    out, err = capsys.readouterr()
    assert code == 0
    got = json.loads(out)
    assert got["date"] == "2026-01-01" and got["checkpoint"].endswith("dt=2026-01-01") and got["tasks"] == ["ctr"]
    # averaged over device (0 and 1): -0.5 p + 0.75; device averaged over positions 0..9: d - 2.0
    np.testing.assert_allclose(got["logits"]["position"], [-0.5 * p + 0.75 for p in range(10)], atol=1e-6)
    np.testing.assert_allclose(got["logits"]["device"], [-2.0, -1.0], atol=1e-6)
    assert got["spearman"] == pytest.approx(-1.0) and got["by"] == {} and got["position_feature"] == "position"
    assert "position (device averaged over its 2 values):" in err
    assert "       0   +0.750   +0.000        0.47x" in err  # value, logit, vs 0, served/here = exp(-0.75)
    assert "       9   -3.750   -4.500       42.52x" in err
    assert "Spearman of the logit vs position: -1.000" in err

    code = main(["inspect", "position-bias", "--config", published, "--by", "device=1", "--json"])
    out, err = capsys.readouterr()
    got = json.loads(out)
    np.testing.assert_allclose(got["logits"]["position"], [-0.5 * p + 1.25 for p in range(10)], atol=1e-6)
    assert list(got["logits"]) == ["position"] and got["by"] == {"device": 1}
    assert "position (device = 1):" in err and "device averaged" not in err


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--by", "devise=1"], "--by 'devise=1': expected FEATURE=VALUE with FEATURE one of position, device"),
        (["--by", "device=2"], "--by device=2: device takes values 0..1 (num_values: 2)"),
        (["--by", "device=1", "--by", "position=0"], "--by holds every bias feature (position, device)"),
        (["--model", "runs:/abc/model", "--checkpoint", "x"], "pass --model or --checkpoint, not both"),
    ],
)
def test_bad_flags_are_one_line(published, capsys, argv, text):
    assert main(["inspect", "position-bias", "--config", published, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrec: error: ") and text in err and err.count("\n") == 1


def test_a_model_without_a_shallow_tower_is_one_line(published, tmp_path, capsys):
    """Its checkpoint's spec says so before any tensor is read (the checkpoint here holds none)."""
    from mtrec.train import checkpoint

    cfg = load_config(_config(tmp_path, None))
    url = str(tmp_path / "ck")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / checkpoint.MANIFEST).write_text(json.dumps(checkpoint.spec_manifest(cfg)))
    (tmp_path / "ck" / checkpoint.SUCCESS).write_text("")
    assert main(["inspect", "position-bias", "--config", published, "--checkpoint", url]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mtrec: error: mmoe_synth ({url}) has no shallow tower, so it learned no position bias; "
        "add `model.shallow_tower` to the config and retrain to learn one\n"
    )


def test_spearman_ranks_ties_by_their_mean():
    assert spearman([3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([0.0, -1.0, -1.0, -3.0]) == pytest.approx(-0.9486832980505138)  # scipy.stats.spearmanr
    assert np.isnan(spearman([1.0, 1.0])) and np.isnan(spearman([1.0]))


@pytest.mark.slow  # logs and registers a model in MLflow
def test_a_registered_version_is_read_from_its_checkpoint(published, capsys, monkeypatch):
    """--model names a registered version: its served model has no shallow tower, so the curve
    comes from the checkpoint the version was published from; a URI that is no version is refused."""
    from mtrec.serving import ServedModel
    from mtrec.tracking import Tracker
    from mtrec.train import checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(published)
    url = checkpoint.checkpoint_url(cfg, DAY1)
    tracker = Tracker(cfg)
    run_id = tracker.start_run("nightly", [DAY1], url, None, None)
    model_uri = tracker.log_model(run_id, ServedModel.from_checkpoint(url), None)
    assert tracker.register(run_id, model_uri, url, DAY1) == "1"
    capsys.readouterr()
    args = ["inspect", "position-bias", "--config", published, "--json", "--model"]
    assert main([*args, "models:/mmoe_synth@challenger"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["checkpoint"] == url
    np.testing.assert_allclose(got["logits"]["position"], [-0.5 * p + 0.75 for p in range(10)], atol=1e-6)
    assert main([*args, model_uri]) == 2
    assert f"--model {model_uri} is not registered; the served model has no shallow tower" in capsys.readouterr().err
    assert main([*args, "models:/mmoe_synth@champion"]) == 2
    assert "names no version (the alias is not set)" in capsys.readouterr().err
