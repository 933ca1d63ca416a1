"""MMoE (Ma et al., KDD 2018): shared experts, one softmax gate per task, one tower per task."""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.base import MultiTaskModel
from mtrec.models.layers import MLP, Gate
from mtrec.spec import MmoeModel, ModelSpec


class MMoE(MultiTaskModel):
    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        m: MmoeModel = spec.model
        d = self.sparse_arch.out_dim
        self.experts = nn.ModuleList(MLP(d, m.expert, m.batch_norm, m.dropout) for _ in range(m.num_experts))
        h = self.experts[0].out_dim
        self.gates = nn.ModuleDict({n: Gate(d, m.num_experts) for n in self.task_names})
        self.towers = nn.ModuleDict({n: self.tower(n, h) for n in self.task_names})

    def task_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # B x E x H
        return {n: self.towers[n](self.gates[n](x, experts)) for n in self.task_names}
