"""Behaviour sequences: the spec's groups and shared tables, how list columns become model inputs,
their row rules, and a shared table's single weight."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import _batch

from mtrec.config import load_config, parse_config
from mtrec.data.batch import BatchConverter
from mtrec.data.kinds import NULL_ELEMENT_ID, hash_ids, sequence_take
from mtrec.data.validate import RowValidator
from mtrec.errors import ConfigError, DataValidationError, MtrecError
from mtrec.spec import ModelSpec, SequenceOrder

L = pa.list_(pa.int64())


def _seq_cfg(max_len=3, order="newest_last", hist=None):
    """A minimal config with one sequence group: `hist_item` shares `item_id`'s table."""
    return parse_config(
        {
            "name": "s",
            "labels": {"click": "binary", "conversion": "binary"},
            "features": {
                "sparse": [{"name": "user_id", "hash_size": 10}, {"name": "item_id", "hash_size": 1000, "dim": 8}],
                "sequences": [
                    {
                        "name": "hist",
                        "max_len": max_len,
                        "order": order,
                        "features": hist
                        or [{"name": "hist_item", "table": "item_id"}, {"name": "hist_kind", "hash_size": 4, "dim": 4}],
                    }
                ],
            },
            "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "given": "ctr"}],
            "model": {"arch": "esmm", "tower": [8]},
        }
    )


def _rows(items, kinds, **cols):
    return _batch(hist_item=pa.array(items, L), hist_kind=pa.array(kinds, L), **cols)


# ---- the spec ----------------------------------------------------------------------------------


def test_a_shared_table_is_one_table_in_an_unpooled_collection():
    cfg = _seq_cfg()
    dump = cfg.model_dump(mode="json")  # manifests and artifacts carry it: it must load back as it was
    assert type(cfg).model_validate(dump).model_dump(mode="json")["features"] == dump["features"]
    assert ModelSpec.from_json(cfg.spec.model_dump(mode="json")).shape_hash() == cfg.spec.shape_hash()
    f = cfg.spec.features
    assert f.tables()["item_id"].features == ("item_id", "hist_item")
    # read pooled (every architecture so far): all tables in the bag collection, the history a mean bag
    assert cfg.spec.collection_features() == {"ebc": ["user_id", "item_id", "hist_item", "hist_kind"]}
    assert f.bag_pooling("item_id") == "mean"
    # read by a sequence encoder: the tables sequences read go unpooled, one collection per width
    assert f.collection_features(unpooled_sequences=True) == {
        "ebc": ["user_id"],
        "ec8": ["item_id", "hist_item"],
        "ec4": ["hist_kind"],
    }
    assert f.group_dim(f.sequences[0]) == 8 + 4


@pytest.mark.parametrize(
    "hist, message",
    [
        ([{"name": "h", "table": "nope"}], "`table: nope`: no feature named `nope` has a table of its own"),
        (
            [{"name": "h", "table": "item_id", "dim": 8}],
            "shares the table of `item_id` and takes its hash_size and dim",
        ),
        ([{"name": "h"}], "feature `h` needs `hash_size`"),
        (
            [{"name": "h", "table": "item_id"}, {"name": "h2", "table": "h"}],
            "`table: h`: `h` itself shares a table; name the feature that owns it",
        ),
        ([{"name": "item_id", "hash_size": 4}], "feature name `item_id` is declared twice"),
    ],
)
def test_bad_sequence_specs_are_refused_in_one_line(hist, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        _seq_cfg(hist=hist)
    assert "\n" not in str(e.value)


def test_examples_without_sequences_keep_their_tables_and_fingerprint():
    cfg = load_config("esmm")
    assert cfg.spec.features.collections().keys() == {"ebc"}
    assert cfg.fingerprint() == "62bd216e9a62fa53"
    assert load_config("esmm_seq").fingerprint() != cfg.fingerprint()


# ---- list columns -> inputs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "order, kept",
    [
        (SequenceOrder.NEWEST_LAST, [[], [10], [12, 13, 14], [21, 22, 23]]),  # the tail: the newest
        (SequenceOrder.NEWEST_FIRST, [[], [10], [12, 11, 10], [22, 21, 20]]),  # the head, turned oldest-first
    ],
)
def test_sequences_keep_the_newest_max_len_oldest_first(order, kept):
    lists = [[], [10], [10, 11, 12, 13, 14], [20, 21, 22, 23]]
    flat = np.array([x for row in lists for x in row])
    index, keep = sequence_take(np.array([len(r) for r in lists]), 3, order)
    assert keep.tolist() == [len(r) for r in kept]
    assert flat[index].tolist() == [x for row in kept for x in row]


