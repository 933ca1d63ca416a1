"""BatchNorm statistics consistency: catch the offline/online mismatch before it ships (DUPN's lesson).

BN's running mean and variance are learned from the *training* stream. When that stream is
filtered or re-balanced (negatives down-sampled, clicks over-sampled: `train.sampling`), the
statistics describe another population than the one the model is served on. Served traffic is then
normalized wrongly, and the model degrades online while offline metrics computed the same wrong
way look fine.

    capture      every BN layer's running mean / var / count, as the checkpoint holds them
    reference    the mean / var of each BN layer's *input* on a serving-like slice: a day's
                 impressions as served (no sampling, no bias features), or, given serving logs
                 (`job.serving_logs`), the candidates serving scored that day; streamed through
                 the model in eval mode with forward hooks; float64 sums, bounded memory (one
                 batch at a time)
    compare      per layer and channel c, with mu/var the running and m/v the reference values:
                   smd   = |mu_c - m_c| / sqrt(v_c)                  standardized mean difference
                   lvr   = log(var_c / v_c)                          log variance ratio
                   kl    = KL(N(m_c, v_c) || N(mu_c, var_c))
                         = 0.5 * (log(var_c / v_c) + (v_c + (m_c - mu_c)^2) / var_c - 1)
                 summarized per layer (mean and max over channels). A layer fails when the mean
                 over its channels of smd, |lvr| or kl exceeds `bn.max_smd`,
                 `bn.max_abs_log_var_ratio` or `bn.max_kl`.
    recalibrate  the fix: each BN layer's running mean and variance become the mean and
                 (unbiased) variance of its input on the serving-like slice, as the served model
                 computes that input: eval mode, every BN layer before it already recalibrated
                 (`settle`). A layer's input depends only on the layers before it, so one pass
                 over the slice fixes the layers 1 deep, the next those 2 deep, ...; passes repeat
                 until one measures what the previous did (depth + 1 passes; the first is the
                 check before). The result is exact population statistics: it does not depend
                 on batch size, row order or how the rows are split across workers, and the check
                 after it finds no drift on that slice. Only BN running means and variances change.

Example:
    >>> report = check(model, spec, logs, day, cfg.bn)   # model: a MultiTaskModel (ServedModel.model)
    >>> report.passed, report.worst
    (False, 'towers.ctr.mlp.1')
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from torch import nn

from mtrec.config import BNCheckConfig
from mtrec.data.io import list_day_files
from mtrec.data.validate import read_schema
from mtrec.errors import DataValidationError
from mtrec.eval.scoring import evaluating, score_batches
from mtrec.eval.sharded import Moments
from mtrec.spec import ModelSpec
from mtrec.train.stream import day_batches, feature_batches

_EPS = 1e-5  # BatchNorm1d's default eps: variances below it are noise
log = logging.getLogger(__name__)


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of `model` by its module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def capture(model: nn.Module, names: list[str] | None = None) -> dict[str, dict]:
    """The running statistics of every BN layer (JSON-ready lists; `names`: those layers only)."""
    return {
        name: {
            "running_mean": m.running_mean.double().tolist(),
            "running_var": m.running_var.double().tolist(),
            "num_batches_tracked": int(m.num_batches_tracked),
        }
        for name, m in bn_layers(model).items()
        if names is None or name in names
    }


def apply(model: nn.Module, captured: dict[str, dict] | None) -> None:
    """Running statistics as `capture` wrote them (a recalibrated version's, over its checkpoint's)
    into `model`'s BN layers of those names; None: nothing.

    Raises:
        ConfigError: a layer the statistics name is not in `model` (another architecture).
    """
    if not captured:
        return
    import torch

    from mtrec.errors import ConfigError

    layers = bn_layers(model)
    unknown = sorted(set(captured) - set(layers))
    if unknown:
        raise ConfigError(
            f"BN statistics name layer(s) {', '.join(unknown)} that the model does not have: they were "
            "recalibrated for another architecture"
        )
    with torch.no_grad():
        for name, st in captured.items():
            m = layers[name]
            m.running_mean.copy_(torch.tensor(st["running_mean"], dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.tensor(st["running_var"], dtype=m.running_var.dtype))
            m.num_batches_tracked.fill_(int(st["num_batches_tracked"]))


def served_bn_names(model: nn.Module) -> list[str]:
    """The BN layers of `model` that the served model keeps (a training model's shallow tower is
    dropped at serving), in forward order."""
    return [name for name in bn_layers(model) if not name.startswith("shallow_tower.")]


def running_stats(model: nn.Module, names: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (running mean, running var)} as float64 arrays (`names`: those layers only)."""
    layers = bn_layers(model)
    return {
        name: (m.running_mean.double().cpu().numpy(), m.running_var.double().cpu().numpy())
        for name, m in layers.items()
        if names is None or name in names
    }


