"""The shallow tower (YouTube multitask ranking paper): a small network over bias features
(position, device, ...) whose logit is added to the click logit in training. At serving the bias
features are absent and the tower is skipped, so the served model ranks by relevance alone."""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.layers import Tower
from mtrec.spec import BiasFeature, ShallowTowerConfig


class ShallowTower(nn.Module):
    """Bias logit from bias features.

    Args:
        bias (list[BiasFeature]): the bias features, in the column order of `Batch.bias`.
        cfg (ShallowTowerConfig): embedding dim, hidden sizes, feature dropout.

    Example:
        >>> st = ShallowTower(spec.features.bias, spec.model.shallow_tower)
        >>> st(torch.tensor([[0, 1], [3, 0]])).shape      # B
        torch.Size([2])
    """

    def __init__(self, bias: list[BiasFeature], cfg: ShallowTowerConfig):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(f.num_values, cfg.dim) for f in bias)
        self.tower = Tower(cfg.dim * len(bias), cfg.hidden)
        self.feature_dropout = cfg.feature_dropout

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.cat([emb(values[:, i]) for i, emb in enumerate(self.embeddings)], dim=1)  # B x F*dim
        logit = self.tower(x)  # B
        if self.training and self.feature_dropout:
            # drop the bias term for a random subset of rows (the paper drops the position feature)
            keep = torch.rand_like(logit) >= self.feature_dropout
            logit = logit * keep
        return logit
