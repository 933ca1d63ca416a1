"""Scoring a sharded model where it lives: every rank scores its share of a day's stream, in
lockstep, and the figures are merged across the ranks, so nothing after training needs the whole
model (or the whole day) in one process.

    score_shard    this rank's batches through the model in eval mode, as served (no bias
                   features); every rank takes the same number of forwards (sharded tables make
                   each one a collective: a rank whose share has run out scores a pad batch and
                   throws it away); keeps the compact per-row arrays the metrics need (outputs,
                   labels, user and row ids: ~40 bytes a row) and, with BN layers, the moments of
                   each layer's input (count, sum, sum of squares, float64)
    merge          the moments summed over the ranks (exact up to float64 rounding), the per-row
                   arrays gathered to rank 0 (`dist.gather_object`), where `evaluate._report`
                   computes the same exact metrics, NaN on a single class, as a single process does

AUC and GAUC need every row's rank, so the rows are gathered, not sketched: at 4M rows a day rank 0
receives ~160 MB, which a Ray Train worker holds easily; the driver receives only the figures.
World size 1 takes no collective.

Example (on every rank of a process group, `model` = `dmp.module.model`):
    >>> mine = score_shard(model, spec, batches, bn_names)
    >>> merged = merge(mine)                # rank 0: Scored with every rank's rows; others: None
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from mtrec.config import MtrecConfig
from mtrec.data.batch import BatchConverter, pad_batch
from mtrec.eval.evaluate import Predictions
from mtrec.eval.scoring import evaluating, model_device
from mtrec.spec import ModelSpec
from mtrec.train.position import FILE_COL


class Moments:
    """Per-channel count, sum and sum of squares (float64) of a BN layer's inputs: mergeable."""

    def __init__(self, channels: int):
        self.n = 0
        self.s = np.zeros(channels)
        self.ss = np.zeros(channels)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2).reshape(-1, x.shape[1])  # rows x C
        self.n += x.shape[0]
        self.s += x.sum(0).numpy()
        self.ss += (x * x).sum(0).numpy()

    def merge(self, other: Moments) -> None:
        self.n += other.n
        self.s += other.s
        self.ss += other.ss

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s / max(self.n, 1)
        return mean, np.maximum(self.ss / max(self.n, 1) - mean * mean, 0.0)  # population variance, as BN normalizes


@dataclass
class Scored:
    """What one rank (or, merged, every rank) scored: rows, predictions (when kept), BN input
    moments per layer, and the first rows as read (the served model's input example)."""

    rows: int = 0
    predictions: Predictions | None = None
    files: np.ndarray | None = None  # per row of `predictions`, its file index (None: not read with positions)
    moments: dict[str, Moments] = field(default_factory=dict)
    head: pa.Table | None = None


class _Parts:
    """Per-row arrays of the batches scored so far, concatenated once at the end."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.labels: dict[str, list[np.ndarray]] = {c: [] for c in spec.labels}
        self.users: list[np.ndarray] = []
        self.row_ids: list[np.ndarray] = []
        self.files: list[np.ndarray] = []  # each row's file index in the scored dataset: its day

    def add(self, rb: pa.RecordBatch, out: dict[str, torch.Tensor]) -> None:
        for k, v in out.items():
            self.outputs.setdefault(k, []).append(v.float().cpu().numpy())
        for c in self.spec.labels:
            self.labels[c].append(rb.column(c).to_numpy(zero_copy_only=False).astype(np.float32))
        if "user_id" in rb.schema.names:
            self.users.append(rb.column("user_id").to_numpy(zero_copy_only=False))
        if "row_id" in rb.schema.names:
            self.row_ids.append(rb.column("row_id").to_numpy(zero_copy_only=False))
        if FILE_COL in rb.schema.names:
            self.files.append(rb.column(FILE_COL).to_numpy(zero_copy_only=False))

    def predictions(self, outputs: dict[str, torch.Tensor] | None) -> Predictions:
        """The rows as Predictions; a rank that scored none has empty arrays of the right keys."""
        cat = np.concatenate

        def joined(parts: list[np.ndarray], like: np.dtype) -> np.ndarray:
            return cat(parts) if parts else np.zeros(0, dtype=like)

        keys = list(self.outputs) or list(outputs or {})
        return Predictions(
            {k: joined(self.outputs.get(k, []), np.float32) for k in keys},
            {k: joined(v, np.float32) for k, v in self.labels.items()},
            cat(self.users) if self.users else None,
            cat(self.row_ids) if self.row_ids else None,
        )


class ShardFailed(Exception):
    """Raised on every rank, at the same step, when any rank's share failed (a read, a batch's
    conversion, `on_batch`): the ranks stop together instead of one waiting in a collective for a
    rank that is gone. `local`: whether this rank's own share failed (the message is its error)."""

    def __init__(self, message: str, local: bool):
        super().__init__(message)
        self.local = local


