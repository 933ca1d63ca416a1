"""The model zoo: nn.Modules only (no process groups, no Ray, no MLflow).

`build_model(spec, device)` builds the architecture named by ``spec.model`` (its `model_class`); build on
``torch.device("meta")`` and shard with DistributedModelParallel (mtrec.train), or on ``cpu`` to run
unsharded. The output dict is documented in mtrec/models/base.py.
"""

from __future__ import annotations

import importlib

import torch

from mtrec.models.base import MultiTaskModel
from mtrec.models.esm2 import ESM2
from mtrec.models.esmm import ESMM
from mtrec.models.loss import MultiTaskTrain
from mtrec.models.mmoe import MMoE
from mtrec.models.naive_cvr import NaiveCVR
from mtrec.models.ple import PLE
from mtrec.models.shared_bottom import SharedBottom
from mtrec.spec import ModelSpec


def build_model(
    spec: ModelSpec, device: torch.device | str = "meta", score_offsets: dict[str, float] | None = None
) -> MultiTaskModel:
    """The spec's model (its architecture's `model_class`); embedding tables on `device`, dense
    layers on CPU. `score_offsets`: per task, the log-odds training-time sampling added, taken
    off when scoring (`MtrecConfig.score_offsets()`; see mtrec/models/base.py)."""
    module, _, name = spec.model.model_class.partition(":")
    model: MultiTaskModel = getattr(importlib.import_module(module), name)(spec, torch.device(device))
    model.score_offsets = dict(score_offsets or {})
    return model


__all__ = ["ESM2", "ESMM", "MMoE", "MultiTaskModel", "MultiTaskTrain", "NaiveCVR", "PLE", "SharedBottom", "build_model"]
