"""DUPN: the config's rules, where its tables go, and the model's invariants (masking, the user part
never reading the candidate)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import _batch, without_floors

from mtrec.config import load_config, parse_config
from mtrec.data.batch import BatchConverter
from mtrec.errors import ConfigError
from mtrec.models import build_model
from mtrec.models.dupn import padded

L = pa.list_(pa.int64())


def _dupn_cfg(**model):
    """user_id and price are the user side; item_id and the history (sharing item_id's table) the rest."""
    return parse_config(
        {
            "name": "d",
            "labels": {"click": "binary", "conversion": "binary"},
            "features": {
                "sparse": [{"name": "user_id", "hash_size": 50}, {"name": "item_id", "hash_size": 100, "dim": 8}],
                "sequences": [
                    {
                        "name": "hist",
                        "max_len": 5,
                        "features": [
                            {"name": "hist_item", "table": "item_id"},
                            {"name": "hist_kind", "hash_size": 4, "dim": 4},
                        ],
                    }
                ],
                "dense": [{"name": "price"}],
            },
            "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "given": "ctr"}],
            "model": {
                "arch": "dupn",
                "user_features": ["user_id"],
                "hidden": 8,
                "heads": 2,
                "attention": [8],
                "user_tower": [8],
                "item_tower": [8],
                "tower": [8],
                **model,
            },
        }
    )


def _rows(items, kinds, **cols):
    return _batch(hist_item=pa.array(items, L), hist_kind=pa.array(kinds, L), **cols)


HISTS = [([5, 6, 7], [1, 2, 1]), ([], []), ([9], [3]), ([1, 2, 3, 4, 5], [1, 1, 2, 2, 3])]


@pytest.mark.parametrize(
    "model, message",
    [
        ({"user_features": ["nope"]}, "`model.user_features` names `nope`, which is no sparse or dense feature"),
        ({"user_features": ["user_id", "item_id", "price"]}, "leave at least one for the item side"),
        ({"sequence": "other"}, "`model.sequence` is `other`, no such group; use one of hist"),
        ({"encoder": "transformer", "hidden": 6, "heads": 4}, "must be a multiple of `model.heads`"),
    ],
)
def test_bad_dupn_configs_are_refused_in_one_line(model, message):
    with pytest.raises(ConfigError, match=message):
        _dupn_cfg(**model)


def test_dupn_without_a_sequence_is_refused():
    d = load_config("esmm").model_dump(mode="json")
    d["model"] = {"arch": "dupn", "user_features": ["user_id"]}
    with pytest.raises(ConfigError, match="`arch: dupn` reads a behaviour sequence but `features.sequences` is empty"):
        parse_config(d)


def test_the_example_reads_its_history_unpooled_through_the_candidates_tables():
    spec = load_config("dupn").spec
    cols = spec.collection_features()
    assert {"item_id", "hist_item_id"} <= set(cols["ec16"]) and {"item_category", "hist_item_category"} <= set(
        cols["ec8"]
    )
    assert "user_id" in cols["ebc"] and not {"hist_item_id", "hist_behavior"} & set(cols["ebc"])
    model = build_model(spec, "cpu")
    assert model.properties == [(32, 36), (36, 40), (40, 44)]  # behavior, scenario, age: not the item's tables


def test_padded_left_aligns_each_row_and_masks_the_rest():
    values = torch.arange(12.0).reshape(6, 2)
    out, mask = padded(values, torch.tensor([2, 0, 3, 1]))
    assert mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert out[0, :2].tolist() == [[0, 1], [2, 3]] and out[2].tolist() == [[4, 5], [6, 7], [8, 9]]
    assert out[3, 0].tolist() == [10, 11] and out[~mask].abs().sum() == 0
    assert padded(torch.zeros(0, 2), torch.zeros(2, dtype=torch.int32))[0].shape == (2, 1, 2)


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"encoder": "transformer"},
        {"readout": "mean"},
        {"readout": "last"},
        {"encoder": "transformer", "readout": "last"},
    ],
    ids=["lstm-attention", "transformer-attention", "lstm-mean", "lstm-last", "transformer-last"],
)
def test_a_rows_scores_do_not_depend_on_its_batch_or_padding(model):
    """Each row scored alone equals the row scored in a batch of rows with longer and empty
    histories: padding is masked everywhere; an empty history scores without NaN."""
    cfg = _dupn_cfg(**model)
    torch.manual_seed(0)
    m = build_model(cfg.spec, "cpu").eval()
    conv = BatchConverter(cfg.spec)
    rows = _rows([h[0] for h in HISTS], [h[1] for h in HISTS], price=pa.array([1.0, 2.0, 3.0, 4.0], pa.float32()))
    together = torch.stack([m(conv(rows))[k] for k in ("ctr", "cvr")], 1)
    assert torch.isfinite(together).all()
    for i in range(len(HISTS)):
        alone = torch.stack([m(conv(rows.slice(i, 1)))[k] for k in ("ctr", "cvr")], 1)
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-6, rtol=1e-5)
    # training (no dropout or BN here, so the same function): finite, and so are the gradients
    m.train()
    out = m(conv(rows))
    torch.testing.assert_close(torch.stack([out[k] for k in ("ctr", "cvr")], 1), together, atol=1e-6, rtol=1e-5)
    (out["ctr"].sum() + out["cvr"].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_the_user_part_never_reads_the_candidate():
    """The same user and history with other items: the user representation is unchanged, the
    scores are not; with another history it changes."""
    cfg = _dupn_cfg()
    torch.manual_seed(0)
    m = build_model(cfg.spec, "cpu").eval()
    conv = BatchConverter(cfg.spec)
    n = 4
    same = dict(user_id=pa.array([3] * n, pa.int64()), price=pa.array([2.0] * n, pa.float32()))
    b = conv(_rows([[5, 6, 7]] * n, [[1, 2, 1]] * n, item_id=pa.array([10, 11, 12, 13], pa.int64()), **same))

    u = m.user_representation(b)
    assert u.shape == (n, m.user_dim) and torch.allclose(u, u[:1].expand(n, -1))
    assert m(b)["ctr"].unique().numel() == n  # the candidates are told apart by the item part
    other = conv(_rows([[9, 9]] * n, [[3, 3]] * n, item_id=pa.array([10, 11, 12, 13], pa.int64()), **same))
    assert not torch.allclose(m.user_representation(other), u)


# ---- the job path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dupn_world(tmp_path_factory) -> tuple[str, list]:
    """3 days of the sequences preset, small: 6,000 rows a day in 2 files, 2,000 users."""
    from mtrec.data.synth import read_world, world_params, write_world

    root = str(tmp_path_factory.mktemp("dupn-world"))
    write_world(
        root, days=3, rows_per_day=6_000, seed=7, files_per_day=2, params=world_params(["users=2000"], "sequences")
    )
    return root, [dt.date.fromisoformat(d) for d in read_world(root)["days"]]


@pytest.mark.slow  # Ray, MLflow (sqlite) and the registry
def test_dupn_trains_on_two_workers_warm_starts_on_one_and_its_champion_scores_a_request(
    ray_local, dupn_world, tmp_path, monkeypatch
):
    """train (2 workers, column_wise) -> nightly (1 worker, table_wise, warm start from the
    2-worker checkpoint) -> promote (BN statistics checked on day 3) -> the champion, loaded with
    plain mlflow, scores one user's request of 100 candidates as it scores each candidate alone
    -> a model of another task starts from the champion (`models:/...@champion`) with its user
    part frozen."""
    import mlflow
    import pandas as pd

    from mtrec.jobs.nightly import run_nightly
    from mtrec.jobs.retrain import run_train
    from mtrec.tracking import promote
    from mtrec.train import checkpoint as ck

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs, (day1, day2, day3) = dupn_world
    d = load_config("dupn", logs=logs, workdir=str(tmp_path / "work")).model_dump(mode="json")
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 5_000)
    d["model"].update(hidden=16, attention=[8], user_tower=[16], item_tower=[16], tower=[16], batch_norm=True)
    d["train"].update(batch_size=128, num_workers=2, cpus_per_worker=1, sharding_types=["column_wise"])
    cfg = parse_config(without_floors(d))  # 12,000 rows: far below the quality floors
    s1 = run_train(cfg, day1, day1)
    assert ck.read_manifest(s1.checkpoint)["world_size"] == 2
    one = cfg.with_train(num_workers=1, sharding_types=["table_wise"])
    (s2,) = run_nightly(one, day2)
    assert s2.world_size == 1 and s2.parent == s1.checkpoint
    # the first champion; BN's running statistics need steps to settle (6,000 rows after 1 day
    # fail the check: the gate holds such a model back)
    decision = promote(one)
    assert decision.promoted and decision.slice == str(day3) and decision.bn == "passed", decision.reason

    uri = f"models:/{cfg.name}@champion"
    model = mlflow.pyfunc.load_model(uri)
    assert (
        decision.challenger
        == "2"
        == str(mlflow.MlflowClient().get_model_version_by_alias(cfg.name, "champion").version)
    )
    day = pd.read_parquet(f"{logs}/dt={day3}")
    user_row = day[day["hist_item_id"].map(len) > 3].iloc[0]
    request = pd.DataFrame([user_row] * 100).reset_index(drop=True)
    candidates = day.drop_duplicates("item_id").iloc[:100]
    for col in (
        "item_id",
        "item_category",
        "brand",
        "shop",
        "price_bucket",
        "item_tags",
        "item_price",
        "item_popularity",
    ):
        request[col] = candidates[col].to_numpy()
    scores = model.predict(request)
    assert scores.shape == (100, 3) and scores["ctr"].nunique() > 90
    assert ((scores.to_numpy() > 0) & (scores.to_numpy() < 1)).all()
    alone = pd.concat([model.predict(request.iloc[[i]]) for i in (0, 37, 99)])
    assert np.abs(alone.to_numpy() - scores.iloc[[0, 37, 99]].to_numpy()).max() < 1e-6
    sent = request.astype(object)  # the user side once: on the first row, None below it
    for col in cfg.model.user_columns(cfg.spec):
        sent.loc[1:, col] = None
    once = model.predict(sent, params={"request": True})
    assert np.abs(once.to_numpy() - scores.to_numpy()).max() < 1e-6

    # the day's user representations, one row per user: their last row's user part
    from mtrec.jobs.predict import predict_to_parquet

    users_out = str(tmp_path / "users.parquet")
    done = predict_to_parquet(uri, logs, day3, str(tmp_path / "scores.parquet"), users_out)
    reps = pd.read_parquet(users_out)
    assert done["users"] == len(reps) == day["user_id"].nunique()
    last = day.drop_duplicates("user_id", keep="last").set_index("user_id")
    from mtrec.tracking import load_served

    served = load_served(uri)
    some = reps.iloc[[0, len(reps) // 2, -1]]
    for u, as_of, rep in zip(some["user_id"], some["as_of"], some["representation"], strict=True):
        assert int(as_of) == last.loc[u, "row_id"] and len(rep) == 16 + 16 + 44  # readout (states, behaviours), u
    want = served.user_representations(pa.Table.from_pandas(last.loc[some["user_id"]].reset_index()))
    np.testing.assert_allclose(np.stack(some["representation"].to_numpy()), want, atol=1e-6)

    # a new task (add-to-cart) starts from the champion's user part, frozen, on 2 workers
    d = cfg.model_dump(mode="json")
    d.update(name="cart", tasks=[{"name": "cart", "label": "daction"}])
    d["model"]["batch_norm"] = False
    cart = parse_config(d).with_train(init_from=uri, freeze=["user"])
    s3 = run_train(cart, day3, day3)
    assert ck.read_manifest(s3.checkpoint)["init_from"] == s2.checkpoint
    source, after = ck.read_full(s2.checkpoint), ck.read_full(s3.checkpoint)
    for k in ("model.model.encoder.weight_hh_l0", "model.model.sparse_arch.ebc.embedding_bags.user_id.weight"):
        assert torch.equal(after[k], source[k]), k  # transferred and frozen
    k = "model.model.sparse_arch.ebc.embedding_bags.shop.weight"
    assert not torch.equal(after[k], source[k])  # transferred, then trained


def test_rows_of_one_user_context_share_one_user_representation():
    """A request's candidates (equal user features, history and user dense columns) are one user
    context: its representation is computed once and each candidate scores as it does alone."""
    cfg = _dupn_cfg(user_features=["user_id", "price"])
    torch.manual_seed(0)
    m = build_model(cfg.spec, "cpu").eval()
    conv = BatchConverter(cfg.spec)
    a, b = ([5, 6, 7], [1, 2, 1]), ([5, 6, 8], [1, 2, 1])  # b differs from a in its last behaviour only
    hists = [a, a, b, a, a, a, a]
    users = [1, 1, 1, 1, 2, 1, 1]  # row 4: another user, same history
    prices = [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0]  # row 5: another user dense value
    rows = _rows(
        [h[0] for h in hists],
        [h[1] for h in hists],
        user_id=pa.array(users, pa.int64()),
        price=pa.array(prices, pa.float32()),
        item_id=pa.array([10, 11, 12, 13, 14, 15, 16], pa.int64()),
    )
    batch = conv(rows)
    seq_keys, ctx_keys = m.user_keys(batch)
    first, inverse = m.distinct(ctx_keys)
    assert inverse.tolist() == [inverse[0]] * 2 + [inverse[2], inverse[0], inverse[4], inverse[5], inverse[0]]
    assert len(set(inverse.tolist())) == 4 and len(first) == 4 and sorted(first.tolist()) == [0, 2, 4, 5]
    seqs, seq_of = m.distinct(seq_keys)  # the encoder runs on 2 sequences: a and b
    assert sorted(seqs.tolist()) == [0, 2] and seq_of.tolist() == [seq_of[0]] * 2 + [seq_of[2]] + [seq_of[0]] * 4
    together = torch.stack([m(batch)[k] for k in ("ctr", "cvr")], 1)
    for i in range(rows.num_rows):
        alone = torch.stack([m(conv(rows.slice(i, 1)))[k] for k in ("ctr", "cvr")], 1)
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-6, rtol=1e-5)


def _small_dupn(logs: str, workdir: str, **train) -> dict:
    d = load_config("dupn", logs=logs, workdir=workdir).model_dump(mode="json")
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 5_000)
    d["model"].update(hidden=16, attention=[8], user_tower=[16], item_tower=[16], tower=[16])
    d["train"].update(batch_size=256, **train)
    d["tracking"]["enabled"] = False
    return d