@torch.no_grad()
def lockstep(
    model: nn.Module,
    spec: ModelSpec,
    batches: Iterable[pa.RecordBatch],
    on_batch: Callable[[pa.RecordBatch, dict[str, torch.Tensor]], None],
    padding: list[bool] | None = None,
) -> None:
    """`model` (a MultiTaskModel, its tables sharded or not) in eval mode over this rank's `batches`
    (Arrow, converted as served by `spec`: no bias features, no labels), in lockstep with the other
    ranks of the default group: every rank takes the same number of forwards (sharded tables make
    each one a collective), a rank whose share has run out scoring a pad batch (`padding[0]` is
    True meanwhile) and throwing it away. `on_batch(batch, outputs)` for each real batch.

    Raises:
        ShardFailed: on every rank, when reading, converting or handling a batch failed on any.
    """
    from mtrec.errors import first_line

    world = dist.get_world_size() if dist.is_initialized() else 1
    device = model_device(model)
    conv = BatchConverter(spec)
    pad = None
    failed: list[str] = []  # this rank's error: it then only pads until every rank knows
    it = iter(batches)
    with evaluating(model):
        while True:
            rb = None
            if not failed:
                try:
                    rb = next(it, None)
                except Exception as e:  # noqa: BLE001 - a read failed: every rank stops at this step
                    failed.append(first_line(e, typed=True))
            if world > 1:
                flags = torch.tensor([0 if rb is None else 1, len(failed)], dtype=torch.int64, device=device)
                dist.all_reduce(flags)
                alive, errors = (int(x) for x in flags.tolist())
            else:
                alive, errors = (0 if rb is None else 1), len(failed)
            if errors:
                raise ShardFailed(failed[0] if failed else "another worker's share failed", bool(failed))
            if alive == 0:
                break
            batch = None
            if rb is not None and rb.num_rows:  # an empty batch scores nothing, but the forward is every rank's
                try:
                    batch = conv(rb, with_bias=False, with_labels=False).to(device)
                except Exception as e:  # noqa: BLE001 - told to the others at the next step
                    failed.append(first_line(e, typed=True))
            if batch is None:  # no batch here; the others' forwards still need this rank's
                pad = pad if pad is not None else pad_batch(spec).to(device)
                if padding is not None:
                    padding[0] = True
                model(pad)
                if padding is not None:
                    padding[0] = False
                continue
            out = model(batch)
            try:
                on_batch(rb, out)
            except Exception as e:  # noqa: BLE001 - told to the others at the next step
                failed.append(first_line(e, typed=True))


