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
from mtrec.errors import ConfigError, DataValidationError
from mtrec.spec import SequenceOrder

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
    f = _seq_cfg().spec.features
    assert f.tables()["item_id"].features == ("item_id", "hist_item")
    assert f.collections().keys() == {"ebc", "ec8", "ec4"}
    assert f.collection_features() == {"ebc": ["user_id"], "ec8": ["item_id", "hist_item"], "ec4": ["hist_kind"]}
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
    assert cfg.fingerprint() == "b5d7b21e491bb12d"
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
    jt = b.sparse["ec8"].to_dict()
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


def test_history_lookups_alone_move_the_shared_rows():
    """One step of the sharded model on rows whose candidates are items 1..4 and whose histories
    hold items 500..503 only: the history's rows of the one `item_id` table move too."""
    from mtrec.train.local import build_sharded

    cfg = _seq_cfg()
    torch.manual_seed(0)
    dmp, opt = build_sharded(cfg)
    n = 4
    rb = _rows(
        [[500 + i] for i in range(n)],
        [[1] for _ in range(n)],
        item_id=pa.array(range(1, n + 1), pa.int64()),
        click=pa.array([1, 0, 1, 0], pa.int8()),
    )
    weights = [k for k in dmp.state_dict() if k.endswith(".weight") and "item_id" in k]
    assert weights == ["model.sparse_arch.ecs.ec8.embeddings.item_id.weight"]  # one tensor for both uses

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
