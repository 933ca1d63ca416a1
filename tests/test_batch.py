import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import _batch, _mini

from mtrec.config import parse_config
from mtrec.data.batch import BatchConverter
from mtrec.data.hashing import splitmix64
from mtrec.data.kinds import hash_ids
from mtrec.data.validate import RowValidator
from mtrec.train.stream import rebatch


def cfg(multi_pooling="mean"):
    return parse_config(
        {
            "name": "t",
            "labels": {"click": "binary", "conversion": "binary", "watch_time": "regression"},
            "features": {
                "sparse": [
                    {"name": "user_id", "hash_size": 97},
                    {"name": "tags", "hash_size": 13, "multi_hot": True, "pooling": multi_pooling},
                ],
                "dense": [{"name": "price", "log1p": True}],
                "bias": [{"name": "position", "num_values": 3}],
            },
            "tasks": [{"name": "ctr", "label": "click"}],
            "model": {"arch": "esmm"},
        }
    )


def test_hash_is_deterministic_in_range_and_spreads():
    ids = np.arange(1_000_000, 1_100_000, dtype=np.int64)
    h = hash_ids(ids, 1000)
    assert h.min() >= 0 and h.max() < 1000
    np.testing.assert_array_equal(h, hash_ids(ids, 1000))
    counts = np.bincount(h, minlength=1000)
    assert counts.std() / counts.mean() < 0.15  # sequential ids do not pile up


def test_hashes_keep_their_values():
    """Embedding rows of every checkpoint, the synthetic world and which negatives sampling keeps
    depend on these exact values: a change here orphans every trained model."""
    from mtrec.train.loop import step_seed
    from mtrec.train.sampling import uniform

    ids = np.array([0, 1, -1, 42, 2**63 - 1, -(2**63), 123456789012345], dtype=np.int64)
    assert hash_ids(ids, 97).tolist() == [49, 27, 52, 42, 48, 69, 68]
    assert hash_ids(ids, 2**62).tolist() == [
        2459150361376443823,
        1227844342346046657,
        2655278211686280224,
        4456085495900499605,
        3055647633038352039,
        585116803935106011,
        1755862119724506363,
    ]
    assert uniform(7, np.array([0, 0, 3, 11]), np.array([0, 1, 2, 99999])).tolist() == [
        0.7215081806049702,
        0.23928447285727472,
        0.484371800028246,
        0.25518527571147365,
    ]
    assert uniform(0, np.array([0]), np.array([0])).tolist() == [0.6524484863740322]
    assert (
        uniform(-1, np.array([5]), np.array([6])).tolist()
        == uniform(2**64 - 1, np.array([5]), np.array([6])).tolist()
        == [0.1278663416103517]
    )
    # the reference generator's first three outputs from seed 0 (its state after k steps: k * gamma)
    gamma = np.uint64(0x9E3779B97F4A7C15)
    assert [hex(int(v)) for v in splitmix64(np.arange(3, dtype=np.uint64) * gamma)] == [
        "0xe220a8397b1dcdaf",
        "0x6e789e6aa1b965f4",
        "0x6c45d188009454f",
    ]
    with pytest.raises(TypeError, match="uint64"):
        splitmix64(ids)  # int64 + uint64 would be float64
    # dropout's seed per step: a multiply-xorshift of its own (not splitmix64)
    assert [step_seed(0, 0, 0, 0), step_seed(7, 3, 1000, 1), step_seed(-1, 2**70, 5, 0)] == [
        1802945080459786841,
        4918737022446938112,
        211293458196907736,
    ]


def test_conversion_jagged_nulls_and_strings():
    rb = pa.record_batch(
        {
            "user_id": pa.array(["u1", None, "u1"]),
            "tags": pa.array([[1, 2], None, [3, None]], pa.list_(pa.int64())),
            "price": pa.array([0.0, 9.0, -9.0], pa.float32()),
            "position": pa.array([0, 5, 1], pa.int32()),
            "click": pa.array([1, 0, 1], pa.int8()),
            "conversion": pa.array([0, 0, 1], pa.int8()),
            "watch_time": pa.array([1.5, 0, 2], pa.float32()),
        }
    )
    b = BatchConverter(cfg().spec)(rb)
    kjt = b.sparse["ebc"].to_dict()
    assert kjt["user_id"].lengths().tolist() == [1, 0, 1]  # a null id is an empty bag
    u = kjt["user_id"].values().tolist()
    assert u[0] == u[1] and 0 <= u[0] < 97  # same string, same row
    assert kjt["tags"].lengths().tolist() == [2, 0, 1]  # null list and null element dropped
    torch.testing.assert_close(b.dense[:, 0], torch.tensor([0.0, np.log1p(9.0), -np.log1p(9.0)], dtype=torch.float32))
    assert b.bias[:, 0].tolist() == [0, 2, 1]  # clipped to num_values - 1
    assert b.labels["watch_time"].tolist() == [1.5, 0.0, 2.0]
    assert BatchConverter(cfg().spec)(rb, with_bias=False, with_labels=False).bias is None


def test_boolean_labels_and_bias_and_uint64_ids_work():
    b = _batch(
        click=pa.array([True, False, True]),
        conversion=pa.array([True, True, False]),
        device=pa.array([True, False, False]),
        user_id=pa.array([2**63 + 5, 1, 2], pa.uint64()),
    )
    split = RowValidator(_mini().spec).split(b)
    assert split.bad.column("reason").to_pylist() == ["conversion_without_click"]
    kjt = BatchConverter(_mini().spec)(split.good).sparse["ebc"].to_dict()["user_id"]
    assert kjt.lengths().tolist() == [1, 1] and kjt.values().min() >= 0


def test_null_multi_hot_list_with_values_underneath():
    cfg = parse_config(
        {
            "name": "t",
            "labels": {"click": "binary", "conversion": "binary"},
            "features": {"sparse": [{"name": "tags", "hash_size": 1000, "multi_hot": True}]},
            "tasks": [{"name": "ctr", "label": "click"}],
            "model": {"arch": "esmm"},
        }
    )
    tags = pa.ListArray.from_arrays(
        pa.array([0, 2, 4, 5], pa.int32()), pa.array([1, 2, 3, 4, 5], pa.int64()), mask=pa.array([False, True, False])
    )
    rb = pa.record_batch(
        {"tags": tags, "click": pa.array([0, 0, 0], pa.int8()), "conversion": pa.array([0, 0, 0], pa.int8())}
    )
    kjt = BatchConverter(cfg.spec)(rb).sparse["ebc"].to_dict()["tags"]
    assert kjt.lengths().tolist() == [2, 0, 1] and kjt.values().numel() == 3


@pytest.mark.parametrize(
    ("sizes", "batch", "expected"),
    [
        ([7, 7, 7], 5, [5, 5, 5, 6]),  # 21 rows: tail of 1 merged into the last full batch
        ([10, 3], 5, [5, 5, 3]),  # tail of 3 >= half: kept on its own
        ([4], 5, [4]),
        ([], 5, []),
    ],
)
def test_rebatch_exact_sizes_no_row_lost(sizes, batch, expected):
    start = 0
    parts = []
    for s in sizes:
        parts.append(pa.record_batch({"x": pa.array(range(start, start + s))}))
        start += s
    out = list(rebatch(parts, batch))
    assert [b.num_rows for b in out] == expected
    assert [v for b in out for v in b.column("x").to_pylist()] == list(range(start))
