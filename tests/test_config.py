import copy

import pytest
import yaml

from mtrec.config import EXAMPLES, example_path, load_config, parse_config
from mtrec.errors import ConfigError
from mtrec.spec import LabelKind, MmoeModel


@pytest.fixture
def esmm() -> dict:
    return yaml.safe_load(example_path("esmm").read_text())


def _err(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "esmm.yaml")
    msg = str(e.value)
    assert "\n" not in msg, "config errors are one line"
    return msg


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_load(name):
    cfg = load_config(name)
    assert cfg.name == f"{name}_synth"
    assert cfg.model.arch == name.removesuffix("_seq")
    assert cfg.labels["click"] == LabelKind.BINARY
    assert cfg.task("ctr").given is None and cfg.task("cvr").given == "ctr"


def test_mmoe_example_has_regression_task_and_shallow_tower():
    cfg = load_config("mmoe")
    assert isinstance(cfg.model, MmoeModel)
    assert cfg.label_kind(cfg.task("watch_time")) == LabelKind.REGRESSION
    assert cfg.model.shallow_tower is not None and cfg.model.shallow_tower.apply_to == ["ctr"]
    assert [f.name for f in cfg.features.bias] == ["position", "device"]


def test_unknown_key_names_key_and_suggests(esmm):
    esmm["train"]["batchsize"] = 512
    msg = _err(esmm)
    assert "unknown key `train.batchsize`" in msg
    assert "did you mean `batch_size`?" in msg
    assert "remove or rename it" in msg


def test_unknown_key_inside_arch_specific_model(esmm):
    esmm["model"]["num_experts"] = 4  # an MMoE key on an ESMM model
    msg = _err(esmm)
    assert "unknown key `model.num_experts`" in msg
    assert "allowed keys here: arch, batch_norm, dropout, shallow_tower, tower" in msg


def test_wrong_type_names_key_and_value(esmm):
    esmm["train"]["batch_size"] = "big"
    msg = _err(esmm)
    assert "`train.batch_size` got 'big'" in msg and "valid integer" in msg


def test_nested_list_location(esmm):
    esmm["features"]["sparse"][2]["dim"] = 0
    assert "`features.sparse[2].dim` got 0" in _err(esmm)


def test_task_label_not_declared(esmm):
    esmm["tasks"][1]["label"] = "purchase"
    msg = _err(esmm)
    assert "task `cvr`: label `purchase` is not declared under `labels`" in msg
    assert "add `purchase: binary`" in msg


def test_labels_take_any_name_and_click_only_needs_no_conversion(esmm):
    esmm["labels"] = {"clicked": "binary", "purchase": "binary"}
    esmm["tasks"] = [{"name": "ctr", "label": "clicked"}, {"name": "cvr", "label": "purchase", "given": "ctr"}]
    cfg = parse_config(esmm)
    assert cfg.spec.task("cvr").label == "purchase" and cfg.train.sampling.label == "clicked"
    esmm["labels"] = {"click": "binary"}
    esmm["tasks"] = [{"name": "ctr", "label": "click"}]
    assert "conversion" not in parse_config(esmm).spec.required_columns()


def test_column_mapping_names_only_declared_labels(esmm):
    esmm["columns"] = {"labels": {"purchase": "booked"}}
    assert "`columns.labels` maps `purchase`, which is not declared under `labels`" in _err(esmm)


def test_unknown_arch(esmm):
    esmm["model"]["arch"] = "dlrm"
    assert "`model.arch` is 'dlrm'; use one of shared_bottom, esmm, esm2, mmoe, ple, dupn, naive_cvr" in _err(esmm)


def test_given_must_name_a_task(esmm):
    esmm["tasks"][1]["given"] = "click"
    assert "`given: click` names no task; use one of ctr, cvr" in _err(esmm)


def test_shallow_tower_needs_bias_features(esmm):
    esmm["model"]["shallow_tower"] = {}
    esmm["features"]["bias"] = []
    assert "`features.bias` is empty" in _err(esmm)


