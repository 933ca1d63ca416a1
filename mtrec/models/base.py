"""What every multi-task model shares: the sparse arch in, the output dict out.

Output dict (stable; keys are the config's task names):

    "<task>"          binary task: probability, B. For a task `given` a parent (cvr given ctr) it
                      is the conditional probability (pCVR = p(buy | click)), defined on every
                      impression. Regression task: the predicted value (of log1p(label) when the
                      task has `log1p: true`), B. Multiclass task: class probabilities, B x K.
    "<task>_logit"    binary task with its own logit (not ESM2's composed cvr), B; multiclass
                      task: its K logits, B x K.
    "<joint>"         for a task with `given`: p(given) x p(task) (ESMM's pCTCVR), B.
    "bias_logit"      the shallow tower's logit, B (training only, when bias features are given).

Sampling correction: a model trained with negatives down-sampled at rate r and positives repeated k
times learns odds k/r times too high for the sampled label. `score_offsets` (task -> log(k/r), given
to `build_model` by whoever knows the training run's sampling) is subtracted from that task's logit
in eval mode (scoring, serving), i.e. p' = p / (p + (1 - p) k / r), before the joints are formed;
training (train mode) is unchanged.

Subclasses implement `task_logits(x)`: one raw B-vector per task (B x K for a K-class task, its
tower built with `classes[task]` outputs) from `features(batch)` (by default the B x D sparse-arch
output).
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.data.batch import Batch
from mtrec.models.layers import Tower
from mtrec.models.shallow_tower import ShallowTower
from mtrec.models.sparse_arch import SparseArch
from mtrec.spec import LabelKind, ModelSpec


class MultiTaskModel(nn.Module):
    """Base class. `entire_space` tells the loss how to train tasks that are `given` a parent:
    through the joint probability on every impression (True, ESMM's idea) or on the parent's
    positive rows only (False, the naive baseline)."""

    entire_space = True

    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__()
        self.task_names = [t.name for t in spec.tasks]
        self.binary = {t.name: spec.label_kind(t) == LabelKind.BINARY for t in spec.tasks}
        self.classes = spec.classes()  # multiclass task -> K
        self._arch = spec.model
        self.joints = {t.name: (t.given, t.joint_name) for t in spec.tasks if t.given is not None}
        self.sparse_arch = SparseArch(spec.features, device, spec.model.sequence_encoder)
        st = spec.model.shallow_tower
        self.shallow_tower = ShallowTower(spec.features.bias, st) if st is not None else None
        roots = [t.name for t in spec.tasks if t.given is None and self.binary[t.name]]
        self.bias_tasks = (st.apply_to or roots[:1]) if st is not None else []
        self.score_offsets: dict[str, float] = {}  # task -> log-odds added by training-time sampling (`build_model`)

    def tower(self, name: str, in_dim: int) -> Tower:
        """Task `name`'s tower over `in_dim` inputs: `model.tower`'s sizes, BN and dropout, and
        one output (K for a K-class task)."""
        m = self._arch
        return Tower(in_dim, m.tower, m.batch_norm, m.dropout, self.classes.get(name, 1))

    def frozen(self, part: str) -> tuple[list[str], list[str]]:
        """What `train.freeze: [part]` fixes: (prefixes of the dense parameters' names in this
        module, embedding tables by name). Architectures with parts (`ArchConfig.parts`) say."""
        raise KeyError(part)

    def features(self, batch: Batch) -> torch.Tensor:
        return self.sparse_arch(batch.sparse, batch.dense)  # B x D

    def task_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.task_logits(self.features(batch))
        out: dict[str, torch.Tensor] = {}
        if self.shallow_tower is not None and batch.bias is not None:
            bias = self.shallow_tower(batch.bias)  # B
            for name in self.bias_tasks:
                logits[name] = logits[name] + bias
            out["bias_logit"] = bias
        return self.outputs(logits, out)

    def outputs(self, logits: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Probabilities from logits, then the joints. A task already in `out` was composed by the
        subclass (ESM2's pCVR) and is kept as is."""
        for name in self.task_names:
            if name in out:
                continue
            if not self.training and name in self.score_offsets:  # back from the sampled space
                logits[name] = logits[name] - self.score_offsets[name]
            if self.binary[name]:
                out[f"{name}_logit"] = logits[name]
                out[name] = torch.sigmoid(logits[name])
            elif name in self.classes:
                out[f"{name}_logit"] = logits[name]
                out[name] = torch.softmax(logits[name], dim=-1)
            else:
                out[name] = logits[name]
        for name, (parent, joint) in self.joints.items():
            out[joint] = out[parent] * out[name]
        return out
