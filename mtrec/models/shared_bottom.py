"""Shared-bottom: one shared MLP over the embeddings, one tower per task."""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.base import MultiTaskModel
from mtrec.models.layers import MLP
from mtrec.spec import ModelSpec, SharedBottomModel


class SharedBottom(MultiTaskModel):
    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        m: SharedBottomModel = spec.model
        self.bottom = MLP(self.sparse_arch.out_dim, m.bottom, m.batch_norm, m.dropout)
        self.towers = nn.ModuleDict({n: self.tower(n, self.bottom.out_dim) for n in self.task_names})

    def task_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bottom(x)
        return {n: tower(h) for n, tower in self.towers.items()}
