"""Ranking-model metrics over numpy arrays: AUC (weighted, soft labels), GAUC, NE, calibration,
log loss; for a multiclass task, accuracy, macro AUC and cross-entropy; for a regression task,
MSE and Pearson correlation. A figure a slice cannot give is nan, never a huge number: AUC, GAUC,
NE and calibration of a slice with one class, Pearson of a constant, anything of an empty slice.

Written here rather than taken from torchmetrics / torchrec.metrics because two of them need
what those do not offer in one pass: sample weights with soft labels (the entire-space CVR AUC
against the synthetic world's truth) and per-user grouping (GAUC). Each is O(n log n) and is
checked against scikit-learn in tests/test_metrics.py.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-7


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal key tuples in sorted arrays."""
    change = np.zeros(len(keys[0]), dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def auc(pred: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Area under the ROC curve; ties count one half.

    Args:
        pred (ndarray): scores, N.
        label (ndarray): 0/1 labels, or soft labels in [0, 1]: a row then counts as a positive with
            weight ``w * label`` and a negative with weight ``w * (1 - label)``.
        weight (ndarray | None): row weights, N.

    Returns:
        float: AUC, or nan when one class has no weight.

    Example:
        >>> auc(np.array([0.1, 0.9]), np.array([0, 1]))
        1.0
    """
    pred = np.asarray(pred, dtype=np.float64)
    if not pred.size:
        return float("nan")
    w = np.ones_like(pred) if weight is None else np.asarray(weight, dtype=np.float64)
    y = np.asarray(label, dtype=np.float64)
    order = np.argsort(pred, kind="mergesort")
    p, wp, wn = pred[order], (w * y)[order], (w * (1 - y))[order]
    starts = _group_starts(p)
    gp, gn = np.add.reduceat(wp, starts), np.add.reduceat(wn, starts)
    neg_below = np.cumsum(gn) - gn
    total = gp.sum() * gn.sum()
    return float(np.sum(gp * (neg_below + 0.5 * gn)) / total) if total > 0 else float("nan")


def auc_standard_error(a: float, positives: float, negatives: float) -> float:
    """Standard error of an AUC `a` measured on `positives` and `negatives` (Hanley & McNeil 1982);
    inf when either is empty.

    Example:
        >>> round(auc_standard_error(0.5, 100, 1900), 4)
        0.0296
    """
    if positives <= 0 or negatives <= 0:
        return float("inf")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    return float(np.sqrt(max(var, 0.0)))


def gauc(pred: np.ndarray, label: np.ndarray, group: np.ndarray) -> float:
    """Group AUC: per-group (user) AUC averaged with impression weights, over groups that have
    both a positive and a negative."""
    pred = np.asarray(pred, dtype=np.float64)
    if not pred.size:
        return float("nan")
    y = np.asarray(label, dtype=np.float64)
    order = np.lexsort((pred, group))
    g, p, y = np.asarray(group)[order], pred[order], y[order]
    starts = _group_starts(g, p)  # runs of equal (group, pred)
    gp, gn = np.add.reduceat(y, starts), np.add.reduceat(1 - y, starts)
    cnt = np.diff(np.append(starts, len(p)))
    gid = g[starts]
    ustarts = _group_starts(gid)  # first run of each group
    run_user = np.repeat(np.arange(len(ustarts)), np.diff(np.append(ustarts, len(gid))))
    cum = np.cumsum(gn)
    neg_below = cum - gn - np.append(0, cum)[ustarts][run_user]
    num = np.bincount(run_user, gp * (neg_below + 0.5 * gn))
    pos, neg = np.bincount(run_user, gp), np.bincount(run_user, gn)
    n = np.bincount(run_user, cnt)
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return float("nan")
    return float(np.sum(n[ok] * num[ok] / (pos[ok] * neg[ok])) / n[ok].sum())


def log_loss(pred: np.ndarray, label: np.ndarray) -> float:
    if not len(pred):
        return float("nan")
    p = np.clip(np.asarray(pred, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(label, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def both_classes(label: np.ndarray) -> bool:
    """Whether a slice holds weight on both classes (a soft label counts on each side): what every
    ratio to a label statistic below needs, as AUC does (a one-class slice gave NE ~4.5e5)."""
    y = np.asarray(label, dtype=np.float64)
    return bool(y.size) and float(np.sum(y)) > 0 and float(np.sum(1 - y)) > 0


def normalized_entropy(pred: np.ndarray, label: np.ndarray) -> float:
    """Log loss divided by the entropy of the base rate (He et al., 2014): < 1 beats the prior.
    nan on a slice of one class, like AUC: its base entropy is 0, so the ratio means nothing."""
    if not both_classes(label):
        return float("nan")
    rate = float(np.mean(np.asarray(label, dtype=np.float64)))
    return log_loss(pred, label) / -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))


def calibration(pred: np.ndarray, label: np.ndarray) -> float:
    """Sum of predictions / sum of labels: 1.0 is calibrated. nan on a slice of one class, like AUC:
    without positives there is nothing to divide by, and on positives alone it reads the mean
    prediction, <= 1 whatever the model."""
    if not both_classes(label):
        return float("nan")
    return float(np.sum(np.asarray(pred, dtype=np.float64)) / np.sum(np.asarray(label, dtype=np.float64)))


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean squared error; nan on an empty slice."""
    if not len(pred):
        return float("nan")
    return float(np.mean((np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)) ** 2))


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson correlation; nan with fewer than 2 rows or a constant side (its standard deviation
    divides), like AUC on one class."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return float("nan")
    return float(np.corrcoef(p, t)[0, 1])


def binary_report(pred: np.ndarray, label: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
    """auc, gauc (when groups are given), ne, calibration, log_loss, the row count and the sum of
    the labels (`positives`: what the standard errors of auc and calibration depend on)."""
    out = {
        "auc": auc(pred, label),
        "ne": normalized_entropy(pred, label),
        "calibration": calibration(pred, label),
        "log_loss": log_loss(pred, label),
        "rows": float(len(pred)),
        "positives": float(np.sum(label)),
    }
    if group is not None:
        out["gauc"] = gauc(pred, label, group)
    return out


def macro_auc(prob: np.ndarray, label: np.ndarray) -> float:
    """One-vs-rest AUC averaged over the classes (columns of `prob`, N x K) that have both
    positives and negatives; `label` is N class indices, or N x K soft labels (class
    probabilities) counted like `auc`'s. nan when no class has both."""
    prob = np.asarray(prob, dtype=np.float64)
    label = np.asarray(label)
    soft = label.ndim == 2
    per = [auc(prob[:, k], label[:, k] if soft else (label == k)) for k in range(prob.shape[1])]
    per = [a for a in per if not np.isnan(a)]
    return float(np.mean(per)) if per else float("nan")


def multiclass_report(prob: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """accuracy (argmax), macro_auc, log_loss (cross-entropy of the true class), the row count
    and the rows of the rarest class present (`positives`: the class whose one-vs-rest AUC is the
    noisiest), of N x K class probabilities against N class indices."""
    prob = np.asarray(prob, dtype=np.float64)
    y = np.asarray(label).astype(np.int64)
    if not len(y):
        return {
            "accuracy": float("nan"),
            "macro_auc": float("nan"),
            "log_loss": float("nan"),
            "rows": 0.0,
            "positives": 0.0,
        }
    counts = np.bincount(y, minlength=prob.shape[1])
    return {
        "accuracy": float(np.mean(np.argmax(prob, axis=1) == y)),
        "macro_auc": macro_auc(prob, y),
        "log_loss": float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], _EPS, 1.0)))),
        "rows": float(len(y)),
        "positives": float(counts[counts > 0].min()),
    }
