"""Model zoo: output contract, paper identities, shallow tower, DMP sharding."""

import copy

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import DAY1

from mtrec.config import example_path, parse_config
from mtrec.data.batch import BatchConverter
from mtrec.models import MultiTaskTrain, build_model
from mtrec.models.esm2 import BUY_AFTER_D, BUY_AFTER_O
from mtrec.spec import ARCH_NAMES

B = 64
SMALL = {"tower": [16], "batch_norm": True}
ARCH_MODELS = {
    "shared_bottom": {"arch": "shared_bottom", "bottom": [32], **SMALL},
    "esmm": {"arch": "esmm", **SMALL},
    "naive_cvr": {"arch": "naive_cvr", **SMALL},
    "mmoe": {"arch": "mmoe", "num_experts": 3, "expert": [32], **SMALL},
    "ple": {"arch": "ple", "levels": 2, "shared_experts": 2, "task_experts": 1, "expert": [16], **SMALL},
    "esm2": {"arch": "esm2", "daction_task": "dar", **SMALL},
    "dupn": {
        "arch": "dupn",
        "user_features": ["user_id", "user_segment", "age_bucket", "user_activity"],
        "hidden": 16,
        "attention": [8],
        "user_tower": [16],
        "item_tower": [16],
        **SMALL,
    },
}
# a behaviour sequence for the architectures that need one (the rows fixture adds its columns)
HIST = {
    "name": "hist",
    "max_len": 8,
    "features": [{"name": "hist_item_id", "table": "item_id"}, {"name": "hist_behavior", "hash_size": 8, "dim": 4}],
}
THREE = [
    {"name": "ctr", "label": "click"},
    {"name": "watch_time", "label": "watch_time", "log1p": True},
    {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"},
]


def make_cfg(world: str, arch: str, shallow: bool = False):
    d = yaml.safe_load(example_path("esm2").read_text())
    d["model"] = copy.deepcopy(ARCH_MODELS[arch])
    if arch != "esm2":
        d["tasks"] = copy.deepcopy(THREE)
    if arch == "dupn":
        d["features"]["sequences"] = [copy.deepcopy(HIST)]
    if shallow:
        d["model"]["shallow_tower"] = {"hidden": [8], "feature_dropout": 0.0}
    d["job"]["logs"] = world
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 1000)  # small tables: fast tests
    return parse_config(d)


@pytest.fixture(scope="module")
def rows(world):
    """B rows of day 1, with a history of 0-5 earlier rows' items (for `HIST`)."""
    t = pq.read_table(f"{world}/dt={DAY1}/part-00000.parquet").slice(0, B)
    items = t.column("item_id").to_pylist()
    hist = [items[max(0, i - i % 6) : i] for i in range(B)]
    t = t.append_column("hist_item_id", pa.array(hist, pa.list_(pa.int64())))
    t = t.append_column("level", pa.array([u % 3 for u in t.column("user_id").to_pylist()], pa.int64()))
    return t.append_column("hist_behavior", pa.array([[1] * len(h) for h in hist], pa.list_(pa.int64())))


