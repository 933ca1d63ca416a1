"""Arrow record batch -> model inputs (KeyedJaggedTensors + dense + bias + labels), vectorized.

Each embedding collection of the model (`FeaturesConfig.collections`: ``ebc`` for pooled tables,
``ec<dim>`` for the tables a sequence reads) gets one KeyedJaggedTensor of the features looked up
in it. How a column becomes ids and lengths is its kind's business (`mtrec.data.kinds`): one id,
a bag of ids, or the newest `max_len` elements of a sequence, oldest first.

Example:
    >>> conv = BatchConverter(spec)
    >>> b = conv(record_batch)
    >>> b.sparse["ebc"].keys()[:2], b.dense.shape, b.labels["click"].shape     # B rows
    (['user_id', 'item_id'], torch.Size([B, 3]), torch.Size([B]))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.data.kinds import bias_input, dense_input, sparse_inputs
from mtrec.errors import DataValidationError
from mtrec.spec import ModelSpec


@dataclass
class Batch:
    """Model inputs for B rows.

    Attributes:
        sparse (dict[str, KeyedJaggedTensor]): per embedding collection, one key per feature looked
            up in it, hashed row ids.
        dense (Tensor): B x D float32 dense inputs, `FeaturesConfig.dense_inputs` (D may be 0).
        bias (Tensor | None): B x F int64 bias feature values (clipped to num_values-1);
            None at serving.
        labels (dict[str, Tensor]): label column -> B float32; empty at serving.
    """

    sparse: dict[str, KeyedJaggedTensor]
    dense: torch.Tensor
    bias: torch.Tensor | None
    labels: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device) -> Batch:
        return Batch(
            {k: v.to(device) for k, v in self.sparse.items()},
            self.dense.to(device),
            None if self.bias is None else self.bias.to(device),
            {k: v.to(device) for k, v in self.labels.items()},
        )


class BatchConverter:
    """Converts Arrow record batches with the spec's columns into `Batch`es.

    Args:
        spec (ModelSpec): features (sparse/sequences/dense/bias) and labels to read.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        f = spec.features
        tables = f.tables()
        groups = {x.name: g for g in f.sequences for x in g.features}
        by_name = {x.name: x for x in f.embedded()}
        # collection -> [(feature, its table's rows, its sequence group or None)]
        self.inputs = {
            key: [(by_name[n], tables[by_name[n].table_name].hash_size, groups.get(n)) for n in names]
            for key, names in spec.collection_features().items()
        }

    def __call__(self, rb: pa.RecordBatch | pa.Table, with_bias: bool = True, with_labels: bool = True) -> Batch:
        n = rb.num_rows
        sparse = {}
        for key, inputs in self.inputs.items():
            values, lengths = [], []
            for feature, rows, group in inputs:
                ids, lens = sparse_inputs(feature, rb.column(feature.source), rows, group)
                values.append(ids)
                lengths.append(lens)
            sparse[key] = KeyedJaggedTensor(
                keys=[feature.name for feature, _, _ in inputs],
                values=torch.from_numpy(np.concatenate(values)),
                lengths=torch.from_numpy(np.concatenate(lengths)).to(torch.int32),
            )
        self._check_parallel(sparse)
        inputs = self.spec.features.dense_inputs()
        dense = np.zeros((n, len(inputs)), dtype=np.float32)
        for j, (f, indicator) in enumerate(inputs):
            dense[:, j] = dense_input(f, rb.column(f.source), indicator)
        bias = None
        if with_bias and self.spec.features.bias:
            bias = torch.from_numpy(np.stack([bias_input(f, rb.column(f.source)) for f in self.spec.features.bias], 1))
        labels = {}
        if with_labels:
            for col in self.spec.labels:
                labels[col] = torch.from_numpy(rb.column(col).to_numpy(zero_copy_only=False).astype(np.float32))
        return Batch(sparse, torch.from_numpy(dense), bias, labels)

    def _check_parallel(self, sparse: dict[str, KeyedJaggedTensor]) -> None:
        """A sequence group's lists must have equal lengths in every row (validation quarantines the
        rows that do not; this guards data that reaches the model without it, e.g. `predict`)."""
        if not self.spec.features.sequences:
            return
        lengths = {name: jt.lengths() for kjt in sparse.values() for name, jt in kjt.to_dict().items()}
        for g in self.spec.features.sequences:
            first = lengths[g.features[0].name]
            for f in g.features[1:]:
                bad = int((lengths[f.name] != first).sum())
                if bad:
                    raise DataValidationError(
                        f"sequence `{g.name}`: {bad:,} row(s) have lists of different lengths in "
                        f"`{g.features[0].source}` and `{f.source}` (sequence_length_mismatch); "
                        "validate the logs first (`mtrec validate`) or fix the export"
                    )


def pad_batch(spec: ModelSpec, rows: int = 2) -> Batch:
    """A stand-in batch for a worker whose share of the stream has run out while others still
    train: every id is row 0 of its table, dense/bias/labels are zeros. The training loop runs it
    with the loss multiplied by 0 and BatchNorm frozen, so it changes nothing; it exists because
    sharded embeddings need every rank in every all-to-all."""
    bias = torch.zeros(rows, len(spec.features.bias), dtype=torch.int64) if spec.features.bias else None
    return Batch(
        {
            key: KeyedJaggedTensor(
                keys=names,
                values=torch.zeros(rows * len(names), dtype=torch.int64),
                lengths=torch.ones(rows * len(names), dtype=torch.int32),
            )
            for key, names in spec.collection_features().items()
        },
        torch.zeros(rows, len(spec.features.dense_inputs())),
        bias,
        {col: torch.zeros(rows) for col in spec.labels},
    )