def failure_line(e: ShardFailed) -> str | None:
    """On rank 0, the failed ranks' errors as one line ("worker 1: OSError: ..."); None on the
    other ranks. A collective: every rank that caught the ShardFailed of one `lockstep` calls it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return str(e)
    rank, world = dist.get_rank(), dist.get_world_size()
    got: list | None = [None] * world if rank == 0 else None
    dist.gather_object(str(e) if e.local else None, got, dst=0)
    if rank != 0:
        return None
    return "; ".join(f"worker {r}: {m}" for r, m in enumerate(got) if m)


def score_shard(
    model: nn.Module,
    spec: ModelSpec,
    batches: Iterable[pa.RecordBatch],
    bn_names: list[str] | None = None,
    keep: bool = True,
    head_rows: int = 5,
) -> Scored:
    """This rank's `batches` (canonical Arrow batches) through `model` (a MultiTaskModel, its
    tables sharded or not) as served, in lockstep with the other ranks (`lockstep`).

    Args:
        model: `dmp.module.model` on a worker; any MultiTaskModel.
        spec: the model spec the batches are converted with.
        batches: this rank's share of the rows.
        bn_names: the BN layers (module names) whose input moments to collect (None: none).
        keep: keep the per-row arrays for the metrics (False: BN moments only).
        head_rows: how many of the first rows to keep as read.
    """
    modules = dict(model.named_modules())
    moments = {name: Moments(modules[name].num_features) for name in bn_names or []}
    padding = [False]  # a pad batch's rows are not data

    def hook(name: str):
        return lambda _m, args: None if padding[0] else moments[name].add(args[0])

    hooks = [modules[name].register_forward_pre_hook(hook(name)) for name in moments]
    parts = _Parts(spec) if keep else None
    scored = Scored(moments=moments)
    last: list[dict] = []

    def on_batch(rb: pa.RecordBatch, out: dict[str, torch.Tensor]) -> None:
        last[:] = [out]
        scored.rows += rb.num_rows
        if scored.head is None and head_rows:
            scored.head = pa.Table.from_batches([rb.slice(0, head_rows)])
        if parts is not None:
            parts.add(rb, out)

    try:
        lockstep(model, spec, batches, on_batch, padding)
    finally:
        for h in hooks:
            h.remove()
    if parts is not None:
        scored.predictions = parts.predictions(last[0] if last else None)
        scored.files = np.concatenate(parts.files) if parts.files else None
    return scored


def reduce_moments(moments: dict[str, Moments], device: torch.device | None = None) -> None:
    """Every rank's `moments` summed in float64, in place on every rank (a collective: every rank
    calls it with the same layers; a no-op without a process group). `device`: as for `merge`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for m in moments.values():
        flat = torch.from_numpy(np.concatenate([[float(m.n)], m.s, m.ss])).to(device)
        dist.all_reduce(flat)
        flat, c = flat.cpu(), len(m.s)
        m.n, m.s, m.ss = int(round(float(flat[0]))), flat[1 : 1 + c].numpy().copy(), flat[1 + c :].numpy().copy()


