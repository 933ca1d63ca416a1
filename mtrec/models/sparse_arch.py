"""The sparse arch: one TorchRec EmbeddingBagCollection for every sparse feature, shared by all
tasks, concatenated with the dense features."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.spec import FeaturesConfig, Pooling


class SparseArch(nn.Module):
    """Embeddings of all sparse features (single- or multi-hot, pooled) + dense features.

    Args:
        features (FeaturesConfig): one table per sparse feature (`hash_size` x `dim`).
        device (torch.device): build the tables on ``meta`` to shard them later with
            DistributedModelParallel, or on ``cpu`` to run unsharded.

    Example:
        >>> arch = SparseArch(spec.features, torch.device("cpu"))
        >>> arch(batch.sparse, batch.dense).shape      # B x arch.out_dim
    """

    def __init__(self, features: FeaturesConfig, device: torch.device):
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f.name,
                    embedding_dim=f.dim,
                    num_embeddings=f.hash_size,
                    feature_names=[f.name],
                    pooling=PoolingType.MEAN if f.pooling == Pooling.MEAN else PoolingType.SUM,
                )
                for f in features.sparse
            ],
            device=device,
        )
        self.feature_names = [f.name for f in features.sparse]
        self.out_dim = sum(f.dim for f in features.sparse) + len(features.dense)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        # By name, not `.values()`: a sharded collection returns its tables grouped by rank, so the
        # order of `.values()` depends on the sharding plan, and towers trained under one plan
        # would read permuted features under another (e.g. trained on 2 ranks, served on 1).
        emb = self.ebc(sparse).to_dict()  # name -> B x dim
        parts = [emb[name] for name in self.feature_names]
        if dense.shape[1]:
            parts.append(dense)
        return torch.cat(parts, dim=1)  # B x out_dim
