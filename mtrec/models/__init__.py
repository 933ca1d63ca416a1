"""The model zoo: nn.Modules only (no process groups, no Ray, no MLflow).

`build_model(cfg, device)` picks the architecture from ``cfg.model.arch``; build on
``torch.device("meta")`` and shard with DistributedModelParallel (mtrec.train), or on ``cpu`` to run
unsharded. The output dict is documented in mtrec/models/base.py.
"""

from __future__ import annotations

import torch

from mtrec.config import Arch, MtrecConfig
from mtrec.models.base import MultiTaskModel
from mtrec.models.esm2 import ESM2
from mtrec.models.esmm import ESMM
from mtrec.models.loss import MultiTaskTrain
from mtrec.models.mmoe import MMoE
from mtrec.models.naive_cvr import NaiveCVR
from mtrec.models.ple import PLE
from mtrec.models.shared_bottom import SharedBottom

ARCHS: dict[Arch, type[MultiTaskModel]] = {
    Arch.SHARED_BOTTOM: SharedBottom,
    Arch.ESMM: ESMM,
    Arch.ESM2: ESM2,
    Arch.NAIVE_CVR: NaiveCVR,
    Arch.MMOE: MMoE,
    Arch.PLE: PLE,
}


def build_model(cfg: MtrecConfig, device: torch.device | str = "meta") -> MultiTaskModel:
    """The configured model; embedding tables on `device`, dense layers on CPU."""
    return ARCHS[Arch(cfg.model.arch)](cfg, torch.device(device))


__all__ = ["ARCHS", "ESM2", "ESMM", "MMoE", "MultiTaskModel", "MultiTaskTrain", "NaiveCVR", "PLE", "SharedBottom", "build_model"]
