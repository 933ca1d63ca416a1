"""The baseline the ESMM paper beats (its BASE): a CVR model trained on clicked impressions only.

Two independent models in one module: a CTR model (its own embeddings and tower, trained on every
impression) and a CVR model (its own embeddings and tower, trained on clicked impressions only).
The CVR side never sees an unclicked impression in training, yet scores all of them: the
sample-selection bias and data sparsity ESMM removes. pCTCVR = pCTR x pCVR as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.data.batch import Batch
from mtrec.models.base import MultiTaskModel
from mtrec.models.sparse_arch import SparseArch
from mtrec.spec import ModelSpec


class NaiveCVR(MultiTaskModel):
    entire_space = False  # the loss trains `given` tasks on the parent's positive rows only

    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        m = spec.model
        self.conditional = [t.name for t in spec.tasks if t.given is not None]
        # tables of its own: not shared with the CTR side
        self.cvr_sparse_arch = SparseArch(spec.features, device, m.sequence_encoder)
        self.towers = nn.ModuleDict(
            {
                n: self.tower(n, (self.cvr_sparse_arch if n in self.conditional else self.sparse_arch).out_dim)
                for n in self.task_names
            }
        )

    def features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sparse_arch(batch.sparse, batch.dense), self.cvr_sparse_arch(batch.sparse, batch.dense)

    def task_logits(self, x: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctr_x, cvr_x = x
        return {n: tower(cvr_x if n in self.conditional else ctr_x) for n, tower in self.towers.items()}