def from_moments(
    model: nn.Module, moments: dict[str, Moments], limits: BNCheckConfig, day: dt.date, population: str
) -> BNReport:
    """The check of `model`'s running statistics against reference moments collected elsewhere
    (on the workers, merged across ranks: `mtrec.eval.sharded`), for the layers in `moments`."""
    rows = max((m.n for m in moments.values()), default=0)
    ref = {name: m.mean_var() for name, m in moments.items()}
    report = compare(running_stats(model, list(moments)), ref, limits, day.isoformat(), rows)
    report.population = population
    return report


def has_serving_logs(serving_logs: str | None, day: dt.date) -> bool:
    """Whether `serving_logs` (None: not configured) holds rows for `day` (`validate.day_rows`).

    Raises:
        ConfigError: the root itself does not exist (a typo would otherwise wait for ever).
        DataValidationError: a file of the day is not readable Parquet.
    """
    from mtrec.data.io import filesystem
    from mtrec.data.validate import day_rows
    from mtrec.errors import ConfigError

    if serving_logs is None:
        return False
    root_fs, root = filesystem(serving_logs)
    if not root_fs.isdir(root):
        raise ConfigError(
            f"the serving logs root {serving_logs} does not exist; fix job.serving_logs (or --serving-logs) "
            "or remove it"
        )
    return day_rows(serving_logs, day) > 0


def serving_batches(
    spec: ModelSpec, logs: str, day: dt.date, batch_rows: int, serving_logs: str | None = None
) -> Iterator[pa.RecordBatch]:
    """A day's population as served, in `batch_rows`-row batches (the last one shorter): the good
    rows of its impressions (the contract's row rules: no NaN feature reaches BN's sums),
    unsampled; or, with `serving_logs`, the good rows of the candidates serving scored that day
    (`mtrec.train.stream.feature_batches`). The caller converts them without bias features or
    labels."""
    if serving_logs is not None:
        yield from feature_batches(spec, serving_logs, day, batch_rows)
        return
    files = list_day_files(logs, day)
    if not files:
        raise DataValidationError(
            f"no logs for {day} under {logs} to compute the serving statistics on; pass a day with logs"
        )
    need = spec.required_columns()
    for f in files:
        names = set(read_schema(f, spec.columns).names)  # one footer read per file
        missing = [c for c in need if c not in names]
        if missing:
            raise DataValidationError(
                f"{f.url} lacks column(s) {', '.join(missing)}; the BN check reads the day under {spec.name}'s "
                "data contract (`mtrec validate` shows what is wrong)"
            )
    yield from day_batches(spec, logs, [day], batch_rows)


