"""The served model: a checkpoint's weights in a plain CPU model, scoring raw feature columns.

What serving sees differs from training in three ways, all decided here once:

* no bias features: the shallow tower is not part of the served model (its weights are left out
  and the model is built without it), so scores rank by relevance alone;
* no labels, no process group: an unsharded model (TorchRec's EmbeddingBagCollection runs on CPU
  as is) built from the checkpoint's whole tables, whatever world size and sharding wrote them;
* outputs in label space: binary tasks and joints as probabilities, regression tasks as values
  (a `log1p: true` task is mapped back with expm1).

The MLflow pyfunc model (mtrec.tracking), `mtrec predict` and the promotion gate all score through
`ServedModel`, so what is evaluated is what is served.

Example:
    >>> served = ServedModel.from_checkpoint(cfg, "work/checkpoints/esmm_synth/dt=2026-01-03")
    >>> served.predict(table)["ctr"].shape          # N rows of raw feature columns
    (N,)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mtrec.config import LabelKind, MtrecConfig
from mtrec.data.batch import BatchConverter
from mtrec.errors import MtrecError

WEIGHTS = "weights.pt"
CONFIG = "config.json"
_PREFIX = "model.model."  # checkpoint key of a model tensor: DMP(MultiTaskTrain(model)) state dict


def serving_config(cfg: MtrecConfig) -> MtrecConfig:
    """The config of the served model: the same, without the shallow tower."""
    if cfg.model.shallow_tower is None:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"shallow_tower": None})})


class ServedModel:
    """A MultiTaskModel on CPU in eval mode, with the columns it reads and the outputs it returns.

    Args:
        cfg (MtrecConfig): the training config (the shallow tower, if any, is dropped).
        state (dict[str, Tensor]): the model's state dict without the shallow tower.
    """

    def __init__(self, cfg: MtrecConfig, state: dict[str, torch.Tensor]):
        from mtrec.models import build_model

        self.cfg = serving_config(cfg)
        self.model = build_model(self.cfg, "cpu")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MtrecError(f"the weights do not fit {cfg.name}'s model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                             "they were written under another config - export them again from the right checkpoint")
        self.model.eval()
        self.conv = BatchConverter(self.cfg)
        f = self.cfg.features
        self.columns = list(dict.fromkeys([s.source for s in f.sparse] + [d.source for d in f.dense]))
        self.outputs = [t.name for t in self.cfg.tasks] + [t.joint_name for t in self.cfg.tasks if t.joint_name]
        self._expm1 = {t.name for t in self.cfg.tasks if t.log1p and self.cfg.label_kind(t) == LabelKind.REGRESSION}

    @classmethod
    def from_checkpoint(cls, cfg: MtrecConfig, url: str) -> ServedModel:
        """The model tensors of a checkpoint (any world size, any sharding), shallow tower left out."""
        from mtrec.train import checkpoint

        return cls.from_state(cfg, checkpoint.read_full(url), url)

    @classmethod
    def from_state(cls, cfg: MtrecConfig, full: dict[str, torch.Tensor], url: str = "the checkpoint") -> ServedModel:
        """From `checkpoint.read_full`'s tensors (model, optimizers; only the model's are kept)."""
        state = {k.removeprefix(_PREFIX): v for k, v in full.items()
                 if k.startswith(_PREFIX) and not k.startswith(f"{_PREFIX}shallow_tower.")}
        if not state:
            raise MtrecError(f"{url} holds no model tensors; it is not an mtrec checkpoint - pass a dt=YYYY-MM-DD folder")
        return cls(cfg, state)

    @classmethod
    def load(cls, path: str | Path) -> ServedModel:
        """A model saved with `save` (the MLflow model's artifact folder)."""
        from mtrec.config import parse_config

        path = Path(path)
        cfg = parse_config(json.loads((path / CONFIG).read_text()), label=str(path / CONFIG))
        return cls(cfg, torch.load(path / WEIGHTS, map_location="cpu", weights_only=True))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path / WEIGHTS)
        (path / CONFIG).write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))

    def _check(self, names: list[str]) -> None:
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise MtrecError(f"the input lacks feature column(s) {', '.join(missing)}; the model reads {', '.join(self.columns)}")

    @torch.no_grad()
    def predict(self, batch: pa.Table | pa.RecordBatch, batch_rows: int = 8192) -> dict[str, np.ndarray]:
        """Per-output scores (N float32 each) of N rows holding at least `self.columns` (other
        columns are ignored).

        Raises:
            MtrecError: a feature column is missing.
        """
        self._check(batch.schema.names)
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.outputs}
        for rb in batch.select(self.columns).to_batches(max_chunksize=batch_rows):
            out = self.model(self.conv(rb, with_bias=False, with_labels=False))
            for k in self.outputs:
                v = out[k].float()
                parts[k].append((torch.expm1(v) if k in self._expm1 else v).numpy())
        return {k: np.concatenate(v) if v else np.zeros(0, dtype=np.float32) for k, v in parts.items()}

    def predict_pandas(self, df):
        """A pandas DataFrame of raw feature columns -> a DataFrame with one column per output."""
        import pandas as pd

        self._check(list(df.columns))
        return pd.DataFrame(self.predict(pa.Table.from_pandas(df[self.columns], preserve_index=False)))