def test_every_arch_is_registered_and_tested():
    assert set(ARCH_NAMES) == set(ARCH_MODELS)


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_output_contract(world, rows, arch):
    cfg = make_cfg(world, arch)
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    out = model(BatchConverter(cfg.spec)(rows))
    binary = [t.name for t in cfg.tasks if cfg.label_kind(t).value == "binary"]
    joints = [t.joint_name for t in cfg.tasks if t.given]
    assert set(binary + joints) <= out.keys()
    for k in binary + joints:
        assert out[k].shape == (B,)
        assert torch.all((out[k] >= 0) & (out[k] <= 1)), k
    for t in cfg.tasks:
        if t.given:
            assert torch.all(out[t.joint_name] <= out[t.given] + 1e-7)  # pCTCVR <= pCTR
    if "watch_time" in out:
        assert out["watch_time"].shape == (B,)
    loss, (losses, _, labels) = MultiTaskTrain(model, cfg.spec)(BatchConverter(cfg.spec)(rows))
    assert loss.ndim == 0 and torch.isfinite(loss) and set(losses) == {t.name for t in cfg.tasks}
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_multiclass_task_softmax_and_cross_entropy(world, rows, arch):
    cfg = make_cfg(world, arch)
    d = cfg.model_dump(mode="json", exclude_unset=True)
    d["labels"]["level"] = "multiclass"
    d["tasks"].append({"name": "level", "label": "level", "classes": 3})
    cfg = parse_config(d)
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    batch = BatchConverter(cfg.spec)(rows)
    loss, (losses, out, labels) = MultiTaskTrain(model, cfg.spec)(batch)
    assert out["level"].shape == (B, 3) and out["level_logit"].shape == (B, 3)
    torch.testing.assert_close(out["level"].sum(dim=1), torch.ones(B))
    torch.testing.assert_close(out["level"], torch.softmax(out["level_logit"], dim=1))
    torch.testing.assert_close(
        losses["level"], torch.nn.functional.cross_entropy(out["level_logit"], labels["level"].long())
    )
    assert out["ctr"].shape == (B,)  # the other tasks keep their shapes
    loss.backward()
    tower = dict(model.named_parameters())
    grads = [p.grad for n, p in tower.items() if "level" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_esm2_decomposition_identities(world, rows):
    cfg = make_cfg(world, "esm2")
    out = build_model(cfg.spec, "cpu", cfg.score_offsets())(BatchConverter(cfg.spec)(rows))
    y1, y2, y3, y4 = out["ctr"], out["dar"], out[BUY_AFTER_D], out[BUY_AFTER_O]
    torch.testing.assert_close(out["ctavr"], y1 * y2)
    torch.testing.assert_close(out["cvr"], y2 * y3 + (1 - y2) * y4)
    torch.testing.assert_close(out["ctcvr"], y1 * out["cvr"])
    torch.testing.assert_close(out["ctr"], torch.sigmoid(out["ctr_logit"]))


def test_naive_cvr_trains_cvr_on_clicked_rows_only(world, rows):
    cfg = make_cfg(world, "naive_cvr")
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    batch = BatchConverter(cfg.spec)(rows)
    _, (losses, out, labels) = MultiTaskTrain(model, cfg.spec)(batch)
    clicked = labels["click"] > 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        out["cvr_logit"][clicked], labels["conversion"][clicked]
    )
    torch.testing.assert_close(losses["cvr"], expected)
    # its CVR side has embeddings of its own (the paper's BASE model shares nothing)
    assert model.cvr_sparse_arch is not model.sparse_arch


def test_esmm_loss_is_entire_space(world, rows):
    cfg = make_cfg(world, "esmm")
    model = build_model(cfg.spec, "cpu", cfg.score_offsets())
    _, (losses, out, labels) = MultiTaskTrain(model, cfg.spec)(BatchConverter(cfg.spec)(rows))
    target = labels["click"] * labels["conversion"]
    torch.testing.assert_close(
        losses["cvr"], torch.nn.functional.binary_cross_entropy(out["ctcvr"].clamp(1e-7, 1 - 1e-7), target)
    )
    torch.testing.assert_close(
        losses["watch_time"], torch.nn.functional.mse_loss(out["watch_time"], torch.log1p(labels["watch_time"]))
    )


def test_shallow_tower_changes_training_logits_not_serving(world, rows):
    cfg = make_cfg(world, "mmoe", shallow=True)
    torch.manual_seed(0)
    model = build_model(cfg.spec, "cpu", cfg.score_offsets()).eval()
    conv = BatchConverter(cfg.spec)
    train_out = model(conv(rows))  # bias features given (training input)
    serve_out = model(conv(rows, with_bias=False))
    assert "bias_logit" in train_out and "bias_logit" not in serve_out
    torch.testing.assert_close(train_out["ctr_logit"], serve_out["ctr_logit"] + train_out["bias_logit"])
    assert not torch.allclose(train_out["ctr_logit"], serve_out["ctr_logit"])
    torch.testing.assert_close(train_out["cvr"], serve_out["cvr"])  # apply_to defaults to the click task only
    with torch.no_grad():  # serving ignores the shallow tower entirely
        for p in model.shallow_tower.parameters():
            p.add_(1.0)
    for k, v in model(conv(rows, with_bias=False)).items():
        torch.testing.assert_close(v, serve_out[k])


@pytest.mark.parametrize("arch", ["esmm", "mmoe", "dupn"])
def test_builds_on_meta_and_runs_under_dmp(world, rows, arch):
    from mtrec.train.local import build_sharded
    from mtrec.train.sharding import plan_summary

    cfg = make_cfg(world, arch)
    assert next(build_model(cfg.spec, "meta", cfg.score_offsets()).sparse_arch.parameters()).device.type == "meta"
    dmp, opt = build_sharded(cfg)
    summary = plan_summary(dmp.plan)
    assert {v["sharding_type"] for v in summary.values()} == {"table_wise"}
    assert set(summary) == set(cfg.features.tables())
    loss, (_, out, _) = dmp(BatchConverter(cfg.spec)(rows))
    loss.backward()
    opt.step()
    state = dmp.fused_optimizer.state_dict()["state"]
    assert all(any(k.endswith(f"{t}.weight") for k in state) for t in cfg.features.tables())  # row-wise Adagrad state
    assert out["ctcvr"].shape == (B,)
