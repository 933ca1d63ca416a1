"""The PNGs a run carries, for a person to look at rather than read: calibration per task, the
learned position-bias curve, next-day metrics per trained day. matplotlib's Agg backend (no
display needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from mtrec.eval.evaluate import Predictions
from mtrec.spec import POSITION_COLUMN, LabelKind, ModelSpec


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


def position_bias(spec: ModelSpec, full: dict[str, torch.Tensor], path: Path) -> list[float] | None:
    """The shallow tower's logit per position (averaged over the other bias features' values), as
    `checkpoint.read_full` tensors hold it; None when the model has no shallow tower."""
    from mtrec.models.shallow_tower import ShallowTower

    st_cfg = spec.model.shallow_tower
    if st_cfg is None:
        return None
    bias = spec.features.bias
    tower = ShallowTower(bias, st_cfg)
    prefix = "model.model.shallow_tower."
    tower.load_state_dict({k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)})
    tower.eval()
    pos = next((i for i, f in enumerate(bias) if f.source == POSITION_COLUMN), 0)
    others = [range(f.num_values) if j != pos else [0] for j, f in enumerate(bias)]
    combos = list(itertools.product(*others))
    if len(combos) > 1024:  # too many to average over: the others at value 0
        combos = [tuple(0 for _ in bias)]
    curve = []
    with torch.no_grad():
        for p in range(bias[pos].num_values):
            rows = torch.tensor(
                [[p if j == pos else c[j] for j in range(len(bias))] for c in combos], dtype=torch.int64
            )
            curve.append(float(tower(rows).mean()))
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