def test_converter_reads_nulls_and_shares_the_table_rows():
    cfg = _seq_cfg(max_len=2)
    rb = _rows([[5, None, 7], None, [8]], [[1, 2, 3], None, [1]], item_id=pa.array([7, 8, 9], pa.int64()))
    b = BatchConverter(cfg.spec)(rb)
    jt = b.sparse["ebc"].to_dict()
    assert jt["hist_item"].lengths().tolist() == [2, 0, 1]  # a null list is empty; 3 -> the newest 2
    null_row = hash_ids(np.array([NULL_ELEMENT_ID]), 1000)[0]  # a null element keeps its place
    assert jt["hist_item"].values().tolist() == [null_row, *hash_ids(np.array([7, 8]), 1000)]
    assert jt["item_id"].values().tolist() == hash_ids(np.array([7, 8, 9]), 1000).tolist()  # the same rows


def test_converter_refuses_unvalidated_unequal_lists():
    rb = _rows([[1, 2]], [[1]])
    with pytest.raises(DataValidationError, match=r"sequence `hist`: 1 row\(s\) have lists of different lengths"):
        BatchConverter(_seq_cfg().spec)(rb)


# ---- row rules ---------------------------------------------------------------------------------


def test_unequal_lists_are_quarantined_and_long_ones_counted():
    v = RowValidator(_seq_cfg(max_len=2).spec)
    rb = _rows(
        [[1, 2], [1, 2, 3], None, [1], None, [1, 2]],
        [[1, 2], [1, 2, 3], None, [1, 2], [1], [1, 2, None]],
    )
    split = v.split(rb)
    assert split.bad_index.tolist() == [3, 4, 5]
    assert set(split.bad.column("reason").to_pylist()) == {"sequence_length_mismatch"}
    assert v.truncated(split.good) == {"hist": 1}  # row 1: 3 > max_len 2


def test_a_wrong_element_type_names_the_column_and_the_type():
    v = RowValidator(_seq_cfg().spec)
    rb = _batch(hist_item=pa.array([[1.5]], pa.list_(pa.float64())), hist_kind=pa.array([[1]], L))
    with pytest.raises(DataValidationError, match=r"column `hist_item` has type list<item: double>, expected a list"):
        v.check_schema(rb.schema, "f")


# ---- the model ---------------------------------------------------------------------------------


SUMMED_ITEMS = {"name": "item_list", "table": "item_id", "multi_hot": True, "pooling": "sum"}


@pytest.mark.parametrize(
    "extra, weight",
    [
        ([], "model.sparse_arch.ebc.embedding_bags.item_id.weight"),  # every reader pools it: a bag table
        ([SUMMED_ITEMS], "model.sparse_arch.ecs.ec8.embeddings.item_id.weight"),  # mean and sum: unpooled
    ],
)
def test_history_lookups_alone_move_the_shared_rows(extra, weight):
    """One step of the sharded model on rows whose candidates are items 1..4 and whose histories
    hold items 500..503 only: the history's rows of the one `item_id` table move too, in either
    collection the table can live in."""
    from mtrec.train.local import build_sharded

    d = _seq_cfg().model_dump(mode="json")
    d["features"]["sparse"] += extra
    cfg = type(_seq_cfg()).model_validate(d)
    torch.manual_seed(0)
    dmp, opt = build_sharded(cfg)
    n = 4
    rb = _rows(
        [[500 + i] for i in range(n)],
        [[1] for _ in range(n)],
        item_id=pa.array(range(1, n + 1), pa.int64()),
        click=pa.array([1, 0, 1, 0], pa.int8()),
        **({"item_list": pa.array([[] for _ in range(n)], L)} if extra else {}),
    )
    weights = [k for k in dmp.state_dict() if k.endswith(".weight") and "item_id" in k]
    assert weights == [weight]  # one tensor for every use

    def table() -> torch.Tensor:
        return dmp.state_dict()[weights[0]].local_shards()[0].tensor.clone()

    before = table()
    loss, _ = dmp(BatchConverter(cfg.spec)(rb))
    loss.backward()
    opt.step()
    moved = (table() != before).any(dim=1)
    hist_rows = hash_ids(np.arange(500, 500 + n), 1000)
    cand_rows = hash_ids(np.arange(1, n + 1), 1000)
    assert moved[hist_rows].all() and moved[cand_rows].all()
    assert int(moved.sum()) == len(set(hist_rows) | set(cand_rows))