def merge(mine: Scored, device: torch.device | None = None) -> Scored | None:
    """Every rank's Scored, merged on rank 0 (rows summed, moments summed, predictions
    concatenated in rank order, the first rank's head); None on the other ranks. A collective:
    every rank calls it. `device`: where the process group's tensors live (the model's: nccl
    takes CUDA tensors only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    rank, world = dist.get_rank(), dist.get_world_size()
    reduce_moments(mine.moments, device)
    total = torch.tensor([mine.rows], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    parts: list | None = [None] * world if rank == 0 else None
    dist.gather_object((mine.rows, mine.predictions, mine.head, mine.files), parts, dst=0)
    if rank != 0:
        return None
    scored = [(p, h, f) for n, p, h, f in parts if n]  # a rank that scored no row adds nothing
    merged = Scored(rows=int(total.item()), moments=mine.moments, head=scored[0][1] if scored else None)
    preds = [p for p, _, _ in scored if p is not None]
    if preds:
        merged.predictions = Predictions.pooled(preds)
        files = [f for _, _, f in scored]
        merged.files = None if any(f is None for f in files) else np.concatenate(files)
    elif mine.predictions is not None:
        merged.predictions = mine.predictions  # no rows anywhere: empty arrays
    return merged


def _take(pred: Predictions, idx: np.ndarray) -> Predictions:
    return Predictions(
        {k: v[idx] for k, v in pred.outputs.items()},
        {k: v[idx] for k, v in pred.labels.items()},
        None if pred.user_id is None else pred.user_id[idx],
        None if pred.row_id is None else pred.row_id[idx],
    )


def with_truth(
    logs: str, scored: Scored, days: list[dt.date], file_days: list[int]
) -> tuple[Predictions, dict[str, np.ndarray] | None]:
    """(predictions, the synthetic world's truth in their row order, or None for real logs). Row
    ids are per day, so the rows are put in day order (`file_days`: each scored file's index in
    `days`) and each day's truth joined on its own (`evaluate.align_truth`)."""
    from mtrec.eval.evaluate import align_truth, read_truth

    pred = scored.predictions
    if len(days) == 1:
        return pred, align_truth(pred, read_truth(logs, days[0]))
    if scored.files is None:
        return pred, None
    day_of_row = np.asarray(file_days, dtype=np.int64)[scored.files]
    order = np.argsort(day_of_row, kind="stable")
    pred, day_of_row = _take(pred, order), day_of_row[order]
    truths = []
    for i, d in enumerate(days):
        rows = np.flatnonzero(day_of_row == i)
        truths.append(align_truth(_take(pred, rows), read_truth(logs, d)) if len(rows) else {})
    if any(t is None for t in truths):
        return pred, None
    columns = set.intersection(*(set(t) for t in truths if t)) if any(truths) else set()
    return pred, {c: np.concatenate([t[c] for t in truths if t]) for c in columns} if columns else None


def next_day_figures(
    model: nn.Module,
    cfg: MtrecConfig,
    scored: Scored,
    serving: Scored | None,
    days: list[dt.date],
    file_days: list[int],
    trained_to: str,
) -> dict:
    """On rank 0, from the merged scores of the day after a job's data (or of `days` pooled into
    one slice, `file_days`: each scored file's index in `days`): what the driver records. The BN
    check is against the last day.

    Returns a dict: `day`, `rows`; `metrics` (`evaluate.report`'s keys, with the truth on the
    synthetic world); `calibration_png` (bytes, None without rows); `bn` (a `BNReport` against the
    impressions, or the serving logs when `serving` holds their moments; None without BN layers);
    `example` (the first rows, canonical: the served model's input example); `error` (one line
    when the figures could not be made, None otherwise: the driver fails the job with it).
    """
    from mtrec import bn
    from mtrec.errors import first_line
    from mtrec.eval import plots
    from mtrec.eval.evaluate import _report

    spec, day = cfg.spec.serving(), days[-1]
    out: dict = {"day": day.isoformat(), "rows": scored.rows, "metrics": {}, "calibration_png": None, "bn": None}
    out.update(days=[d.isoformat() for d in days], example=scored.head, error=None)
    try:
        if scored.rows and scored.predictions is not None:
            pred, aligned = with_truth(cfg.job.logs, scored, days, file_days)
            out["metrics"] = _report(spec, pred, aligned)
            scored_on = ",".join(d.isoformat() for d in days)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "calibration.png"
                plots.calibration(spec, pred, path, title=f"{cfg.name}: trained to {trained_to}, scored on {scored_on}")
                out["calibration_png"] = path.read_bytes()
        source = serving if serving is not None else scored
        population = "serving logs" if serving is not None else "impressions"
        if source.moments:
            if not source.rows:
                raise bn.no_good_rows(day, f"the {population}")
            out["bn"] = bn.from_moments(model, source.moments, cfg.bn, day, population)
    except Exception as e:  # noqa: BLE001 - handed to the driver as one line; the job fails there
        out["error"] = first_line(e, typed=True)
    return out
