"""ESMM (Ma et al., SIGIR 2018): CTR and CVR towers over shared embeddings; pCTCVR = pCTR x pCVR.

Both losses are on every impression — BCE(click, pCTR) + BCE(click AND conversion, pCTCVR) —
so pCVR is learned over the entire space, without the sample-selection bias of training it on
clicked rows only (see naive_cvr.py). pCVR (``out["cvr"]``) is exposed for scoring.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.base import MultiTaskModel
from mtrec.spec import ModelSpec


class ESMM(MultiTaskModel):
    """One tower per task straight on the shared embeddings (ESMM shares nothing else)."""

    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        self.towers = nn.ModuleDict({n: self.tower(n, self.sparse_arch.out_dim) for n in self.task_names})

    def task_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: tower(x) for n, tower in self.towers.items()}