def test_duplicate_feature_name(esmm):
    esmm["features"]["dense"].append({"name": "user_id"})
    assert "feature name `user_id` is declared twice" in _err(esmm)


def test_missing_key_and_error_count(esmm):
    del esmm["tasks"]
    esmm["train"]["seed"] = "x"
    msg = _err(esmm)
    assert msg.startswith("config esmm.yaml: ")
    assert "(+1 more problem)" in msg


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file `.*nope.yaml` not found; pass --config PATH"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 2"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_overrides_and_fingerprint(esmm):
    cfg = load_config("esmm", logs="memory://logs", workdir="/tmp/w")
    assert (cfg.job.logs, cfg.job.workdir) == ("memory://logs", "/tmp/w")
    base = parse_config(esmm)
    lr_changed = copy.deepcopy(esmm)
    lr_changed["train"]["dense_optimizer"]["lr"] = 0.5
    dim_changed = copy.deepcopy(esmm)
    dim_changed["features"]["sparse"][0]["dim"] = 32
    assert parse_config(lr_changed).fingerprint() == base.fingerprint()  # paths/lr do not shape the model
    assert parse_config(dim_changed).fingerprint() != base.fingerprint()
    assert cfg.fingerprint() == base.fingerprint()


def test_required_columns_cover_contract_labels_and_features():
    cols = load_config("esmm").required_columns()
    assert cols[:5] == ["user_id", "item_id", "position", "click", "conversion"]
    assert {"item_tags", "user_activity", "device", "watch_time"} <= set(cols)
    assert len(cols) == len(set(cols))


def test_esm2_shallow_tower_on_composed_task_refused_at_load():
    d = load_config("esm2").model_dump(mode="json")
    d["model"]["shallow_tower"] = {"apply_to": ["cvr"]}
    with pytest.raises(ConfigError, match="names `cvr`, whose ESM2 probability is composed"):
        parse_config(d)
    d["model"]["shallow_tower"] = None
    d["labels"]["daction"] = "regression"
    with pytest.raises(ConfigError, match="`model.daction_task` `dar` must be a binary task"):
        parse_config(d)


def test_missing_arch_message():
    d = load_config("esmm").model_dump(mode="json")
    del d["model"]["arch"]
    with pytest.raises(ConfigError, match=r"missing required key `model.arch`; use one of shared_bottom"):
        parse_config(d, "c.yaml")


def test_embedding_dim_must_be_a_multiple_of_4(esmm):
    """FBGEMM's kernels assert it inside the training job; the config says so at load, in one line."""
    esmm["features"]["sparse"][0]["dim"] = 6
    msg = _err(esmm)
    assert "`features.sparse[0].dim`: `dim: 6` is not a multiple of 4, which FBGEMM's embedding kernels need" in msg
    assert "use 4 or 8" in msg
    esmm["features"]["sparse"][0]["dim"] = 2
    assert _err(esmm).endswith("`dim: 2` is not a multiple of 4, which FBGEMM's embedding kernels need; use 4")


@pytest.mark.parametrize(
    ("name", "fingerprint"), [("esmm", "62bd216e9a62fa53"), ("esm2", "17c807ac8bf11d74"), ("mmoe", "e7c220ac2e01f5f5")]
)
def test_the_shipped_examples_fingerprints_are_pinned(name, fingerprint):
    """A checkpoint warm-starts only under an equal fingerprint: a new config key that shapes no
    weight must not change it, or every user's next nightly is refused (values since the examples
    turned on `model.batch_norm`, 2026-11-30: a change of weights, announced in docs/models.md)."""
    assert load_config(name).fingerprint() == fingerprint


def test_a_dense_fill_value_does_not_change_the_fingerprint(esmm):
    esmm["features"]["dense"][0]["fill"] = 0.0
    assert parse_config(esmm).fingerprint() == load_config("esmm").fingerprint()


