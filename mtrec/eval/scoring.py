"""The one loop that scores Arrow batches with a model, as served: evaluation, the served model,
the BN statistics check and recalibration all run through it.

Example:
    >>> with evaluating(model):
    ...     for rb, out in score_batches(model, spec, batches):
    ...         out["ctr"].shape                 # rb.num_rows
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import torch

from mtrec.data.batch import BatchConverter
from mtrec.spec import ModelSpec


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode for the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's dense parameters live (a sharded model's tables may sit on meta)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@torch.no_grad()
def score_batches(
    model: torch.nn.Module, spec: ModelSpec, batches: Iterable[pa.RecordBatch]
) -> Iterator[tuple[pa.RecordBatch, dict[str, torch.Tensor]]]:
    """(batch, model outputs) for each Arrow batch, converted as served: no bias features, no
    labels. The model's mode is the caller's (see `evaluating`)."""
    conv, device = BatchConverter(spec), model_device(model)
    for rb in batches:
        yield rb, model(conv(rb, with_bias=False, with_labels=False).to(device))
