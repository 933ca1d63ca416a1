"""The sparse arch: every embedding table of the spec, shared by all tasks, and the features they
give, concatenated with the dense features.

Tables live in TorchRec collections (`FeaturesConfig.collections`). A table whose readers all
pool it alike sits in one EmbeddingBagCollection (``ebc``): ids, multi-hot bags and, for
architectures without a sequence encoder, the sequences, each of whose columns is then a bag of
its (truncated) list. A table a sequence encoder reads, or whose readers pool it differently, sits
unpooled in the EmbeddingCollection of its width (``ecs["ec<dim>"]``), and so does every feature
that shares it; TorchRec cannot share one table between a bag collection and an unpooled one, so
such a table is looked up once, unpooled, and pooled here for the features that want a vector
(`_pool`). Either way a shared table is one weight tensor, with gradients from every use and one
row of optimizer state.

Each sequence group is read pooled by the architectures here: its features' vectors side by side,
averaged (or summed) over the behaviours each row has, which is each feature pooled on its own
since a group's lists have equal lengths. `sequences` gives the unpooled form for sequence
encoders.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from mtrec.spec import FeaturesConfig, Pooling


def _pool(values: torch.Tensor, lengths: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Jagged rows (N x d values, B lengths) -> B x d, summed or averaged; an empty row is zeros."""
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths.long())
    out = torch.zeros(lengths.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    out = out.index_add(0, rows, values)  # B x d
    if pooling == Pooling.MEAN:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)
    return out


class SparseArch(nn.Module):
    """Embeddings of all sparse and sequence features (pooled) + dense features.

    Args:
        features (FeaturesConfig): the tables (`hash_size` x `dim`), who reads them, the groups.
        device (torch.device): build the tables on ``meta`` to shard them later with
            DistributedModelParallel, or on ``cpu`` to run unsharded.

    Example:
        >>> arch = SparseArch(spec.features, torch.device("cpu"))
        >>> arch(batch.sparse, batch.dense).shape      # B x arch.out_dim
    """

    def __init__(self, features: FeaturesConfig, device: torch.device, sequence_encoder: bool = False):
        super().__init__()
        collections = features.collections(sequence_encoder)
        self.ebc = (
            EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=t.name,
                        embedding_dim=t.dim,
                        num_embeddings=t.hash_size,
                        feature_names=list(t.features),
                        pooling=PoolingType.MEAN if features.bag_pooling(t.name) == Pooling.MEAN else PoolingType.SUM,
                    )
                    for t in collections["ebc"]
                ],
                device=device,
            )
            if "ebc" in collections
            else None
        )
        self.ecs = nn.ModuleDict(
            {
                key: EmbeddingCollection(
                    tables=[
                        EmbeddingConfig(
                            name=t.name, embedding_dim=t.dim, num_embeddings=t.hash_size, feature_names=list(t.features)
                        )
                        for t in tables
                    ],
                    device=device,
                )
                for key, tables in collections.items()
                if key != "ebc"
            }
        )
        self.sparse = [(f.name, f.pooling) for f in features.sparse]
        self.groups = [(g.name, [f.name for f in g.features], g.pooling) for g in features.sequences]
        self.out_dim = (
            sum(features.table_of(f).dim for f in features.sparse)
            + sum(features.group_dim(g) for g in features.sequences)
            + len(features.dense_inputs())
        )

    def lookup(self, sparse: dict[str, KeyedJaggedTensor]) -> tuple[dict[str, torch.Tensor], dict[str, JaggedTensor]]:
        """(pooled embeddings of the bag collection's features, B x dim each; jagged embeddings of
        every unpooled feature)."""
        # By name, not `.values()`: a sharded collection returns its tables grouped by rank, so the
        # order of `.values()` depends on the sharding plan, and towers trained under one plan
        # would read permuted features under another (e.g. trained on 2 ranks, served on 1).
        pooled = self.ebc(sparse["ebc"]).to_dict() if self.ebc is not None else {}
        jagged: dict[str, JaggedTensor] = {}
        for key, ec in self.ecs.items():
            jagged.update(ec(sparse[key]).items())  # items(): a sharded collection answers lazily
        return pooled, jagged

    def sequences(self, jagged: dict[str, JaggedTensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per group, (N x D behaviour vectors, the group's features side by side; B lengths): the
        jagged form of each row's sequence, oldest first."""
        out = {}
        for name, features, _ in self.groups:
            out[name] = (
                torch.cat([jagged[f].values() for f in features], dim=1),  # N x D
                jagged[features[0]].lengths(),  # B, equal for every feature of the group
            )
        return out

    def vectors(
        self, pooled: dict[str, torch.Tensor], jagged: dict[str, JaggedTensor], groups: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """B x dim per sparse feature, then per feature of each pooled sequence group (`groups`:
        these groups only; default all), from `lookup`'s output: pooled by the bag collection or
        here."""

        def vector(name: str, pooling: Pooling) -> torch.Tensor:
            if name in pooled:
                return pooled[name]
            return _pool(jagged[name].values(), jagged[name].lengths(), pooling)

        out = {name: vector(name, pooling) for name, pooling in self.sparse}
        # a group pooled = its features pooled side by side (their lists have equal lengths)
        for group, features, pooling in self.groups:
            if groups is None or group in groups:
                out.update((f, vector(f, pooling)) for f in features)
        return out

    def forward(self, sparse: dict[str, KeyedJaggedTensor], dense: torch.Tensor) -> torch.Tensor:
        parts = list(self.vectors(*self.lookup(sparse)).values())
        if dense.shape[1]:
            parts.append(dense)
        return torch.cat(parts, dim=1)  # B x out_dim