def test_the_served_model_takes_what_the_contract_allows_as_pandas_gives_it():
    """Nullable integer ids arrive from pandas as floats, lists as arrays or None: the served model
    scores them as `mtrec predict` scores the same rows from Parquet; a fractional id is refused."""
    import pandas as pd

    from mtrec.models import build_model
    from mtrec.serving import ServedModel

    cfg = _seq_cfg()
    torch.manual_seed(0)
    served = ServedModel(cfg.spec, build_model(cfg.spec, "cpu").state_dict())
    rows = _rows([[1, 2], None, []], [[1, 1], None, []], user_id=pa.array([1, None, 3], pa.int64()))
    want = served.predict(rows)  # typed, as read from Parquet
    df = pd.DataFrame(
        {
            "user_id": [1.0, np.nan, 3.0],
            "item_id": [0, 1, 2],
            "hist_item": [np.array([1, 2]), None, np.array([], dtype=np.int64)],
            "hist_kind": [[1, 1], None, []],
        }
    )
    got = served.predict_pandas(df)
    for k in served.outputs:
        np.testing.assert_allclose(got[k].to_numpy(), want[k], atol=1e-7)
    with pytest.raises(MtrecError, match=r"input column `user_id` holds ids that are not whole numbers"):
        served.predict_pandas(df.assign(user_id=[1.5, 2.0, 3.0]))
    with pytest.raises(MtrecError, match=r"input column `hist_kind` has type list<item: bool>, expected a list of"):
        served.predict(rows.set_column(8, "hist_kind", pa.array([[True], [False], []])))


# ---- jobs on a world with histories -------------------------------------------------------------


def seq_config(logs: str, workdir: str, **train):
    """The esmm_seq example, small: tables of at most 20,000 rows, batch 256, dropout and a shallow
    tower (so per-step seeds matter), intra-day checkpoints every 8 batches, no MLflow."""
    d = load_config("esmm_seq", logs=logs, workdir=workdir).model_dump(mode="json")
    for f in d["features"]["sparse"]:
        f["hash_size"] = min(f["hash_size"], 20_000)
    d["model"].update(dropout=0.1, shallow_tower={"hidden": [8]})
    d["train"].update(batch_size=256, checkpoint_every_batches=8, **train)
    d["tracking"]["enabled"] = False
    return type(load_config("esmm")).model_validate(d)


# a bag of the history's items, summed, beside the group's mean: the item table goes unpooled
RECENT_ITEMS = {"name": "recent_items", "column": "hist_item_id", "table": "item_id", "multi_hot": True}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, item_table",
    [
        ([], "model.model.sparse_arch.ebc.embedding_bags.item_id.weight"),
        ([RECENT_ITEMS], "model.model.sparse_arch.ecs.ec16.embeddings.item_id.weight"),
    ],
    ids=["bag-tables", "unpooled-tables"],
)
def test_a_sequence_model_trains_on_two_workers_then_warm_starts_and_resumes_on_one(
    ray_local, seq_world, tmp_path, monkeypatch, extra, item_table
):
    """Day 1 on 2 workers (column_wise), day 2 on 1 worker (table_wise) whose worker dies mid-day
    and restarts from an intra-day checkpoint: the shared and the sequence tables reshard
    losslessly, and day 2 equals a process that takes day 1's state and trains day 2 uninterrupted."""
    from test_incremental import assert_same, in_memory_state

    from mtrec.jobs.nightly import run_nightly
    from mtrec.jobs.retrain import run_train
    from mtrec.train import checkpoint as ck
    from mtrec.train.local import build_sharded, train_days

    logs, day1, day2 = seq_world
    cfg = seq_config(logs, str(tmp_path / "work"), num_workers=2, cpus_per_worker=1, sharding_types=["column_wise"])
    d = cfg.model_dump(mode="json")
    d["features"]["sparse"] += extra
    cfg = type(cfg).model_validate(d)
    s1 = run_train(cfg, day1, day1)
    url1 = ck.checkpoint_url(cfg, day1)
    man = ck.read_manifest(url1)
    assert man["world_size"] == 2 and s1.truncated["hist"] == man["truncated"]["hist"] > 0  # lists over max_len 50
    assert {t["sharding_type"] for t in man["plan"].values()} == {"column_wise"}
    full = ck.read_full(url1)
    assert [k for k in full if k.startswith("model.") and k.endswith("item_id.weight")] == [item_table]  # once

    one = cfg.with_train(num_workers=1, sharding_types=["table_wise"])
    dmp, opt = build_sharded(one)
    ck.load(dmp, opt, url1, one)
    resaved = str(tmp_path / "resaved")
    ck.save(dmp, opt, resaved, {"model": cfg.name})
    assert ck.max_abs_diff(full, ck.read_full(resaved))[0] == 0.0  # 2 ranks -> 1 rank: lossless
    reference = in_memory_state(one, train_days(one, [day2], dmp=dmp, optimizer=opt), tmp_path)

    monkeypatch.setenv("MTREC_KILL_WORKER", "0:12")  # dies after 12 batches; restarts from step 8
    (s2,) = run_nightly(one.with_train(max_failures=1), day2)
    assert s2.world_size == 1 and s2.parent == url1 and s2.restarts == 1
    assert ck.read_manifest(ck.checkpoint_url(one, day2))["resumed_at_step"] == 8
    assert_same(ck.read_full(ck.checkpoint_url(one, day2)), reference, "2-worker day 1 -> 1-worker day 2, resumed")


