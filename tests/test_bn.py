"""BN statistics consistency: the figures against hand-computed values, a model without BN,
recalibration touching only BN buffers; training-time sampling and its score correction."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import without_floors

from mtrec import bn
from mtrec.config import BNCheckConfig, SamplingConfig, load_config
from mtrec.models import build_model
from mtrec.train.sampling import sample, uniform

DAY1 = dt.date(2026, 1, 1)
DAY2 = DAY1 + dt.timedelta(days=1)


def bn_cfg(world, batch_norm=True, **sampling):
    d = load_config("esmm", logs=world).model_dump(mode="json")
    d["model"].update(batch_norm=batch_norm, tower=[16, 8])
    d["train"]["sampling"].update(sampling)
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 1000)
    return type(load_config("esmm")).model_validate(d)


def test_figures_equal_hand_computed_values_on_a_tiny_layer():
    # running: mean (1, 0), var (4, 1); reference: mean (0, 0), var (1, 1)
    f = bn.figures(np.array([1.0, 0.0]), np.array([4.0, 1.0]), np.array([0.0, 0.0]), np.array([1.0, 1.0]))
    assert f["smd"].tolist() == [1.0, 0.0]
    assert f["log_var_ratio"] == pytest.approx([math.log(4.0), 0.0])
    # KL(N(0,1) || N(1,4)) = 0.5 * (log 4 + (1 + 1) / 4 - 1)
    assert f["kl"] == pytest.approx([0.5 * (math.log(4) + 2 / 4 - 1), 0.0])
    th = BNCheckConfig(max_smd=0.4, max_abs_log_var_ratio=10, max_kl=10)
    rep = bn.compare(
        {"l": (np.array([1.0, 0.0]), np.array([4.0, 1.0]))}, {"l": (np.zeros(2), np.ones(2))}, th, "2026-01-02", 10
    )
    (lc,) = rep.layers
    assert (
        lc.smd_mean == pytest.approx(0.5)
        and lc.smd_max == 1.0
        and lc.abs_log_var_ratio_mean == pytest.approx(math.log(4) / 2)
    )
    assert not rep.passed and lc.failing == ["smd_mean 0.500 > 0.4"]
    assert "FAILED, 1 of 1 layers; worst l: smd_mean 0.500 > 0.4" in rep.summary()
    # the causes come in order, and recalibration, which hides the first three, comes last
    causes = rep.summary().partition("likely causes, most common first: ")[2]
    assert causes.startswith("rows trained in file order") and causes.endswith("`mtrec bn-check --recalibrate`")
    assert rep.metrics()["bn/l/smd_mean"] == pytest.approx(0.5) and rep.metrics()["bn/passed"] == 0.0


def test_reference_hooks_see_each_layers_input_streamed(world):
    cfg = bn_cfg(world)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    layer = bn.bn_layers(model)["towers.ctr.mlp.1"]
    seen = []
    h = layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().double()))
    ref, rows = bn.reference(model, cfg.spec, cfg.job.logs, DAY1, batch_rows=3000)
    h.remove()
    x = torch.cat(seen)
    assert rows == x.shape[0] == 20_000 and len(seen) > 5  # every row, in bounded batches
    mean, var = ref["towers.ctr.mlp.1"]
    assert np.allclose(mean, x.mean(0).numpy(), atol=1e-9) and np.allclose(
        var, x.var(0, unbiased=False).numpy(), atol=1e-9
    )


def test_a_model_without_bn_reports_no_bn_layers_and_passes(world):
    cfg = bn_cfg(world, batch_norm=False)
    rep = bn.check(build_model(cfg.spec, "cpu", cfg.score_offsets()), cfg.spec, cfg.job.logs, DAY1, cfg.bn)
    assert rep.passed and rep.layers == [] and rep.summary() == f"BN check on {DAY1}: no BN layers; passed"


def test_recalibration_changes_only_bn_buffers_and_matches_the_slice(world):
    cfg = bn_cfg(world)
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    for m in bn.bn_layers(model).values():  # statistics far from the data's
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not bn.check(model, cfg.spec, cfg.job.logs, DAY1, cfg.bn).passed
    rows = bn.recalibrate(model, cfg.spec, cfg.job.logs, DAY1)
    assert rows == 20_000
    after = model.state_dict()
    bn_keys = {f"{n}.{b}" for n in bn.bn_layers(model) for b in ("running_mean", "running_var", "num_batches_tracked")}
    for k, v in before.items():
        if k in bn_keys:
            assert not torch.equal(v, after[k]) or k.endswith("num_batches_tracked")
        else:
            assert torch.equal(v, after[k]), k  # bit-identical
    assert all(m.momentum == 0.1 for m in bn.bn_layers(model).values()) and model.training  # as it was
    assert bn.check(model, cfg.spec, cfg.job.logs, DAY1, cfg.bn).passed


def test_recalibration_is_the_slices_exact_statistics_whatever_it_started_from(world):
    """Each BN layer ends with the mean and unbiased variance of its input as the served model
    computes it, the same from any starting statistics and batch size; the towers are 2 BN layers
    deep, so 3 passes (the last measures what the one before did)."""
    cfg = bn_cfg(world)
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    results = []
    for start, batch in ((5.0, 8192), (0.0, 999)):
        for m in bn.bn_layers(model).values():
            m.running_mean.fill_(start)
            m.running_var.fill_(start + 1)
        passes = []

        def measure(batch=batch, passes=passes):
            passes.append(1)
            return bn._measure(model, cfg.spec, bn.serving_batches(cfg.spec, cfg.job.logs, DAY1, batch))

        got = bn.settle(model, measure, str(DAY1))
        assert (got.rows, got.passes, len(passes)) == (20_000, 3, 3)
        results.append(bn.running_stats(model))
    ref, rows = bn.reference(model, cfg.spec, cfg.job.logs, DAY1)
    for name, (mean, var) in results[1].items():
        assert np.abs(mean - results[0][name][0]).max() < 1e-6 and np.abs(var - results[0][name][1]).max() < 1e-6
        assert np.abs(mean - ref[name][0]).max() < 1e-6, name
        assert np.abs(var - ref[name][1] * rows / (rows - 1)).max() < 1e-5 * max(1.0, ref[name][1].max()), name
    assert max(lc.smd_max for lc in bn.check(model, cfg.spec, cfg.job.logs, DAY1, cfg.bn).layers) < 1e-5


def test_sampling_is_deterministic_per_row_and_keeps_the_rate():
    n = 200_000
    label = np.zeros(n, np.int8)
    label[::10] = 1
    rb = pa.RecordBatch.from_pydict({"click": label, "_file": np.zeros(n, np.int32), "_row": np.arange(n)})
    cfg = SamplingConfig(label="click", negative_rate=0.1, positive_repeat=3)
    out = sample(rb, cfg, seed=7)
    clicks = out.column("click").to_numpy()
    assert clicks.sum() == 3 * label.sum()
    assert (clicks == 0).sum() == pytest.approx(0.1 * (label == 0).sum(), rel=0.03)
    # the same row is kept whatever the batch it arrives in
    halves = [sample(rb.slice(0, n // 2), cfg, 7), sample(rb.slice(n // 2), cfg, 7)]
    assert np.array_equal(np.concatenate([h.column("_row").to_numpy() for h in halves]), out.column("_row").to_numpy())
    assert not np.array_equal(sample(rb, cfg, 8).column("_row").to_numpy(), out.column("_row").to_numpy())
    assert sample(rb, SamplingConfig(), 7) is rb
    u = uniform(1, np.zeros(5, np.int32), np.arange(5))
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 5


def test_scores_are_corrected_back_from_the_sampled_space(world):
    from mtrec.data.batch import BatchConverter
    from mtrec.data.io import list_day_files
    from mtrec.data.validate import iter_file_batches

    plain, sampled = (
        bn_cfg(world, batch_norm=False),
        bn_cfg(world, batch_norm=False, negative_rate=0.1, positive_repeat=2),
    )
    torch.manual_seed(0)
    a = build_model(plain.spec, "cpu", plain.score_offsets())
    b = build_model(sampled.spec, "cpu", sampled.score_offsets())
    b.load_state_dict(a.state_dict())
    rb = next(iter_file_batches(list_day_files(world, DAY1)[0], batch_rows=64))
    batch = BatchConverter(plain.spec)(rb, with_bias=False)
    a.eval(), b.eval()
    with torch.no_grad():
        pa_, pb = a(batch), b(batch)
    p = pa_["ctr"].double()
    assert torch.allclose(pb["ctr"].double(), p / (p + (1 - p) * 2 / 0.1), atol=1e-6)  # p' = p / (p + (1-p) k / r)
    assert torch.allclose(pb["cvr"], pa_["cvr"]) and torch.allclose(pb["ctcvr"], pb["ctr"] * pb["cvr"])
    b.train()
    with torch.no_grad():
        assert torch.allclose(b(batch)["ctr"], a.train()(batch)["ctr"])  # training is in the sampled space
    with pytest.raises(ValueError, match="`train.sampling.label` is `watch_time`, not a binary label"):
        bn_cfg(world, label="watch_time")
    d = load_config("mmoe").model_dump(mode="json")
    d["train"]["sampling"]["negative_rate"] = 0.1
    with pytest.raises(ValueError, match="would skew root task\\(s\\) watch_time"):
        type(load_config("mmoe")).model_validate(d)


@pytest.mark.slow  # 20,000 rows in batches of 32
def test_training_with_sampling_consumes_every_row_once_and_trains_fewer(world):
    from mtrec.train.local import build_sharded
    from mtrec.train.loop import LoopOptions, train_stream
    from mtrec.train.position import Position
    from mtrec.train.sharding import device_for_backend
    from mtrec.train.stream import StreamCounts, day_batches

    d = bn_cfg(world, negative_rate=0.05, positive_repeat=2).model_dump(mode="json")
    d["train"]["batch_size"] = 32  # many batches are sampled away entirely
    cfg = type(load_config("esmm")).model_validate(d)
    dmp, opt = build_sharded(cfg)
    pos = Position()
    stats = train_stream(
        dmp,
        opt,
        day_batches(cfg.spec, cfg.job.logs, [DAY1], 32, StreamCounts()),
        cfg,
        device_for_backend()[0],
        LoopOptions(log_every=100, position=pos),
    )
    clicks = int(sum(b.column("click").to_numpy().sum() for b in day_batches(cfg.spec, cfg.job.logs, [DAY1], 4096)))
    assert stats.rows == pos.rows == 20_000  # every row consumed once, sampled out or not
    assert stats.sampled_rows == pytest.approx(2 * clicks + 0.05 * (20_000 - clicks), rel=0.1)
    assert (
        stats.batches < 20_000 // 32 and stats.steps == stats.batches and stats.pad_steps == 0
    )  # world size 1: no pad steps


@pytest.mark.slow  # logs four model versions to MLflow
def test_gate_refuses_broken_bn_statistics_and_recalibration_makes_a_version_that_passes(
    world, tmp_path, monkeypatch, capsys, caplog
):
    """Embedded MLflow (sqlite), models logged directly: champion A has statistics of the data;
    challenger B is A with its running means shifted by 5. The gate refuses B naming the BN
    check; `mtrec bn-check --recalibrate` registers B' whose statistics pass, and the gate
    promotes B'."""
    from mlflow import MlflowClient

    from mtrec.cli import main
    from mtrec.serving import ServedModel
    from mtrec.tracking import Tracker, example_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = bn_cfg(world).model_dump(mode="json")
    d["job"]["workdir"] = str(tmp_path / "work")
    d["gate"]["tolerance"] = 0.05
    cfg = type(load_config("esmm")).model_validate(without_floors(d))  # an untrained model
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    bn.recalibrate(model, cfg.spec, cfg.job.logs, DAY1)
    tracker = Tracker(cfg)

    def register(state, name):
        served = ServedModel(cfg.spec, state)
        run = tracker.start_run("nightly", [DAY1], f"{tmp_path}/ck-{name}", None, None)
        uri = tracker.log_model(run, served, example_rows(cfg.job.logs, DAY1, served.columns))
        return tracker.register(run, uri, f"{tmp_path}/ck-{name}", DAY1)

    assert register(model.state_dict(), "a") == "1"
    capsys.readouterr()
    assert main(["promote", "--config", str(_yaml(tmp_path, d))]) == 0  # no champion yet: v1
    assert (
        f"promoted v1 of {cfg.name} to champion: no champion yet: version 1 becomes the first"
        in capsys.readouterr().err
    )
    broken = {k: (v + 5.0 if k.endswith("running_mean") else v) for k, v in model.state_dict().items()}
    assert register(broken, "b") == "2"
    capsys.readouterr()
    assert (
        main(["bn-check", "--config", str(_yaml(tmp_path, d)), "--date", str(DAY2), "--model", f"models:/{cfg.name}/2"])
        == 7
    )
    assert (
        "mtrec: error: BN check on 2026-01-02 (20,000 rows): FAILED, 4 of 4 layers; worst towers."
        in capsys.readouterr().err
    )
    assert main(["promote", "--config", str(_yaml(tmp_path, d))]) == 5
    client = MlflowClient(tracker.uri, tracker.uri)
    v2 = client.get_model_version(cfg.name, "2").tags
    assert v2["mtrec.gate.decision"] == "refused" and v2["mtrec.gate.bn"] == "failed"
    assert "its BN check on 2026-01-03" in v2["mtrec.gate.reason"] and "FAILED" in v2["mtrec.gate.reason"]
    assert str(client.get_model_version_by_alias(cfg.name, "champion").version) == "1"
    # the fix: recalibrate v2 on day 2 -> v3, registered as the challenger, judged on day 3
    assert (
        main(
            [
                "bn-check",
                "--config",
                str(_yaml(tmp_path, d)),
                "--date",
                str(DAY2),
                "--model",
                f"models:/{cfg.name}/2",
                "--recalibrate",
            ]
        )
        == 0
    )
    v3 = client.get_model_version(cfg.name, "3")
    assert v3.tags["mtrec.bn_recalibrated_on"] == str(DAY2) and v3.tags["mtrec.checkpoint"] == f"{tmp_path}/ck-b"
    assert str(client.get_model_version_by_alias(cfg.name, "challenger").version) == "3"
    assert main(["promote", "--config", str(_yaml(tmp_path, d))]) == 0
    assert client.get_model_version(cfg.name, "3").tags["mtrec.gate.bn"] == "passed"
    assert str(client.get_model_version_by_alias(cfg.name, "champion").version) == "3"
    # a challenger trained to the world's last day: no day to judge it on yet -> exit 10, not 5
    late = DAY1 + dt.timedelta(days=2)
    run = tracker.start_run("nightly", [late], f"{tmp_path}/ck-late", None, None)
    served = ServedModel(cfg.spec, model.state_dict())
    assert (
        tracker.register(
            run,
            tracker.log_model(run, served, example_rows(cfg.job.logs, DAY1, served.columns)),
            f"{tmp_path}/ck-late",
            late,
        )
        == "4"
    )
    capsys.readouterr()
    assert main(["promote", "--config", str(_yaml(tmp_path, d))]) == 10
    assert f"no day with logs after {late}" in capsys.readouterr().err
    assert "mtrec.gate.decision" not in client.get_model_version(cfg.name, "4").tags
    d["tracking"]["enabled"] = False
    capsys.readouterr()
    assert (
        main(
            [
                "bn-check",
                "--config",
                str(_yaml(tmp_path, d)),
                "--date",
                str(DAY2),
                "--checkpoint",
                str(tmp_path),
                "--recalibrate",
            ]
        )
        == 2
    )
    assert (
        "--recalibrate registers the recalibrated model as a new version: it needs `tracking.enabled: true`"
        in capsys.readouterr().err
    )


