"""Checkpoints: torch.distributed.checkpoint (DCP) through fsspec, a JSON manifest, `_SUCCESS` last.

Layout (../shared/DESIGN.md):

    <workdir>/checkpoints/<model>/dt=YYYY-MM-DD/
        *.distcp, .metadata      DCP shards: every rank writes its own embedding shards
        manifest.json            date, world size, sharding plan, config hash, rows, files, ...
        _SUCCESS                 written last, by rank 0, after every rank finished: a folder
                                 without it is not a checkpoint

What is saved (tensors only - loading executes no pickled code):

    model/...            DMP state_dict: dense parameters, embedding tables (ShardedTensors),
                         BatchNorm running statistics
    fused_optimizer/...  the tables' fused optimizer state (row-wise Adagrad momentum), which is
                         not in model.state_dict()
    dense_optimizer/...  the dense optimizer's per-parameter state (Adam moments and step), keyed
                         by parameter name; learning rates come from the config at load

DCP reshards on load: a checkpoint written by N ranks loads at M ranks and another plan.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException

from mtrec.config import MtrecConfig
from mtrec.data.io import filesystem, join
from mtrec.errors import CheckpointError

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"


def checkpoint_root(cfg: MtrecConfig) -> str:
    return join(cfg.job.workdir, "checkpoints", cfg.name)


def checkpoint_url(cfg: MtrecConfig, day) -> str:
    return join(checkpoint_root(cfg), f"dt={day.isoformat() if hasattr(day, 'isoformat') else day}")


def _dense_state(dmp: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in dmp.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                out[f"{names[id(p)]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_dense_state(dmp: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    names = {id(p): n for n, p in dmp.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"{names[id(p)]}."
            state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            if state:
                optimizer.state[p] = state


def state_to_save(dmp: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": dmp.state_dict(),
        "fused_optimizer": dmp.fused_optimizer.state_dict()["state"],
        "dense_optimizer": _dense_state(dmp, optimizer),
    }


def save(dmp: nn.Module, optimizer: torch.optim.Optimizer, url: str, manifest: dict, pg: dist.ProcessGroup | None = None) -> None:
    """Every rank calls this. Shards first (any half-written folder is cleared by rank 0 first),
    then, after all ranks are done, rank 0 writes the manifest and `_SUCCESS`."""
    rank = dist.get_rank(pg) if dist.is_initialized() else 0
    fs, path = filesystem(url)
    if rank == 0:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
    if dist.is_initialized():
        dist.barrier(group=pg)
    state = state_to_save(dmp, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchRec's ShardedTensor, deprecated in favour of DTensor
        dcp.save(state, storage_writer=FsspecWriter(url), process_group=pg)
    if dist.is_initialized():
        dist.barrier(group=pg)
    if rank == 0:
        with fs.open(f"{path}/{MANIFEST}", "w") as fh:
            fh.write(json.dumps(manifest, indent=2, default=str))
        with fs.open(f"{path}/{SUCCESS}", "w") as fh:
            fh.write("")


def read_manifest(url: str) -> dict:
    """The manifest of a published checkpoint (CheckpointError when it is not published)."""
    fs, path = filesystem(url)
    if not fs.exists(f"{path}/{SUCCESS}"):
        raise CheckpointError(f"{url} is not a published checkpoint (no {SUCCESS}); it was never finished - rerun the job that writes it")
    try:
        with fs.open(f"{path}/{MANIFEST}", "r") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{url}/{MANIFEST} is unreadable ({e}); the checkpoint is damaged - rerun the job that wrote it") from None


def load(dmp: nn.Module, optimizer: torch.optim.Optimizer | None, url: str, cfg: MtrecConfig, pg: dist.ProcessGroup | None = None) -> dict:
    """Load a published checkpoint into `dmp` (and `optimizer`), at this world size and plan.

    Returns:
        dict: its manifest.
    Raises:
        CheckpointError: not published, another model, another model shape, or damaged shards.
    """
    manifest = read_manifest(url)
    if manifest.get("model") != cfg.name:
        raise CheckpointError(f"{url} holds model {manifest.get('model')!r}, not {cfg.name!r}; point --workdir/--config at the right model")
    if manifest.get("config_fingerprint") != cfg.fingerprint():
        raise CheckpointError(f"{url} was trained with another model shape (config fingerprint {manifest.get('config_fingerprint')} "
                              f"!= {cfg.fingerprint()}); features, tasks or model changed - retrain with `mtrec train`")
    state = state_to_save(dmp, optimizer) if optimizer is not None else {"model": dmp.state_dict()}
    try:
        if optimizer is not None:  # a fresh optimizer has no state yet: shape it from the checkpoint
            meta = FsspecReader(url).read_metadata().state_dict_metadata
            state["dense_optimizer"] = {
                k.removeprefix("dense_optimizer."): torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.items() if k.startswith("dense_optimizer.")
            }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dcp.load(state, storage_reader=FsspecReader(url), process_group=pg)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        cause = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", ln)), lines[0])  # the root, not DCP's wrapper
        raise CheckpointError(f"{url}: the checkpoint's shards cannot be read ({cause[:160]}); it is damaged - rerun the job that wrote it") from None
    dmp.load_state_dict(state["model"])
    if optimizer is not None:
        fused = dmp.fused_optimizer.state_dict()
        fused["state"] = state["fused_optimizer"]
        dmp.fused_optimizer.load_state_dict(fused)
        _load_dense_state(dmp, optimizer, state["dense_optimizer"])
    return manifest


def published_days(cfg: MtrecConfig) -> list:
    """Days with a published checkpoint (a `_SUCCESS` marker) for this model, oldest first."""
    import datetime as dt

    fs, root = filesystem(checkpoint_root(cfg))
    if not fs.exists(root):
        return []
    days = []
    for p in fs.ls(root, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("dt=") and fs.exists(f"{p.rstrip('/')}/{SUCCESS}"):
            try:
                days.append(dt.date.fromisoformat(name[3:]))
            except ValueError:
                continue
    return sorted(days)


def latest_before(cfg: MtrecConfig, day) -> str:
    """URL of the newest published checkpoint dated before `day` (CheckpointError if none)."""
    days = [d for d in published_days(cfg) if d < day]
    if not days:
        raise CheckpointError(f"no published checkpoint of {cfg.name} before {day} under {checkpoint_root(cfg)}; "
                              "train one first (`mtrec train --from ... --to ...`) or pass --checkpoint")
    return checkpoint_url(cfg, days[-1])