def reference(
    model: nn.Module,
    spec: ModelSpec,
    logs: str,
    day: dt.date,
    batch_rows: int = 8192,
    serving_logs: str | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """({layer: (mean, var) of its input on the day as served}, rows): eval mode, forward hooks;
    the day's impressions, or with `serving_logs` its candidates (`serving_batches`)."""
    moments, rows = _measure(model, spec, serving_batches(spec, logs, day, batch_rows, serving_logs))
    if rows == 0:
        raise no_good_rows(day, f"the serving logs under {serving_logs}" if serving_logs else f"the logs under {logs}")
    return {name: m.mean_var() for name, m in moments.items()}, rows


def no_good_rows(day: dt.date, where: str) -> DataValidationError:
    """The error for a slice with no good row to check BN statistics against (`where`: what was
    read, e.g. "the logs under s3://b/logs")."""
    return DataValidationError(
        f"no good row on {day} in {where}: the BN statistics have nothing to be checked against; "
        "`mtrec validate` shows what is wrong with the day's rows"
    )


def _measure(model: nn.Module, spec: ModelSpec, batches: Iterator[pa.RecordBatch]) -> tuple[dict[str, Moments], int]:
    """One pass of `batches` through `model` in eval mode: every BN layer's input moments, rows."""
    layers = bn_layers(model)
    moments = {name: Moments(m.num_features) for name, m in layers.items()}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: moments[name].add(args[0]))
        for name, m in layers.items()
    ]
    rows = 0
    try:
        with evaluating(model):
            for rb, _ in score_batches(model, spec, batches):
                rows += rb.num_rows
    finally:
        for h in hooks:
            h.remove()
    return moments, rows


def figures(mu: np.ndarray, var: np.ndarray, m: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel smd, log variance ratio and KL(N(m, v) || N(mu, var)) (see the module docstring)."""
    var, v = np.maximum(var, _EPS), np.maximum(v, _EPS)
    lvr = np.log(var / v)
    return {
        "smd": np.abs(mu - m) / np.sqrt(v),
        "log_var_ratio": lvr,
        "kl": 0.5 * (lvr + (v + (m - mu) ** 2) / var - 1.0),
    }


@dataclass
class LayerCheck:
    layer: str
    channels: int
    smd_mean: float
    smd_max: float
    abs_log_var_ratio_mean: float
    abs_log_var_ratio_max: float
    kl_mean: float
    kl_max: float
    passed: bool
    failing: list[str] = field(default_factory=list)  # "smd_mean 0.61 > 0.25", ...


# what makes running statistics disagree with the served population, most common first; recalibrating
# installs a normalisation no weight was trained with, so it comes last (docs/bn-consistency.md)
FAILURE_CAUSES = (
    "likely causes, most common first: rows trained in file order from logs written by hour or sorted by "
    "label or user (train.shuffle on, with buffer_rows > 0); a training population unlike serving's "
    "(train.sampling, filtered logs); BN buffers taken from another model; only when the served "
    "population itself has moved, `mtrec bn-check --recalibrate`"
)


@dataclass
class BNReport:
    """The check of one model on one day. `passed` when no layer fails (and when there is no BN)."""

    day: str
    rows: int
    layers: list[LayerCheck]
    thresholds: dict
    seconds: float = 0.0
    population: str = "impressions"  # what the reference was computed on: "impressions" or "serving logs"

    @property
    def passed(self) -> bool:
        return all(lc.passed for lc in self.layers)

    @property
    def worst(self) -> LayerCheck | None:
        return max(self.layers, key=lambda lc: lc.kl_mean, default=None)

    def summary(self) -> str:
        """One line: the verdict and, on failure, the worst failing layer with its figures."""
        if not self.layers:
            return f"BN check on {self.day}: no BN layers; passed"
        rows = f"{self.rows:,} rows" + (" of serving logs" if self.population == "serving logs" else "")
        if self.passed:
            w = self.worst
            return (
                f"BN check on {self.day} ({rows}): passed, {len(self.layers)} layers; "
                f"largest drift {w.layer}: smd {w.smd_mean:.3f}, |log var ratio| {w.abs_log_var_ratio_mean:.3f}, "
                f"kl {w.kl_mean:.3f} (means over channels)"
            )
        bad = [lc for lc in self.layers if not lc.passed]
        w = max(bad, key=lambda lc: lc.kl_mean)
        return (
            f"BN check on {self.day} ({rows}): FAILED, {len(bad)} of {len(self.layers)} layers; "
            f"worst {w.layer}: " + ", ".join(w.failing) + " (means over channels); " + FAILURE_CAUSES
        )

    def table(self) -> list[str]:
        lines = [
            f"{'layer':<40}{'ch':>5}{'smd mean':>10}{'smd max':>9}{'|lvr| mean':>11}{'kl mean':>9}"
            f"{'kl max':>9}  verdict"
        ]
        for lc in self.layers:
            lines.append(
                f"{lc.layer:<40}{lc.channels:>5}{lc.smd_mean:>10.3f}{lc.smd_max:>9.3f}{lc.abs_log_var_ratio_mean:>11.3f}"
                f"{lc.kl_mean:>9.3f}{lc.kl_max:>9.3f}  {'ok' if lc.passed else 'FAIL'}"
            )
        return lines

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow: bn/passed, bn/<layer>/<figure>, bn/max_*."""
        out: dict[str, float] = {"bn/passed": float(self.passed), "bn/layers": float(len(self.layers))}
        for lc in self.layers:
            for k in ("smd_mean", "smd_max", "abs_log_var_ratio_mean", "kl_mean", "kl_max"):
                out[f"bn/{lc.layer}/{k}"] = getattr(lc, k)
        if self.layers:
            out["bn/max_smd_mean"] = max(lc.smd_mean for lc in self.layers)
            out["bn/max_kl_mean"] = max(lc.kl_mean for lc in self.layers)
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)