def _yaml(tmp_path, d):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_the_serving_population_comes_from_the_candidate_logs(tmp_path):
    """With serving logs the reference is every candidate serving scored that day (3 per shown
    item here), read with the contract's feature rules and no labels or positions; the report says
    which population it used. A shown candidate scores exactly as its impression: the neutral
    columns the reader adds reach nothing."""
    from mtrec.data.synth import Export, write_world
    from mtrec.errors import ConfigError, DataValidationError
    from mtrec.eval.scoring import evaluating, score_batches
    from mtrec.train.stream import day_batches, feature_batches

    logs, cands = str(tmp_path / "logs"), str(tmp_path / "cands")
    write_world(logs, days=1, rows_per_day=3_000, seed=3, export=Export(candidates=cands))
    cfg = bn_cfg(logs)
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    bn.recalibrate(model, cfg.spec, logs, DAY1)  # the statistics of the day's impressions
    shown = bn.check(model, cfg.spec, logs, DAY1, cfg.bn)
    served = bn.check(model, cfg.spec, logs, DAY1, cfg.bn, serving_logs=cands)
    assert shown.population == "impressions" and shown.rows == 3_000 and "(3,000 rows)" in shown.summary()
    assert served.population == "serving logs" and served.rows == 9_000
    assert "(9,000 rows of serving logs)" in served.summary() and '"population": "serving logs"' in served.to_json()
    assert max(lc.smd_mean for lc in served.layers) > 2 * max(lc.smd_mean for lc in shown.layers)
    assert bn.recalibrate(model, cfg.spec, logs, DAY1, serving_logs=cands) == 9_000
    assert max(lc.smd_mean for lc in bn.check(model, cfg.spec, logs, DAY1, cfg.bn, cands).layers) < 1e-3

    def scores(batches):
        with evaluating(model):
            return {
                int(r): float(p)
                for rb, out in score_batches(model, cfg.spec, batches)
                for r, p in zip(rb.column("row_id").to_pylist(), out["ctr"].tolist(), strict=True)
            }

    truth = pq.read_table(f"{cands}/_truth/dt={DAY1}").to_pandas().set_index("row_id")
    cand = scores(feature_batches(cfg.spec, cands, DAY1, 1000))
    logged = scores(day_batches(cfg.spec, logs, [DAY1], 1000))
    pairs = [(p, logged[r // 30 * 10 + int(truth.policy_rank[r])]) for r, p in cand.items() if truth.shown[r]]
    assert len(pairs) == 3_000 and max(abs(a - b) for a, b in pairs) < 1e-6, max(abs(a - b) for a, b in pairs)
    assert bn.has_serving_logs(cands, DAY1) and not bn.has_serving_logs(cands, DAY2)
    with pytest.raises(ConfigError, match=r"the serving logs root .*nowhere does not exist; fix job.serving_logs"):
        bn.has_serving_logs(str(tmp_path / "nowhere"), DAY1)
    with pytest.raises(
        DataValidationError, match=r"no serving logs for 2026-01-02 under .*; log that day's candidates"
    ):
        bn.check(model, cfg.spec, logs, DAY2, cfg.bn, serving_logs=cands)
    bad = tmp_path / "bad" / f"dt={DAY1}"
    bad.mkdir(parents=True)
    pq.write_table(pq.read_table(f"{cands}/dt={DAY1}").drop_columns(["item_price"]), bad / "part-00000.parquet")
    with pytest.raises(
        DataValidationError, match=r"lacks `item_price`: serving logs need every feature the model reads"
    ):
        bn.check(model, cfg.spec, logs, DAY1, cfg.bn, serving_logs=str(tmp_path / "bad"))


@pytest.mark.slow  # logs a model version to MLflow
def test_bn_check_and_the_gate_use_the_serving_logs_when_configured(tmp_path, monkeypatch, capsys):
    """`mtrec bn-check --serving-logs` checks against the candidates; the gate, with
    `job.serving_logs` set, checks the challenger against the slice's candidates, says so, and
    defers (exit 10) while the slice's candidates are not logged yet."""
    import shutil

    from mtrec.cli import main
    from mtrec.data.synth import Export, write_world
    from mtrec.serving import ServedModel
    from mtrec.tracking import Tracker, example_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs, cands = str(tmp_path / "logs"), str(tmp_path / "cands")
    write_world(logs, days=2, rows_per_day=3_000, seed=3, export=Export(candidates=cands))
    d = bn_cfg(logs).model_dump(mode="json")
    d["job"]["workdir"] = str(tmp_path / "work")
    cfg = type(load_config("esmm")).model_validate(without_floors(d))  # an untrained model
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    bn.recalibrate(model, cfg.spec, cands, DAY1, serving_logs=cands)  # statistics of day 1's candidates
    tracker = Tracker(cfg)
    served = ServedModel(cfg.spec, model.state_dict())
    run = tracker.start_run("nightly", [DAY1], f"{tmp_path}/ck", None, None)
    uri = tracker.log_model(run, served, example_rows(logs, DAY1, served.columns))
    assert tracker.register(run, uri, f"{tmp_path}/ck", DAY1) == "1"
    model_uri = f"models:/{cfg.name}/1"

    capsys.readouterr()
    args = ["bn-check", "--config", str(_yaml(tmp_path, d)), "--date", str(DAY2), "--model", model_uri]
    assert main([*args, "--serving-logs", cands]) == 0
    assert f"BN check on {DAY2} (9,000 rows of serving logs): passed" in capsys.readouterr().err
    d["job"]["serving_logs"] = cands
    moved = tmp_path / "later"
    shutil.move(f"{cands}/dt={DAY2}", moved)  # the slice's candidates are not logged yet
    assert main(["promote", "--config", str(_yaml(tmp_path, d))]) == 10
    assert f"no serving logs for {DAY2} under {cands} (job.serving_logs)" in capsys.readouterr().err
    shutil.move(moved, f"{cands}/dt={DAY2}")
    assert main(["promote", "--config", str(_yaml(tmp_path, d))]) == 0
    assert "BN check passed against the serving logs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_a_jobs_own_check_uses_the_serving_logs_of_its_evaluation_day(ray_local, tmp_path, monkeypatch):
    """`job.serving_logs` set: the training job's check on its evaluation day is against that day's
    candidates (recorded in the run's bn/check.json), and the job falls back to the impressions on
    a day whose candidates are not logged."""
    import json
    from pathlib import Path

    from mlflow import MlflowClient

    from mtrec.data.synth import Export, write_world
    from mtrec.jobs.retrain import run_train
    from mtrec.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs, cands = str(tmp_path / "logs"), str(tmp_path / "cands")
    write_world(logs, days=3, rows_per_day=3_000, seed=3, export=Export(candidates=cands))
    (tmp_path / "cands" / f"dt={DAY2 + dt.timedelta(days=1)}").rename(tmp_path / "late")  # day 3: not logged yet
    d = bn_cfg(logs).model_dump(mode="json")
    d["job"].update(workdir=str(tmp_path / "work"), serving_logs=cands)
    d["train"].update(batch_size=256, num_workers=1)
    cfg = type(load_config("esmm")).model_validate(d)
    client = MlflowClient(Tracker(cfg).uri, Tracker(cfg).uri)
    population = {}
    for day in (DAY1, DAY2):  # evaluated on day 2 (candidates logged), then day 3 (not yet)
        summary = run_train(cfg, day, day)
        run = client.search_runs(
            [client.get_experiment_by_name(cfg.name).experiment_id],
            f"tags.`mtrec.checkpoint` = '{summary.checkpoint}'",
        )[0]
        path = client.download_artifacts(run.info.run_id, "bn/check.json", str(tmp_path))
        check = json.loads(Path(path).read_text())
        population[day] = (check["population"], check["rows"])
    assert population == {DAY1: ("serving logs", 9_000), DAY2: ("impressions", 3_000)}


def test_recalibration_refuses_a_slice_that_changes_and_statistics_of_another_model(world):
    """A pass that reads another number of rows than the first, or a slice of one row, is refused
    in one line; statistics naming a layer the model lacks are refused, not half applied."""
    from mtrec.errors import ConfigError, DataValidationError
    from mtrec.eval.sharded import Moments

    cfg = bn_cfg(world)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    names = list(bn.bn_layers(model))
    rows = iter([1000, 999])

    def shrinking():
        n = next(rows)
        out = {name: Moments(bn.bn_layers(model)[name].num_features) for name in names}
        for m in out.values():
            m.add(torch.randn(n, m.s.shape[0]))
        return out, n

    changed = r"a pass over day 4 read 999 rows, the first 1,000: the slice changed"
    with pytest.raises(DataValidationError, match=changed):
        bn.settle(model, shrinking, "day 4")
    one = {name: Moments(bn.bn_layers(model)[name].num_features) for name in names}
    with pytest.raises(DataValidationError, match=r"^1 good row\(s\) on day 4: BN statistics need 2 or more"):
        bn.settle(model, lambda: (one, 1), "day 4")
    before = bn.capture(model)
    with pytest.raises(ConfigError, match=r"name layer\(s\) towers.x.mlp.1 that the model does not have"):
        bn.apply(model, {**before, "towers.x.mlp.1": before[names[0]]})
    assert bn.capture(model) == before
