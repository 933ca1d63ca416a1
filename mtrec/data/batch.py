"""Arrow record batch -> model inputs (KeyedJaggedTensor + dense + bias + labels), vectorized.

Ids are mapped to embedding rows by hashing (splitmix64 of the int64 id, modulo the table's
`hash_size`), so any id works on any day and no vocabulary is kept. String ids are hashed with
blake2b once per distinct value in the batch. A null scalar id or a null multi-hot list is an empty
bag (length 0).

Example:
    >>> conv = BatchConverter(spec)
    >>> b = conv(record_batch)
    >>> b.sparse.keys()[:2], b.dense.shape, b.labels["click"].shape     # B rows
    (['user_id', 'item_id'], torch.Size([B, 3]), torch.Size([B]))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.data.hashing import splitmix64
from mtrec.spec import ModelSpec


def hash_ids(ids: np.ndarray, size: int) -> np.ndarray:
    """splitmix64(id) mod size, as int64 (vectorized). Shape unchanged."""
    z = splitmix64(ids.astype(np.int64).view(np.uint64))
    return (z % np.uint64(size)).astype(np.int64)


def _ids_to_int(values: pa.Array) -> np.ndarray:
    """Non-null ids (integer or string) -> int64 numpy, strings via blake2b of each distinct value."""
    if pa.types.is_integer(values.type):
        return values.cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False)  # uint64 ids wrap, stay distinct
    enc = pc.dictionary_encode(values)
    table = np.array(
        [
            int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little", signed=True)
            for s in enc.dictionary.to_pylist()
        ],
        dtype=np.int64,
    )
    return table[enc.indices.to_numpy(zero_copy_only=False)]


@dataclass
class Batch:
    """Model inputs for B rows.

    Attributes:
        sparse (KeyedJaggedTensor): one key per sparse feature, hashed row ids.
        dense (Tensor): B x D float32 dense features (D may be 0).
        bias (Tensor | None): B x F int64 bias feature values (clipped to num_values-1);
            None at serving.
        labels (dict[str, Tensor]): label column -> B float32; empty at serving.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    bias: torch.Tensor | None
    labels: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.sparse.to(device),
            self.dense.to(device),
            None if self.bias is None else self.bias.to(device),
            {k: v.to(device) for k, v in self.labels.items()},
        )


class BatchConverter:
    """Converts Arrow record batches with the spec's columns into `Batch`es.

    Args:
        spec (ModelSpec): features (sparse/dense/bias) and labels to read.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.keys = [f.name for f in spec.features.sparse]

    def __call__(self, rb: pa.RecordBatch | pa.Table, with_bias: bool = True, with_labels: bool = True) -> Batch:
        n = rb.num_rows
        values, lengths = [], []
        for f in self.spec.features.sparse:
            col = rb.column(f.source)
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            if f.multi_hot:
                flat = pc.list_flatten(col)  # a null list contributes nothing (whatever lies under it)
                lens = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
                if flat.null_count:  # null ids inside a list are dropped from its bag
                    keep = pc.is_valid(flat).to_numpy(zero_copy_only=False)
                    lens = np.bincount(np.repeat(np.arange(n), lens)[keep], minlength=n).astype(np.int64)
                    flat = flat.filter(pa.array(keep))
                ids = _ids_to_int(flat)
            else:
                valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
                lens = valid.astype(np.int64)
                ids = _ids_to_int(col.filter(pa.array(valid)) if col.null_count else col)
            values.append(hash_ids(ids, f.hash_size))
            lengths.append(lens)
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)).to(torch.int32),
        )
        dense = np.zeros((n, len(self.spec.features.dense)), dtype=np.float32)
        for j, f in enumerate(self.spec.features.dense):
            x = rb.column(f.source).to_numpy(zero_copy_only=False).astype(np.float32)  # a null is NaN here
            if f.fill is not None:
                x = np.where(np.isnan(x), np.float32(f.fill), x)
            dense[:, j] = np.sign(x) * np.log1p(np.abs(x)) if f.log1p else x
        bias = None
        if with_bias and self.spec.features.bias:
            bias = np.stack(
                [
                    np.clip(rb.column(f.source).to_numpy(zero_copy_only=False).astype(np.int64), 0, f.num_values - 1)
                    for f in self.spec.features.bias
                ],
                axis=1,
            )
            bias = torch.from_numpy(bias)
        labels = {}
        if with_labels:
            for col in self.spec.labels:
                labels[col] = torch.from_numpy(rb.column(col).to_numpy(zero_copy_only=False).astype(np.float32))
        return Batch(sparse, torch.from_numpy(dense), bias, labels)


def pad_batch(spec: ModelSpec, rows: int = 2) -> Batch:
    """A stand-in batch for a worker whose share of the stream has run out while others still
    train: every id is row 0 of its table, dense/bias/labels are zeros. The training loop runs it
    with the loss multiplied by 0 and BatchNorm frozen, so it changes nothing; it exists because
    sharded embeddings need every rank in every all-to-all."""
    keys = [f.name for f in spec.features.sparse]
    bias = torch.zeros(rows, len(spec.features.bias), dtype=torch.int64) if spec.features.bias else None
    return Batch(
        KeyedJaggedTensor(
            keys=keys,
            values=torch.zeros(rows * len(keys), dtype=torch.int64),
            lengths=torch.ones(rows * len(keys), dtype=torch.int32),
        ),
        torch.zeros(rows, len(spec.features.dense)),
        bias,
        {col: torch.zeros(rows) for col in spec.labels},
    )