def compare(
    running: dict[str, tuple[np.ndarray, np.ndarray]],
    ref: dict[str, tuple[np.ndarray, np.ndarray]],
    th: BNCheckConfig,
    day: str = "",
    rows: int = 0,
) -> BNReport:
    """Running (mean, var) per layer against the reference (mean, var) per layer."""
    layers = []
    for name, (mu, var) in running.items():
        m, v = ref[name]
        f = figures(np.asarray(mu, np.float64), np.asarray(var, np.float64), m, v)
        alvr = np.abs(f["log_var_ratio"])
        lc = LayerCheck(
            name,
            len(mu),
            float(f["smd"].mean()),
            float(f["smd"].max()),
            float(alvr.mean()),
            float(alvr.max()),
            float(f["kl"].mean()),
            float(f["kl"].max()),
            True,
        )
        for what, value, limit in (
            ("smd_mean", lc.smd_mean, th.max_smd),
            ("|log var ratio| mean", lc.abs_log_var_ratio_mean, th.max_abs_log_var_ratio),
            ("kl_mean", lc.kl_mean, th.max_kl),
        ):
            if not value <= limit:  # NaN fails too
                lc.failing.append(f"{what} {value:.3f} > {limit:g}")
        lc.passed = not lc.failing
        layers.append(lc)
    return BNReport(day, rows, layers, th.model_dump())


def check(
    model: nn.Module,
    spec: ModelSpec,
    logs: str,
    day: dt.date,
    limits: BNCheckConfig,
    serving_logs: str | None = None,
) -> BNReport:
    """The consistency check of `model` (a MultiTaskModel on CPU) against `day` as served, with
    `limits` (thresholds and batch size): against the day's impressions under the logs root
    `logs`, or, with `serving_logs`, against the candidates serving scored that day."""
    t0 = time.perf_counter()
    population = "impressions" if serving_logs is None else "serving logs"
    layers = bn_layers(model)
    if not layers:
        return BNReport(day.isoformat(), 0, [], limits.model_dump(), time.perf_counter() - t0, population)
    running = running_stats(model)
    ref, rows = reference(model, spec, logs, day, limits.batch_rows, serving_logs)
    report = compare(running, ref, limits, day.isoformat(), rows)
    report.seconds, report.population = time.perf_counter() - t0, population
    return report


def recalibrate(
    model: nn.Module,
    spec: ModelSpec,
    logs: str,
    day: dt.date,
    batch_rows: int = 8192,
    serving_logs: str | None = None,
) -> int:
    """Recompute every BN layer's running statistics on `day` as served (`settle`), on its
    impressions or, with `serving_logs`, its candidates; every other parameter and buffer is left
    bit-identical. Returns the rows used."""
    if not bn_layers(model):
        return 0
    where = f"{day} under {serving_logs or logs}"
    return settle(
        model, lambda: _measure(model, spec, serving_batches(spec, logs, day, batch_rows, serving_logs)), where
    ).rows