def test_multiclass_task_rules(esmm):
    esmm["labels"]["level"] = "multiclass"
    good = copy.deepcopy(esmm)
    good["tasks"].append({"name": "level", "label": "level", "classes": 7})
    spec = parse_config(good).spec
    assert spec.classes() == {"level": 7}
    assert list(spec.served_columns()) == ["ctr", "cvr", *(f"level_{k}" for k in range(7)), "ctcvr"]
    assert spec.served_columns()["level_3"] == ("level", 3)
    assert spec.default_gate_metrics()[-1] == "level/macro_auc"
    assert spec.column_roles()["level"][0] == "multiclass"

    bad = copy.deepcopy(esmm)
    bad["tasks"].append({"name": "level", "label": "level"})
    assert "label `level` is multiclass; say how many classes it has (`classes: K`" in _err(bad)
    bad = copy.deepcopy(esmm)
    bad["tasks"][0]["classes"] = 3
    assert "task `ctr`: `classes` is for multiclass labels, `click` is binary" in _err(bad)
    bad = copy.deepcopy(good)
    bad["tasks"][-1]["given"] = "ctr"
    assert "a multiclass task cannot be `given` another" in _err(bad)
    bad = copy.deepcopy(good)
    bad["tasks"].append({"name": "level2", "label": "level", "classes": 5})
    assert "tasks `level` and `level2` read label `level` with 7 and 5 classes" in _err(bad)
    bad = copy.deepcopy(good)
    bad["labels"]["level_0"] = "binary"
    bad["tasks"].append({"name": "level_0", "label": "level_0"})
    assert "served column names must be distinct" in _err(bad)
    bad = copy.deepcopy(good)
    bad["tasks"][1]["given"] = "level"
    assert "`given: level` must name a binary task, `level` is multiclass" in _err(bad)
    bad = copy.deepcopy(good)
    bad["train"]["sampling"] = {"negative_rate": 0.1}
    assert "`train.sampling` on `click` would skew root task(s) level" in _err(bad)
    bad = copy.deepcopy(good)
    bad["model"]["shallow_tower"] = {"apply_to": ["ctr", "level"]}
    assert "`model.shallow_tower.apply_to` names multiclass task `level`" in _err(bad)
    bad = copy.deepcopy(good)
    bad["gate"] = {"metrics": ["level/macro_auc", "level/accuracy"]}
    assert parse_config(bad).gate.metrics == ["level/macro_auc", "level/accuracy"]


def test_batch_norm_needs_two_rows_per_batch(esmm):
    esmm["model"]["batch_norm"] = True
    esmm["train"]["batch_size"] = 1
    assert "`model.batch_norm: true` with `train.batch_size: 1`: BatchNorm needs at least 2 rows" in _err(esmm)


def test_storage_options_are_checked_and_their_secrets_never_recorded(esmm):
    d = copy.deepcopy(esmm)
    d["job"]["storage_options"] = {
        "s3": {
            "endpoint_url": "http://minio:9000",
            "key": "AKIA1",
            "secret": "s3cr3t",
            "client_kwargs": {"region_name": "x"},
        }
    }
    cfg = parse_config(d)
    assert cfg.job.storage_options["s3"]["secret"] == "s3cr3t"  # the job uses them as given
    shown = cfg.redacted()["job"]["storage_options"]["s3"]
    assert shown == {
        "endpoint_url": "http://minio:9000",
        "key": "<redacted>",
        "secret": "<redacted>",
        "client_kwargs": {"region_name": "x"},
    }
    assert "s3cr3t" not in yaml.safe_dump(cfg.redacted()) and cfg.fingerprint() == parse_config(esmm).fingerprint()
    d["job"]["storage_options"] = {"s4": {}}
    with pytest.raises(ConfigError, match="`job.storage_options` names protocol 's4', which fsspec does not know"):
        parse_config(d)
