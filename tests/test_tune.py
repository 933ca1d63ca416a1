"""`mtrec tune`: the search-space file and its one-line errors, dotted overrides, a real 2-trial
search (Ray Tune -> trials of Ray Train jobs -> MLflow parent and child runs -> best.yaml), and a
search killed mid-way that resumes instead of starting over."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DAY1

from mtrec.cli import main
from mtrec.config import apply_override, load_config, parse_config, set_key
from mtrec.data.synth import write_world
from mtrec.errors import ConfigError, DataValidationError
from mtrec.jobs.tune import (
    TuneOptions,
    best_config,
    check_search,
    load_space,
    run_tune,
    search_folder,
    search_tracker,
    trial_config,
)

DAY2 = DAY1 + dt.timedelta(days=1)
DAY3 = DAY1 + dt.timedelta(days=2)

SMALL = {
    "name": "tune_t",
    "labels": {"click": "binary", "conversion": "binary"},
    "features": {
        "sparse": [
            {"name": "user_id", "hash_size": 2000, "dim": 8},
            {"name": "item_id", "hash_size": 1000, "dim": 8},
            {"name": "item_category", "hash_size": 128, "dim": 8},
        ],
        "dense": [{"name": "item_price", "log1p": True}],
    },
    "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "given": "ctr"}],
    "model": {"arch": "esmm", "tower": [16]},
    "train": {"batch_size": 256, "num_workers": 1, "checkpoint_every_batches": 10_000},
    "job": {"logs": "./world", "workdir": "./work"},
}
SPACE = {
    "metric": "ctr/auc",
    "trials": 2,
    "seed": 1,
    "space": {
        "train.dense_optimizer.lr": {"loguniform": [0.0003, 0.03]},
        "features.sparse.*.dim": {"choice": [4, 8]},
    },
}


def _space(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# dotted keys (mtrec.config.set_key / apply_override)


def test_set_key_reaches_lists_by_wildcard_and_index():
    d = {"features": {"sparse": [{"name": "a", "dim": 16}, {"name": "b", "dim": 8}]}, "tasks": [{"name": "ctr"}]}
    assert set_key(d, "features.sparse.*.dim", 4) == 2
    assert [f["dim"] for f in d["features"]["sparse"]] == [4, 4]
    assert set_key(d, "tasks.0.weight", 0.5) == 1 and d["tasks"][0]["weight"] == 0.5
    set_key(d, "train.dense_optimizer.lr", 0.01)  # missing mappings are created; parse_config judges the key
    assert d["train"] == {"dense_optimizer": {"lr": 0.01}}
    apply_override(d, "features.sparse.1.dim=x3")
    apply_override(d, "model.tower=[64, 32]")
    assert d["features"]["sparse"][1]["dim"] == 12 and d["model"]["tower"] == [64, 32]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("tasks.3.weight", r"`tasks` is a list of 1; use an index 0..0 or `\*`"),
        ("tasks.0.name.x", r"`tasks.0.name` holds 'ctr', not a mapping or list"),
        ("features.dense.*.log1p", r"`\*` needs a non-empty list or mapping at `features.dense`"),
        ("features..dim", "expected a dotted config key"),
    ],
)
def test_bad_keys_fail_in_one_line(key, message):
    d = {"tasks": [{"name": "ctr"}], "features": {"dense": []}}
    with pytest.raises(ConfigError, match=message):
        set_key(d, key, 1)
    with pytest.raises(ConfigError, match=r"x2 multiplies a number, but `tasks.0.name` holds 'ctr'"):
        apply_override(d, "tasks.0.name=x2")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override(d, "tasks.0.name")


# --------------------------------------------------------------------------------------------------
# the space file


def test_the_shipped_space_fits_the_esmm_example():
    space = load_space("tune_esmm")
    assert space.metric == "ctr/auc" and space.direction() == "max" and space.trials == 8
    assert space.space["model.tower"].extremes() == [[256, 128, 64], [128, 64]]
    check_search(load_config("esmm"), space, [])  # every value of every key gives a valid config
    cfg = trial_config(load_config("esmm").model_dump(mode="json"), {"features.sparse.*.dim": 8, "model.tower": [64]})
    assert {f.dim for f in cfg.features.sparse} == {8} and cfg.model.tower == [64]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trails": 4}, r"unknown key `trails`; did you mean `trials`\?"),
        ({"space": {"train.batch_size": 512}}, r"`space.train.batch_size`: got 512; write one distribution: \{choice"),
        ({"space": {"train.batch_size": {"pick": [1]}}}, "unknown distribution `pick`; use one of"),
        ({"space": {"train.seed": {"randint": [0, 2.5]}}}, r"`randint` takes two integers \[lo, hi\]"),
        ({"space": {"train.dense_optimizer.lr": {"loguniform": [0, 1]}}}, "`loguniform` needs 0 < lo"),
        ({"space": {"train.dense_optimizer.lr": {"uniform": [1, 1]}}}, r"needs lo < hi, got \[1, 1\]"),
        ({"space": {"job.workdir": {"choice": ["a"]}}}, "`job.workdir` cannot be searched: mtrec tune sets"),
        ({"mode": "sideways"}, r"`mode` got 'sideways'"),
        ({"scheduler": {"name": "asha", "reduction_factor": 1}}, r"`scheduler.reduction_factor` got 1"),
    ],
)
def test_bad_space_files_fail_in_one_line(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=f"^search space space.yaml: .*{message}") as e:
        load_space(_space(tmp_path, **changes))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"space": {"train.dense_optimizer.lrr": {"choice": [0.1]}}},
            r"`train.dense_optimizer.lrr: 0.1` makes an invalid config: unknown key `train.dense_optimizer.lrr`; "
            r"did you mean `lr`\?",
        ),
        ({"space": {"train.batch_size": {"choice": [256, 0]}}}, r"`train.batch_size: 0` .*`train.batch_size` got 0"),
        (
            {"space": {"train.batch_size": {"uniform": [256, 1024]}}},
            r"`train.batch_size: 545.536` .*fractional part.*; draw an integer key with randint, quniform or choice",
        ),
        ({"space": {"features.dense.*.dim": {"choice": [4]}}}, r"`\*` needs a non-empty list or mapping"),
        ({"metric": "ctcvr/auc"}, r"metric `ctcvr/auc` names no output of tune_t; .* output one of ctr, cvr"),
        ({"metric": "ctr/calibration"}, r"not one the evaluation reports for ctr to rank by; use ctr/auc, ctr/gauc"),
        ({"metric": "ctr/ne", "mode": "max"}, r"`mode: max` for ctr/ne would pick the worst trial \(min is better\)"),
        ({"metric": "ctr/auc_unbiased"}, "needs the synthetic world's truth"),
    ],
)
def test_a_space_that_does_not_fit_the_config_fails_before_ray(tmp_path, changes, message):
    small = {**SMALL, "features": {**SMALL["features"], "dense": []}}
    with pytest.raises(ConfigError, match=message) as e:
        check_search(parse_config(small), load_space(_space(tmp_path, **changes)), [DAY3])
    assert "\n" not in str(e.value)


def test_best_config_is_the_file_as_written_with_the_overrides(tmp_path):
    text = best_config(SMALL, {"features.sparse.*.dim": 4, "train.dense_optimizer.lr": 0.002}, "best.yaml")
    data = yaml.safe_load(text)
    assert data["job"] == {"logs": "./world", "workdir": "./work"}  # the base file's paths, not resolved ones
    assert [f["dim"] for f in data["features"]["sparse"]] == [4, 4, 4]
    assert data["train"]["dense_optimizer"] == {"lr": 0.002} and data["model"] == SMALL["model"]
    parse_config(data)


def test_cli_refuses_a_missing_space_and_missing_eval_days_in_one_line(world, tmp_path, capsys):
    base = ["tune", "--config", "esmm", "--logs", world, "--workdir", str(tmp_path / "w")]
    code = main([*base, "--space", str(tmp_path / "nope.yaml"), "--from", "2026-01-01", "--to", "2026-01-02"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mtrec: error: search space `") and "not found; pass --space PATH" in err
    code = main([*base, "--space", "tune_esmm", "--from", "2026-01-01", "--to", "2026-01-03"])  # 3 days: no eval day
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == DataValidationError.exit_code
    assert "no eval day: every trial is scored on the 1 day(s) after --to 2026-01-03 (2026-01-04 .. 2026-01-04)" in err
    assert not (tmp_path / "w" / "tune").exists()  # refused before anything was started


# --------------------------------------------------------------------------------------------------
# real searches (Ray Tune over Ray Train jobs)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> str:
    """3 days x 3,000 rows in 2 files: days 1-2 train, day 3 scores."""
    root = tmp_path_factory.mktemp("tune-world")
    write_world(str(root), days=3, rows_per_day=3_000, seed=7, files_per_day=2)
    return str(root)


def _small(logs: str, workdir: Path):
    return parse_config({**SMALL, "job": {"logs": logs, "workdir": str(workdir)}})


def _children(cfg, parent: str) -> dict[str, object]:
    t = search_tracker(cfg)
    runs = t.client.search_runs([t.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags["mtrec.tune.trial_id"]: r for r in runs}


@pytest.mark.slow
def test_a_two_trial_search_records_every_trial_and_writes_the_best_config(
    ray_local, tiny_world, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier test's store (mlflow sets the variable)
    cfg = _small(tiny_world, tmp_path / "work")
    space = load_space(_space(tmp_path, scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}))
    t0 = time.perf_counter()
    s = run_tune(cfg, space, DAY1, DAY2, TuneOptions(name="s", out=str(tmp_path / "best.yaml")))
    print(f"2-trial search: {time.perf_counter() - t0:.1f}s")
    assert s.days == [str(DAY1), str(DAY2)] and s.eval_days == [str(DAY3)] and not s.resumed
    assert len(s.trials) == 2 and all(t.error is None for t in s.trials)
    # each trial: its sampled overrides, one value per day it trained, stopped early iff fewer than 2 days
    assert {tuple(t.overrides) for t in s.trials} == {("train.dense_optimizer.lr", "features.sparse.*.dim")}
    assert all(len(t.curve) == t.days and t.stopped_early == (t.days < 2) for t in s.trials)
    complete = [t for t in s.trials if t.days == 2]
    assert s.best.value == max(t.value for t in complete) and s.best.trial_id == complete[0].trial_id
    assert s.worst.value == min(t.value for t in s.trials) and s.margin == pytest.approx(s.best.value - s.worst.value)
    # every day of a trial is a published checkpoint in its own workdir; the jobs did not record or register
    for t in s.trials:
        trial = Path(s.folder, "trials", t.trial_id)
        published = sorted(p.parent.name for p in (trial / "checkpoints" / "tune_t").glob("dt=*/_SUCCESS"))
        assert published == [f"dt={d}" for d in s.days[: t.days]]
    assert not (tmp_path / "work" / "mlartifacts" / "models").exists()
    # MLflow: one parent holding both trials, each with its metric per day (step = day)
    t = search_tracker(cfg)
    assert t.experiment == "tune_t-tune"
    parent = t.client.get_run(s.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best/ctr/auc"] == pytest.approx(s.best.value)
    assert parent.data.metrics["margin/ctr/auc"] == pytest.approx(s.margin)
    assert {a.path for a in t.client.list_artifacts(s.parent_run_id)} == {"best.yaml", "trials.json"}
    children = _children(cfg, s.parent_run_id)
    assert set(children) == {t.trial_id for t in s.trials}
    for trial in s.trials:
        run = children[trial.trial_id]
        assert run.info.status == "FINISHED" and run.info.run_id == trial.run_id
        history = t.client.get_metric_history(run.info.run_id, "ctr/auc")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (i + 1, pytest.approx(v)) for i, v in enumerate(trial.curve)
        ]
        assert json.loads(run.data.params["train.dense_optimizer.lr"]) == trial.overrides["train.dense_optimizer.lr"]
        assert json.loads(run.data.params["features.sparse.all.dim"]) == trial.overrides["features.sparse.*.dim"]
    # best.yaml: the base config with the winner's overrides, ready for `mtrec train`
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert (tmp_path / "best.yaml").read_text() == Path(s.best_config).read_text()
    base = cfg.model_dump(mode="json")
    assert [f["dim"] for f in best["features"]["sparse"]] == [s.best.overrides["features.sparse.*.dim"]] * 3
    assert best["train"]["dense_optimizer"]["lr"] == s.best.overrides["train.dense_optimizer.lr"]
    set_key(base, "features.sparse.*.dim", s.best.overrides["features.sparse.*.dim"])
    set_key(base, "train.dense_optimizer.lr", s.best.overrides["train.dense_optimizer.lr"])
    assert parse_config(best) == parse_config(base)


@pytest.mark.slow
def test_a_killed_search_resumes_instead_of_starting_over(ray_local, tiny_world, tmp_path, capsys, monkeypatch):
    """`mtrec tune` SIGKILLed (its whole process group) once its first trial published its first
    day; the rerun of the same command restores Tune's state: the published day is not trained
    again, the trial goes on with its second day, the second trial runs, the MLflow parent run and
    the first trial's child run are the same ones, and no day's metric is logged twice."""
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier test's store (mlflow sets the variable)
    cfg = _small(tiny_world, tmp_path / "work")
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "job": {"logs": tiny_world, "workdir": str(tmp_path / "work")}}))
    args = ["tune", "--config", str(config), "--space", str(_space(tmp_path)), "--from", str(DAY1), "--to", str(DAY2)]
    args += ["--name", "k", "--address", ray.get_runtime_context().gcs_address]  # the session's cluster: no new one
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MTREC_KILL_WORKER")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtrec.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    trials = Path(search_folder(cfg, "k"), "trials")
    deadline = time.time() + 300
    try:
        while not list(trials.glob(f"*/eval/dt={DAY1}.json")):  # the first trial trained and scored day 1
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the search did not train its first day"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = time.perf_counter() - t0
    published = {p: p.stat().st_mtime_ns for p in trials.glob("*/checkpoints/tune_t/dt=*/_SUCCESS")}
    (first,) = {p.parts[-5] for p in published}  # trials/<id>/checkpoints/tune_t/dt=D/_SUCCESS
    parent = json.loads(Path(search_folder(cfg, "k"), "search.json").read_text())["parent_run_id"]
    before = _children(cfg, parent)
    assert set(before) <= {first}

    t1 = time.perf_counter()
    assert main([*args, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    print(f"killed after {killed:.1f}s; the resumed run took {time.perf_counter() - t1:.1f}s")
    assert s["resumed"] and s["parent_run_id"] == parent
    days = {t["trial_id"]: t["days"] for t in s["trials"]}
    assert len(days) == 2 and days[first] == 2 and all(not t["error"] for t in s["trials"])
    after = {p: p.stat().st_mtime_ns for p in trials.glob("*/checkpoints/tune_t/dt=*/_SUCCESS")}
    assert all(after[p] == m for p, m in published.items())  # no published day trained again
    assert len(after) == sum(days.values())  # and every day a trial reported is published once
    t = search_tracker(cfg)
    parents = t.client.search_runs([t.experiment_id()], "tags.`mtrec.kind` = 'tune'")
    assert [r.info.run_id for r in parents] == [parent]  # the same parent run, not a second one
    children = _children(cfg, parent)
    assert set(children) == set(days) and all(children[k].info.run_id == r.info.run_id for k, r in before.items())
    for trial, run in children.items():  # each day's metric once: a day re-reported after the restore is not
        steps = [m.step for m in t.client.get_metric_history(run.info.run_id, "ctr/auc")]
        assert sorted(steps) == list(range(1, days[trial] + 1)), (trial, steps)


def test_ray_tune_is_declared_and_its_requirements_are_pinned():
    """`ray[tune]` in pyproject.toml, and every requirement ray declares for the tune extra in
    deploy/lock/common.txt (installed with --no-deps: nothing else would bring them)."""
    import re
    import tomllib
    from importlib.metadata import requires

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    assert "tune" in ray.partition("[")[2].partition("]")[0].split(",")
    pinned = {
        re.sub(r"[-_.]+", "-", line.partition("==")[0].strip().lower())
        for line in (root / "deploy/lock/common.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    tune = [r for r in requires("ray") if re.search(r"extra\s*==\s*['\"]tune['\"]", r)]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower()) for r in tune}
    assert names and names <= pinned, names - pinned