def test_only_a_model_with_a_user_part_has_user_representations():
    from mtrec.errors import MtrecError
    from mtrec.serving import ServedModel

    d = load_config("esmm").model_dump(mode="json")
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 100)
    spec = parse_config(d).spec
    served = ServedModel(spec, build_model(spec.serving(), "cpu").state_dict())
    with pytest.raises(MtrecError, match="has no user representation; only dupn models have one"):
        served.user_representations(pa.table({}))


def test_freezing_needs_a_part_the_architecture_has():
    d = load_config("esmm").model_dump(mode="json")
    d["train"]["freeze"] = ["user"]
    with pytest.raises(ConfigError, match="only models with a user part"):
        parse_config(d)
    d = load_config("dupn").model_dump(mode="json")
    d["train"]["freeze"] = ["item"]
    with pytest.raises(
        ConfigError, match="`train.freeze` names `item`, which `arch: dupn` does not have; use one of user"
    ):
        parse_config(d)
    # an unset freeze leaves the training fingerprint of earlier checkpoints as it was
    assert "freeze" not in load_config("dupn").training_settings()


def test_a_new_task_starts_from_dupns_weights_and_a_frozen_user_part_stays(seq_world, tmp_path):
    """Representation transfer: a model of another task (add-to-cart) reads every tensor of a
    trained DUPN that fits it; with `freeze: [user]` training leaves the encoder, attention, user
    tower and the user side's tables exactly as transferred, and trains the rest."""
    from mtrec.train import checkpoint as ck
    from mtrec.train.local import build_sharded, train_days

    logs, day1, day2 = seq_world
    src = parse_config(_small_dupn(logs, str(tmp_path / "w")))
    res = train_days(src, [day1])
    url = str(tmp_path / "dupn")
    ck.save(res.dmp, res.optimizer, url, ck.spec_manifest(src))
    d = _small_dupn(logs, str(tmp_path / "w"), freeze=["user"])
    d.update(name="cart", tasks=[{"name": "cart", "label": "daction"}])
    new = parse_config(d)
    dmp, opt = build_sharded(new)
    read = ck.load_matching(dmp, url)
    assert "model.towers.cart.out.weight" not in read and "model.towers.ctr.out.weight" not in read
    assert {"model.encoder.weight_ih_l0", "model.user_tower.0.weight", "model.item_tower.0.weight"} <= set(read)
    start = str(tmp_path / "start")
    ck.save(dmp, opt, start, ck.spec_manifest(new))
    train_days(new, [day2], dmp=dmp, optimizer=opt)
    end = str(tmp_path / "end")
    ck.save(dmp, opt, end, ck.spec_manifest(new))
    source, before, after = ck.read_full(url), ck.read_full(start), ck.read_full(end)
    prefixes, tables = dmp.module.model.frozen("user")
    assert {"user_id", "item_id", "hist_behavior"} <= set(tables) and "shop" not in tables
    for k, v in after.items():
        if not k.startswith("model.model."):
            continue
        name = k.removeprefix("model.model.")
        frozen = name.startswith(tuple(prefixes)) or (name.startswith("sparse_arch.") and name.split(".")[-2] in tables)
        if name.startswith(("encoder.", "sparse_arch.")) or frozen:
            assert torch.equal(before[k], source[k]), f"{name} was not transferred"
        assert torch.equal(v, before[k]) == frozen, f"{name}: frozen {frozen}"


