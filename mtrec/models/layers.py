"""Dense building blocks shared by every architecture: MLP, tower, gate."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> [BatchNorm1d] -> ReLU -> [Dropout], per hidden size.

    Args:
        in_dim (int): input width D.
        hidden (list[int]): hidden sizes; the output width is ``hidden[-1]`` (``in_dim`` if empty).
        batch_norm (bool): BatchNorm1d after each Linear (running statistics: see mtrec.bn).
        dropout (float): dropout probability after each activation.

    Example:
        >>> MLP(8, [16, 4])(torch.zeros(2, 8)).shape     # B x hidden[-1]
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, hidden: list[int], batch_norm: bool = False, dropout: float = 0.0):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        super().__init__(*layers)
        self.out_dim = d


class Tower(nn.Module):
    """A task tower: MLP then its output units. Returns a B-vector (a logit or a regression value),
    or B x K logits for a K-class task (`outputs` = K)."""

    def __init__(
        self, in_dim: int, hidden: list[int], batch_norm: bool = False, dropout: float = 0.0, outputs: int = 1
    ):
        super().__init__()
        self.mlp = MLP(in_dim, hidden, batch_norm, dropout)
        self.out = nn.Linear(self.mlp.out_dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(self.mlp(x))
        return y.squeeze(-1) if y.shape[-1] == 1 else y  # B, or B x K


class Gate(nn.Module):
    """Softmax gate over experts: weights B x E from the gate's input."""

    def __init__(self, in_dim: int, num_experts: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_experts)

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x: B x D, experts: B x E x H -> B x H."""
        w = torch.softmax(self.linear(x), dim=-1)  # B x E
        return torch.einsum("be,beh->bh", w, experts)