@dataclass
class Settled:
    """What `settle` measured: each layer's input moments in the first pass (against the
    statistics as they were: the check before) and in the last (against the recalibrated ones:
    the check after), the rows of a pass and the passes made."""

    before: dict[str, Moments]
    after: dict[str, Moments]
    rows: int
    passes: int


def settle(model: nn.Module, measure: Callable[[], tuple[dict[str, Moments], int]], where: str) -> Settled:
    """Recalibrate the BN layers `measure` collects: each one's running mean and variance become
    the mean and unbiased variance of its input in eval mode, the layers before it recalibrated.
    `measure()` makes one pass over the slice (eval mode; on workers, in lockstep and summed
    across ranks, so every rank sets the same values) and returns the layers' input moments and
    the rows. Pass k settles the layers k deep; passes repeat until one measures what the one
    before did (within 1e-6 of a standard deviation), at most one more than there are layers.

    Raises:
        DataValidationError: fewer than 2 rows on the slice (`where` names it), or a pass that
            read another number of rows than the first.
    """
    before, rows = measure()
    if before and rows < 2:
        raise DataValidationError(
            f"{rows} good row(s) on {where}: BN statistics need 2 or more; recalibrate on a day with logs"
        )
    current, passes, same = before, 1, not before
    for _ in range(len(before)):  # a layer is at most as deep as there are layers
        _set_running(model, current)
        measured, n = measure()
        passes += 1
        if n != rows:
            raise DataValidationError(
                f"a pass over {where} read {n:,} rows, the first {rows:,}: the slice changed while it was read; "
                "rerun the recalibration"
            )
        same = _same_moments(current, measured)
        current = measured
        if same:
            break
    if not same:  # depth <= layers: only float noise above 1e-6 of a deviation can get here
        log.warning("BN recalibration on %s: pass %d still moved the statistics; kept its values", where, passes)
    _set_running(model, current)
    return Settled(before, current, rows, passes)


def _set_running(model: nn.Module, moments: dict[str, Moments]) -> None:
    """Each measured layer's running mean and unbiased variance from its input moments."""
    import torch

    layers = bn_layers(model)
    for name, m in moments.items():
        mean, var = m.mean_var()
        layer = layers[name]
        with torch.no_grad():
            layer.running_mean.copy_(torch.from_numpy(mean))
            layer.running_var.copy_(torch.from_numpy(var * m.n / max(m.n - 1, 1)))


def _same_moments(a: dict[str, Moments], b: dict[str, Moments]) -> bool:
    """Whether two passes measured the same input statistics for every layer."""
    for name, ma in a.items():
        (m1, v1), (m2, v2) = ma.mean_var(), b[name].mean_var()
        v1 = np.maximum(v1, _EPS)
        if np.any(np.abs(m1 - m2) > 1e-6 * np.sqrt(v1)) or np.any(np.abs(v1 - np.maximum(v2, _EPS)) > 1e-6 * v1):
            return False
    return True


def drift_plot(report: BNReport, path) -> None:
    """Per-layer drift (smd and kl, means over channels) against the thresholds, as a PNG."""
    from mtrec.eval.plots import _pyplot

    plt = _pyplot()
    names = [lc.layer for lc in report.layers]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(names) + 3), 4), squeeze=False)
    for ax, key, limit in (
        (axes[0][0], "smd_mean", report.thresholds["max_smd"]),
        (axes[0][1], "kl_mean", report.thresholds["max_kl"]),
    ):
        vals = [getattr(lc, key) for lc in report.layers]
        ax.bar(range(len(names)), vals, color=["tab:blue" if lc.passed else "tab:red" for lc in report.layers])
        ax.axhline(limit, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set(title=f"{key} per BN layer (dashed: limit)")
    fig.suptitle(f"BN statistics vs serving on {report.day}: {'passed' if report.passed else 'FAILED'}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