def test_dupn_learns_purchasing_power_as_a_multiclass_task_and_serves_its_classes(tmp_path):
    """DUPN's PPP task: a 7-level user label from the purchasing_power world, trained with
    softmax cross-entropy beside CTR and CVR; evaluation reports accuracy, macro AUC and the macro
    AUC against the world's truth, and the served model returns one probability column per level."""
    from mtrec.data.synth import read_world, world_params, write_world
    from mtrec.eval.evaluate import evaluate_day
    from mtrec.serving import ServedModel
    from mtrec.train import checkpoint as ck
    from mtrec.train.local import train_days

    logs = str(tmp_path / "pp")
    write_world(logs, days=2, rows_per_day=20_000, seed=5, params=world_params(["users=2000"], "purchasing_power"))
    day1, day2 = (dt.date.fromisoformat(d) for d in read_world(logs)["days"])
    d = _small_dupn(logs, str(tmp_path / "w"))
    d["labels"]["power_level"] = "multiclass"
    d["tasks"].append({"name": "power", "label": "power_level", "classes": 7})
    d["features"]["sequences"][0]["features"].append({"name": "hist_price_bucket", "table": "price_bucket"})
    cfg = parse_config(d)
    torch.manual_seed(0)
    res = train_days(cfg, [day1])
    m = evaluate_day(res.dmp.module.model, cfg.spec, logs, day2)
    assert {"power/accuracy", "power/macro_auc", "power/log_loss", "power/macro_auc_truth"} <= m.keys()
    assert m["power/macro_auc_truth_oracle"] > m["power/macro_auc_truth"] > 0.6  # it learnt the level
    assert m["power/macro_auc"] > 0.6 and m["power/accuracy"] > 1.5 / 7
    assert 0.5 < m["ctr/auc"] < 1

    url = str(tmp_path / "ckpt")
    ck.save(res.dmp, res.optimizer, url, ck.spec_manifest(cfg))
    served = ServedModel.from_checkpoint(url)
    rows = pq.read_table(f"{logs}/dt={day2}").slice(0, 50)
    scores = served.predict(rows)
    levels = np.stack([scores[f"power_{k}"] for k in range(7)], axis=1)
    assert "power" not in scores and levels.shape == (50, 7)
    np.testing.assert_allclose(levels.sum(axis=1), 1.0, atol=1e-5)
    assert list(scores) == ["ctr", "cvr", *(f"power_{k}" for k in range(7)), "ctcvr"]


