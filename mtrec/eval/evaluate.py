"""Score a model on a day, or on several pooled into one slice (`evaluate_days`), as served (no
bias features), and report per-task metrics.

Metrics per task (keys ``<name>/<metric>``):

* root binary task (ctr): auc, gauc (per user), ne, calibration, log_loss on every impression;
* task `given` a parent (cvr): the same on the parent's positive rows (the classic CVR metrics),
  and for its joint (ctcvr) on every impression against parent AND task labels;
* regression task: mse (in the model's target space) and pearson correlation;
* multiclass task: accuracy, macro_auc (one-vs-rest, averaged over the classes), log_loss
  (cross-entropy), on every impression: a user-level label counts once per impression.

On the synthetic world (a `_truth` folder beside the logs) it adds, against the truth table:

* ``<ctr>/auc_unbiased``: AUC of pCTR against the true relevance (position effect removed),
  as a soft label; ``/auc_unbiased_oracle`` is the truth scored against itself (the ceiling);
* ``<cvr>/auc_entire_space``: AUC of pCVR over every impression, each counted as a positive with
  weight = true CVR and a negative with weight 1 - true CVR; ``/auc_entire_space_oracle`` likewise;
* ``<task>/macro_auc_truth`` of a multiclass task whose label has truth columns ``<label>_p<k>``
  (the true probability of each class): macro AUC against those soft labels, and its oracle.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtrec.data.io import day_url, filesystem, join
from mtrec.data.synth import TRUTH_DIR
from mtrec.errors import MtrecError
from mtrec.eval.metrics import auc, binary_report, macro_auc, mse, multiclass_report, pearson
from mtrec.eval.scoring import evaluating, score_batches
from mtrec.spec import LabelKind, ModelSpec
from mtrec.train.stream import StreamCounts, day_batches

TRUTH_OF_LABEL = {"click": "p_click_unbiased", "conversion": "cvr"}  # synthetic world's truth columns


@dataclass
class Predictions:
    """Per-row predictions and labels of a day (numpy, N rows)."""

    outputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    user_id: np.ndarray | None  # None when no feature reads user_id (then no GAUC)
    row_id: np.ndarray | None

    @staticmethod
    def pooled(parts: list[Predictions]) -> Predictions:
        """Several days' predictions as one slice, rows in the order of `parts` (row ids repeat
        across days: join the truth day by day, `align_truth`)."""
        cat = np.concatenate
        return Predictions(
            {k: cat([p.outputs[k] for p in parts]) for k in parts[0].outputs},
            {k: cat([p.labels[k] for p in parts]) for k in parts[0].labels},
            None if any(p.user_id is None for p in parts) else cat([p.user_id for p in parts]),
            None if any(p.row_id is None for p in parts) else cat([p.row_id for p in parts]),
        )


def predict_day(
    model: torch.nn.Module, spec: ModelSpec, logs: str, day: dt.date, batch_size: int = 8192
) -> Predictions:
    """Run `model` (a MultiTaskModel, sharded or not) in eval mode over the good rows of `day`
    under the logs root `logs`, as served (no bias features)."""
    outs: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {c: [] for c in spec.labels}
    users, rows = [], []
    with evaluating(model):
        for rb, out in score_batches(model, spec, day_batches(spec, logs, [day], batch_size, StreamCounts())):
            for k, v in out.items():
                outs.setdefault(k, []).append(v.float().cpu().numpy())
            for c in spec.labels:
                labels[c].append(rb.column(c).to_numpy(zero_copy_only=False).astype(np.float32))
            if "user_id" in rb.schema.names:
                users.append(rb.column("user_id").to_numpy(zero_copy_only=False))
            if "row_id" in rb.schema.names:
                rows.append(rb.column("row_id").to_numpy(zero_copy_only=False))
    cat = np.concatenate
    return Predictions(
        {k: cat(v) for k, v in outs.items()},
        {k: cat(v) for k, v in labels.items()},
        cat(users) if users else None,
        cat(rows) if rows else None,
    )


def read_truth(logs: str, day: dt.date) -> pa.Table | None:
    """The synthetic world's truth table for a day (beside the logs root `logs`), or None for real logs."""
    url = day_url(join(logs, TRUTH_DIR), day)
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return None
    tables = []
    for p in sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")):
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def align_truth(pred: Predictions, truth: pa.Table | None) -> dict[str, np.ndarray] | None:
    """A day's truth table's columns in the order of that day's predictions, joined on row_id
    (None for real logs)."""
    if truth is None or pred.row_id is None:
        return None
    t_rows = truth.column("row_id").to_numpy()
    order = np.argsort(t_rows, kind="stable")
    pos = np.minimum(np.searchsorted(t_rows, pred.row_id, sorter=order), len(t_rows) - 1)
    idx = order[pos]
    missing = int(np.sum(t_rows[idx] != pred.row_id))
    if missing or len(np.unique(t_rows)) != len(t_rows):
        raise MtrecError(
            f"the truth table does not match the logs ({missing:,} of {len(pred.row_id):,} row ids missing, "
            f"{len(t_rows) - len(np.unique(t_rows)):,} duplicated); "
            "rewrite the world with `mtrec synth` into an empty --out"
        )
    return {c: truth.column(c).to_numpy()[idx] for c in truth.column_names}


