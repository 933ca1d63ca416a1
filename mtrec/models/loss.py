"""The thin training wrapper: model outputs + labels -> weighted multi-task loss.

Per task (weights from the config):

* binary root task (ctr): BCE on its logit, every impression;
* binary task `given` a parent (cvr given ctr): BCE of the joint p(parent) x p(task) against
  parent_label AND task_label on every impression (ESMM/ESM2), or - for models with
  ``entire_space = False`` (naive_cvr) - BCE on its logit over the parent's positive rows only;
* regression task: MSE on the value (on log1p(label) when the task has `log1p: true`);
* multiclass task: softmax cross-entropy of its K logits against the class label, every impression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrec.data.batch import Batch
from mtrec.models.base import MultiTaskModel
from mtrec.spec import LabelKind, ModelSpec

_EPS = 1e-7


class MultiTaskTrain(nn.Module):
    """Wraps a model for training (this is what DistributedModelParallel shards).

    Returns:
        (loss, (per_task_losses, outputs, labels)): loss is a scalar; per_task_losses maps task
        name -> detached scalar; outputs is the model's dict; labels the batch's.

    Example:
        >>> loss, (losses, out, labels) = MultiTaskTrain(model, spec)(batch)
    """

    def __init__(self, model: MultiTaskModel, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.specs = [
            (
                t.name,
                t.label,
                spec.label_kind(t),
                t.log1p,
                t.weight,
                None if t.given is None else (spec.task(t.given).label, t.joint_name),
            )
            for t in spec.tasks
        ]

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        out = self.model(batch)
        labels = batch.labels
        total = torch.zeros((), device=batch.dense.device)
        losses: dict[str, torch.Tensor] = {}
        for name, label, kind, log1p, weight, given in self.specs:
            y = labels[label]
            if kind == LabelKind.MULTICLASS:
                loss = F.cross_entropy(out[f"{name}_logit"], y.long())
            elif kind == LabelKind.REGRESSION:
                loss = F.mse_loss(out[name], torch.log1p(y) if log1p else y)
            elif given is None:
                loss = F.binary_cross_entropy_with_logits(out[f"{name}_logit"], y)
            elif self.model.entire_space:
                parent_label, joint = given
                loss = F.binary_cross_entropy(out[joint].clamp(_EPS, 1 - _EPS), y * labels[parent_label])
            else:
                mask = labels[given[0]] > 0
                logit = out[f"{name}_logit"]
                loss = F.binary_cross_entropy_with_logits(logit[mask], y[mask], reduction="sum") / mask.sum().clamp(
                    min=1
                )
            losses[name] = loss.detach()
            total = total + weight * loss
        return total, (losses, out, labels)