def test_a_request_sends_the_user_side_once(seq_world, tmp_path):
    """`request=True`: one user's candidates, the user's columns (history included) on the first
    row only; the scores equal those of rows that each carry the user's columns in full."""
    from mtrec.errors import MtrecError
    from mtrec.serving import ServedModel

    logs, day1, _ = seq_world
    spec = parse_config(_small_dupn(logs, str(tmp_path))).spec
    assert spec.model.user_columns(spec) == [
        "user_id",
        "user_segment",
        "age_bucket",
        "user_activity",
        "hist_item_id",
        "hist_item_category",
        "hist_brand",
        "hist_behavior",
        "hist_scenario",
        "hist_age_hours",
    ]
    torch.manual_seed(0)
    served = ServedModel(spec, build_model(spec.serving(), "cpu").state_dict())
    day = pq.read_table(f"{logs}/dt={day1}").slice(0, 40)
    user = spec.model.user_columns(spec)
    first = pa.array(np.zeros(40, dtype=np.int64))
    full = day
    for col in user:  # every row carries the first row's user
        full = full.set_column(full.schema.get_field_index(col), col, day.column(col).take(first))
    sent = day
    for col in user:  # the user side on the first row only
        keep = pa.array([True] + [False] * 39)
        sent = sent.set_column(
            sent.schema.get_field_index(col),
            col,
            pc.if_else(keep, day.column(col), pa.nulls(40, day.column(col).type)),
        )
    want, got = served.predict(full), served.predict(sent, request=True)
    for k in served.outputs:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)
    assert len(np.unique(want["ctr"])) > 30  # the candidates differ

    esmm = load_config("esmm").spec
    small = ServedModel(esmm, build_model(esmm.serving(), "cpu").state_dict())
    with pytest.raises(MtrecError, match="has no user part to send once per request"):
        small.predict(pq.read_table(f"{logs}/dt={day1}").slice(0, 2), request=True)