def report(spec: ModelSpec, pred: Predictions, truth: pa.Table | None = None) -> dict[str, float]:
    """Metrics of a day's predictions (see the module docstring for the keys)."""
    return _report(spec, pred, align_truth(pred, truth))


def _report(spec: ModelSpec, pred: Predictions, aligned: dict[str, np.ndarray] | None) -> dict[str, float]:
    """Metrics of predictions, with the truth already in their row order (`align_truth`) or None."""
    out: dict[str, float] = {}
    labels, outputs = pred.labels, pred.outputs
    for t in spec.tasks:
        y = labels[t.label]
        if spec.label_kind(t) == LabelKind.REGRESSION:
            target = np.log1p(y) if t.log1p else y
            out[f"{t.name}/mse"] = mse(outputs[t.name], target)
            out[f"{t.name}/pearson"] = pearson(outputs[t.name], target)
            continue
        if spec.label_kind(t) == LabelKind.MULTICLASS:
            out.update({f"{t.name}/{k}": v for k, v in multiclass_report(outputs[t.name], y).items()})
            truth_cols = [f"{t.label}_p{k}" for k in range(t.classes)]
            if aligned is not None and all(c in aligned for c in truth_cols):
                soft = np.stack([aligned[c].astype(np.float64) for c in truth_cols], axis=1)
                out[f"{t.name}/macro_auc_truth"] = macro_auc(outputs[t.name], soft)
                out[f"{t.name}/macro_auc_truth_oracle"] = macro_auc(soft, soft)
            continue
        if t.given is None:
            metrics = binary_report(outputs[t.name], y, pred.user_id)
        else:
            parent = labels[spec.task(t.given).label] > 0
            groups = None if pred.user_id is None else pred.user_id[parent]
            metrics = binary_report(outputs[t.name][parent], y[parent], groups)
            for k, v in binary_report(
                outputs[t.joint_name], y * labels[spec.task(t.given).label], pred.user_id
            ).items():
                out[f"{t.joint_name}/{k}"] = v
        out.update({f"{t.name}/{k}": v for k, v in metrics.items()})
        truth_col = TRUTH_OF_LABEL.get(t.label)
        if aligned is not None and truth_col in aligned:
            soft = aligned[truth_col].astype(np.float64)
            key = "auc_unbiased" if t.given is None else "auc_entire_space"
            out[f"{t.name}/{key}"] = auc(outputs[t.name], soft)
            out[f"{t.name}/{key}_oracle"] = auc(soft, soft)
    return out


def evaluate_days(model: torch.nn.Module, spec: ModelSpec, logs: str, days: list[dt.date]) -> dict[str, float]:
    """Metrics of `days` pooled: every row of every day scored, then one report as if they were
    one day (not a mean of daily figures), with the truth when the logs are a synthetic world.

    Example:
        >>> evaluate_days(model, spec, "./world", [date(2026, 1, 4), date(2026, 1, 5)])["ctr/auc"]  # doctest: +SKIP
        0.6512
    """
    preds = [predict_day(model, spec, logs, d) for d in days]
    truths = [align_truth(p, read_truth(logs, d)) for p, d in zip(preds, days, strict=True)]  # row ids are per day
    aligned = None
    if truths and all(t is not None for t in truths):
        columns = set.intersection(*(set(t) for t in truths))
        aligned = {c: np.concatenate([t[c] for t in truths]) for c in columns}
    return _report(spec, Predictions.pooled(preds), aligned)


def evaluate_day(model: torch.nn.Module, spec: ModelSpec, logs: str, day: dt.date) -> dict[str, float]:
    """predict_day + report, with the truth table when the logs are a synthetic world."""
    return evaluate_days(model, spec, logs, [day])