@pytest.mark.slow  # logs a model to MLflow and loads it back
def test_served_pyfunc_and_predict_read_list_columns_and_score_as_training_does(seq_world, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from mtrec.cli import main
    from mtrec.eval.evaluate import predict_day
    from mtrec.serving import ServedModel
    from mtrec.tracking import Tracker, example_rows
    from mtrec.train import checkpoint
    from mtrec.train.local import train_days

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs, day1, day2 = seq_world
    cfg = seq_config(logs, str(tmp_path / "work")).model_copy(deep=True)
    d = cfg.model_dump(mode="json")
    d["tracking"]["enabled"] = True
    cfg = type(cfg).model_validate(d)
    res = train_days(cfg, [day1])
    url = str(tmp_path / "ck")
    checkpoint.save(res.dmp, res.optimizer, url, checkpoint.spec_manifest(cfg))
    served = ServedModel.from_checkpoint(url)
    assert {"hist_item_id", "hist_age_hours"} <= set(served.columns) and "position" not in served.columns
    want = predict_day(res.model, cfg.spec, logs, day2)  # the training side: the sharded model
    order = np.argsort(want.row_id)

    tracker = Tracker(cfg)
    run_id = tracker.start_run("nightly", [day1], url, None, None)
    uri = tracker.log_model(run_id, served, example_rows(logs, day1, served.columns))
    inputs = mlflow.pyfunc.load_model(uri).metadata.get_input_schema().input_types_dict()
    assert "position" not in inputs and inputs["user_activity"].name == "double"
    assert {str(inputs[c]) for c in ("user_id", "item_tags", "hist_item_id")} == {"Any"}  # ids: int or str, nulls
    table = pq.read_table(f"{logs}/dt={day2}")
    df = table.to_pandas()
    pyfunc = mlflow.pyfunc.load_model(uri).predict(df)
    out = tmp_path / "pred.parquet"
    rc = main(
        ["predict", "--config", "esmm_seq", "--logs", logs, "--workdir", cfg.job.workdir, "--date", str(day2)]
        + ["--model", uri, "--out", str(out)]
    )
    assert rc == 0
    written = pq.read_table(out).to_pandas()
    by_row = np.argsort(table.column("row_id").to_numpy())
    for k in ("ctr", "cvr", "ctcvr"):
        assert np.abs(pyfunc[k].to_numpy()[by_row] - want.outputs[k][order]).max() < 1e-6
        assert np.abs(written[k].to_numpy()[by_row] - want.outputs[k][order]).max() < 1e-6
    assert isinstance(written, pd.DataFrame) and len(written) == table.num_rows


def test_validation_counts_a_hidden_mix_of_bad_sequence_rows_exactly(seq_world, tmp_path):
    """Day 1 of the histories world with rows made bad (unequal lists, one null list beside full
    ones) and rows made odd but good (all lists null, null elements, lists made longer than
    max_len): quarantine and truncation counts are exact, and a file whose list holds doubles stops
    the day naming the column and the type."""
    import shutil
    from pathlib import Path

    import pyarrow.parquet as pq

    from mtrec.data.validate import validate_day

    logs, day1, _ = seq_world
    cfg = load_config("esmm_seq", logs=str(tmp_path / "logs"), workdir=str(tmp_path / "work"))
    group = cfg.spec.features.sequences[0]
    cols = [f.source for f in group.features]
    shutil.copytree(Path(logs) / f"dt={day1}", tmp_path / "logs" / f"dt={day1}")
    path = tmp_path / "logs" / f"dt={day1}" / "part-00001.parquet"
    t = pq.read_table(path)
    lists = {c: t.column(c).to_pylist() for c in cols}
    n = t.num_rows
    full = [i for i in range(n) if 3 <= len(lists[cols[0]][i]) < 40]
    rows = {"unequal": full[0:5], "one_null": full[5:8], "all_null": full[8:12], "null_elem": full[12:15]}
    rows["long"] = full[15:21]
    for i in rows["unequal"]:
        lists["hist_brand"][i] = lists["hist_brand"][i][:-1]
    for i in rows["one_null"]:
        lists["hist_scenario"][i] = None
    for i in rows["all_null"]:
        for c in cols:
            lists[c][i] = None
    for i in rows["null_elem"]:
        lists["hist_brand"][i] = [None, *lists["hist_brand"][i][1:]]
    for i in rows["long"]:
        for c in cols:
            lists[c][i] = lists[c][i] * 20  # > max_len 50
    for c in cols:
        t = t.set_column(t.schema.get_field_index(c), c, pa.array(lists[c], t.schema.field(c).type))
    pq.write_table(t, path)
    truncated = sum(  # every file's rows with lists over max_len, the injected ones included
        1
        for f in sorted(path.parent.glob("*.parquet"))
        for x in pq.read_table(f).column(cols[0]).to_pylist()
        if x is not None and len(x) > group.max_len
    )
    rep = validate_day(cfg.spec, cfg.job.logs, day1, cfg.job.workdir, max_bad_fraction=0.5)
    assert rep.by_reason["sequence_length_mismatch"] == 8 and rep.bad_rows == 8
    assert rep.truncated == {"hist": truncated} and truncated >= 6
    assert rep.input_rows == rep.good_rows + 8 == 6_000

    wrong = t.set_column(
        t.schema.get_field_index("hist_age_hours"),
        "hist_age_hours",
        pa.array([None if x is None else [float(v) for v in x] for x in t.column("hist_age_hours").to_pylist()]),
    )
    pq.write_table(wrong, path)
    with pytest.raises(
        DataValidationError,
        match=r"file part-00001.parquet: column `hist_age_hours` has type list<element: double>, expected a list of "
        r"integer or string ids \(list<int64>\) \(required by `features.sequences` \(hist: hist_age_hours\)\)",
    ):
        validate_day(cfg.spec, cfg.job.logs, day1, cfg.job.workdir)


def test_a_group_is_the_masked_mean_of_its_behaviours_and_zeros_when_empty():
    """The pooled read of a group (every architecture without a sequence encoder): per row, the
    mean over its behaviours of the group's vectors side by side; repeated ids count each time."""
    from mtrec.models.sparse_arch import SparseArch

    cfg = _seq_cfg()
    torch.manual_seed(0)
    arch = SparseArch(cfg.spec.features, torch.device("cpu"))
    hists = [([5, 5, 7], [1, 2, 1]), ([], []), ([7], [3]), ([9, 5], [1, 1])]
    b = BatchConverter(cfg.spec)(_rows([h[0] for h in hists], [h[1] for h in hists]))
    x = arch(b.sparse, b.dense)[:, -12:]  # the group, last: hist_item (8) then hist_kind (4)
    tables = {k.split(".")[-2]: v for k, v in arch.state_dict().items() if k.endswith(".weight")}
    for row, (items, kinds) in enumerate(hists):
        if not items:
            assert torch.equal(x[row], torch.zeros(12))
            continue
        behaviours = torch.cat(
            [tables["item_id"][hash_ids(np.array(items), 1000)], tables["hist_kind"][hash_ids(np.array(kinds), 4)]],
            dim=1,
        )
        torch.testing.assert_close(x[row], behaviours.mean(dim=0))
