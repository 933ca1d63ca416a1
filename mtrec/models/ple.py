"""PLE (Tang et al., RecSys 2020): progressive layered extraction.

Each extraction level has task-specific experts and shared experts. A task's gate mixes its own
experts and the shared ones; a shared gate mixes all experts to feed the next level's shared
experts. After the last level each task's mixture goes to its tower.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.base import MultiTaskModel
from mtrec.models.layers import MLP, Gate
from mtrec.spec import ModelSpec, PleModel


class ExtractionLevel(nn.Module):
    """One CGC level. Inputs: one B x D tensor per task plus one shared; outputs: the same, B x H."""

    def __init__(self, in_dim: int, tasks: list[str], m: PleModel, last: bool):
        super().__init__()
        self.tasks = tasks
        mlp = lambda: MLP(in_dim, m.expert, m.batch_norm, m.dropout)  # noqa: E731
        self.task_experts = nn.ModuleDict({t: nn.ModuleList(mlp() for _ in range(m.task_experts)) for t in tasks})
        self.shared_experts = nn.ModuleList(mlp() for _ in range(m.shared_experts))
        self.gates = nn.ModuleDict({t: Gate(in_dim, m.task_experts + m.shared_experts) for t in tasks})
        self.shared_gate = None if last else Gate(in_dim, len(tasks) * m.task_experts + m.shared_experts)
        self.out_dim = self.shared_experts[0].out_dim

    def forward(
        self, inputs: dict[str, torch.Tensor], shared: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        s = [e(shared) for e in self.shared_experts]
        own = {t: [e(inputs[t]) for e in self.task_experts[t]] for t in self.tasks}
        outs = {t: self.gates[t](inputs[t], torch.stack(own[t] + s, dim=1)) for t in self.tasks}
        if self.shared_gate is None:
            return outs, None
        everything = torch.stack([o for t in self.tasks for o in own[t]] + s, dim=1)  # B x E_all x H
        return outs, self.shared_gate(shared, everything)


class PLE(MultiTaskModel):
    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        m: PleModel = spec.model
        levels, d = [], self.sparse_arch.out_dim
        for i in range(m.levels):
            levels.append(ExtractionLevel(d, self.task_names, m, last=i == m.levels - 1))
            d = levels[-1].out_dim
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleDict({n: self.tower(n, d) for n in self.task_names})

    def task_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, shared = {n: x for n in self.task_names}, x
        for level in self.levels:
            inputs, shared = level(inputs, shared)
        return {n: self.towers[n](inputs[n]) for n in self.task_names}
