"""ESM2 (Wen et al., SIGIR 2020): click -> deterministic action (add-to-cart / wishlist) or other
action -> purchase.

Four heads over the shared embeddings: Y1 = p(click), Y2 = p(daction | click),
Y3 = p(buy | daction), Y4 = p(buy | oaction). Then

    pCTAVR = Y1 * Y2
    pCVR   = Y2 * Y3 + (1 - Y2) * Y4
    pCTCVR = Y1 * pCVR

and three losses on every impression: CTR, CTAVR, CTCVR (task weights from the config).
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.models.base import MultiTaskModel
from mtrec.spec import Esm2Model, ModelSpec

BUY_AFTER_D, BUY_AFTER_O = "buy_after_daction", "buy_after_oaction"


class ESM2(MultiTaskModel):
    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        m: Esm2Model = spec.model
        self.daction_task = m.daction_task
        dar = spec.task(m.daction_task)  # the config checked: binary, given the click task, one purchase task
        others = [t for t in spec.tasks if t.given == dar.given and t.name != dar.name and self.binary[t.name]]
        self.ctr_task, self.buy_task = dar.given, others[0].name
        heads = [n for n in self.task_names if n != self.buy_task] + [BUY_AFTER_D, BUY_AFTER_O]
        self.towers = nn.ModuleDict({n: self.tower(n, self.sparse_arch.out_dim) for n in heads})

    def task_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: tower(x) for n, tower in self.towers.items()}

    def outputs(self, logits: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y2 = torch.sigmoid(logits[self.daction_task])
        y3 = torch.sigmoid(logits.pop(BUY_AFTER_D))
        y4 = torch.sigmoid(logits.pop(BUY_AFTER_O))
        out[BUY_AFTER_D], out[BUY_AFTER_O] = y3, y4
        out[self.buy_task] = y2 * y3 + (1 - y2) * y4  # pCVR
        return super().outputs(logits, out)
