"""The PNGs a run carries, for a person to look at rather than read: calibration per task, the
learned position-bias curve, next-day metrics per trained day. matplotlib's Agg backend (no
display needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from mtrec.eval.evaluate import Predictions
from mtrec.spec import POSITION_COLUMN, BiasFeature, LabelKind, ModelSpec

SHALLOW_TOWER = "model.model.shallow_tower."  # its tensors' prefix in a checkpoint (`checkpoint.read_full`)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def calibration_bins(p: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean prediction, observed rate, rows) per quantile bin of the predictions."""
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    n = np.bincount(idx, minlength=len(edges) - 1)
    keep = n > 0
    mean_p = np.bincount(idx, weights=p, minlength=len(n))[keep] / n[keep]
    rate = np.bincount(idx, weights=y, minlength=len(n))[keep] / n[keep]
    return mean_p, rate, n[keep]


def calibration(spec: ModelSpec, pred: Predictions, path: Path, title: str = "") -> None:
    """Reliability diagram per binary output (a task `given` a parent: on the parent's positive
    rows, as the metrics are; joints: on every impression)."""
    plt = _pyplot()
    curves = []
    for t in spec.tasks:
        if spec.label_kind(t) != LabelKind.BINARY:
            continue
        y = pred.labels[t.label]
        if t.given is None:
            curves.append((t.name, pred.outputs[t.name], y))
        else:
            parent = pred.labels[spec.task(t.given).label]
            curves.append((f"{t.name} (given {t.given})", pred.outputs[t.name][parent > 0], y[parent > 0]))
            curves.append((t.joint_name, pred.outputs[t.joint_name], y * parent))
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for ax, (name, p, y) in zip(axes[0], curves, strict=True):
        if len(p):
            mp, rate, _ = calibration_bins(p.astype(np.float64), y.astype(np.float64))
            ax.plot(mp, rate, "o-", label=f"sum p / sum y = {p.sum() / max(y.sum(), 1e-12):.3f}")
            hi = max(float(mp.max()), float(rate.max()), 1e-6)
            ax.plot([0, hi], [0, hi], "--", color="grey", linewidth=1)
            ax.legend(loc="upper left", fontsize=8)
        ax.set(title=name, xlabel="mean predicted", ylabel="observed rate")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def shallow_tower(spec: ModelSpec, full: dict[str, torch.Tensor]):
    """The trained `ShallowTower` in eval mode, from `checkpoint.read_full` tensors (those under
    `SHALLOW_TOWER` suffice); None when the model has no shallow tower."""
    from mtrec.models.shallow_tower import ShallowTower

    if spec.model.shallow_tower is None:
        return None
    tower = ShallowTower(spec.features.bias, spec.model.shallow_tower)
    tower.load_state_dict({k.removeprefix(SHALLOW_TOWER): v for k, v in full.items() if k.startswith(SHALLOW_TOWER)})
    return tower.eval()


def position_feature(bias: list[BiasFeature]) -> int:
    """The index of the bias feature that reads the position column (the first one if none does)."""
    return next((i for i, f in enumerate(bias) if f.source == POSITION_COLUMN), 0)


def bias_curve(tower, bias: list[BiasFeature], index: int, fixed: dict[int, int] | None = None) -> list[float]:
    """The tower's logit per value 0..num_values-1 of bias feature `index`: the mean over every
    combination of the other features' values (past 1024 combinations: the others at value 0),
    except those in `fixed` (feature index -> value), which are held at their value.

    Example:
        >>> bias_curve(tower, spec.features.bias, 0, fixed={1: 1})     # position, device 1
        [0.41, -0.30, ...]
    """
    fixed = fixed or {}
    others = [[fixed[j]] if j in fixed else range(f.num_values) if j != index else [0] for j, f in enumerate(bias)]
    combos = list(itertools.product(*others))
    if len(combos) > 1024:  # too many to average over: the others at value 0
        combos = [tuple(fixed.get(j, 0) for j in range(len(bias)))]
    curve = []
    with torch.no_grad():
        for v in range(bias[index].num_values):
            rows = torch.tensor([[v if j == index else c[j] for j in range(len(bias))] for c in combos])  # C x F
            curve.append(float(tower(rows).mean()))
    return curve


def spearman(curve: list[float]) -> float:
    """Spearman's rank correlation of a curve with its values 0..n-1 (ties take their mean rank):
    -1 when the logit falls at every step. NaN for a flat curve or fewer than 2 values."""
    y = np.asarray(curve, dtype=np.float64)
    if len(y) < 2 or np.all(y == y[0]):
        return float("nan")
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # the rank each distinct value starts at
    ranks = (first + (counts - 1) / 2)[inverse]
    return float(np.corrcoef(np.arange(len(y)), ranks)[0, 1])


def position_bias(spec: ModelSpec, full: dict[str, torch.Tensor], path: Path) -> list[float] | None:
    """The shallow tower's logit per position (averaged over the other bias features' values), as
    `checkpoint.read_full` tensors hold it, plotted to `path`; None when the model has no shallow tower."""
    tower = shallow_tower(spec, full)
    if tower is None:
        return None
    bias = spec.features.bias
    pos = position_feature(bias)
    curve = bias_curve(tower, bias, pos)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(curve)), curve, "o-")
    ax.set(title=f"learned position bias ({bias[pos].name})", xlabel=bias[pos].name, ylabel="bias logit")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return curve


def trend(history: dict[str, list[tuple[str, float]]], path: Path, title: str = "") -> None:
    """One line per metric: its value on the next day, by the day the model was trained to."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, points in history.items():
        ax.plot([d for d, _ in points], [v for _, v in points], "o-", label=metric)
    ax.set(title=title, xlabel="trained to", ylabel="value on the next day")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
