"""Checkpoints: torch.distributed.checkpoint (DCP) through fsspec, a JSON manifest, `_SUCCESS` last.

Layout:

    <workdir>/checkpoints/<model>/
        dt=YYYY-MM-DD/               a published checkpoint
            *.distcp, .metadata      DCP shards: every rank writes its own embedding shards
            manifest.json            date, parent, world size, sharding plan, config hashes, rows,
                                     files consumed, package version, ...
            _SUCCESS                 written last: a folder without it is not a checkpoint
        _staging/dt=D.<run>/         a finished job's checkpoint before it is published
        _partial/dt=D/step-NNNNNNNN.<run>/  intra-day checkpoints of an unfinished job (with the
                                     data position), newest kept; removed when D is published

Publishing is atomic: the checkpoint is written completely under `_staging/`, then on a local
disk the folder is renamed into place with `_SUCCESS` already inside (one rename); on an object
store it is copied to `dt=D/` and `_SUCCESS` is written after the last object. A reader trusts
only `_SUCCESS`, so a job killed at any point leaves either the old state or the new one.

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

import datetime as dt
import json
import os
import re
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, TypedDict

from mtrec.config import MtrecConfig
from mtrec.data.io import filesystem, is_local_fs, join
from mtrec.errors import CheckpointError
from mtrec.shims import dcp_reader, dcp_writer
from mtrec.spec import ModelSpec

if TYPE_CHECKING:  # torch is imported where tensors are read or written: the paths, manifests and
    # publishing below run without it (a job's checks before Ray start in a second)
    import torch
    import torch.distributed as dist
    from torch import nn


class Manifest(TypedDict, total=False):
    """`manifest.json`: what a checkpoint holds and how it was made (JSON, so a dict)."""

    model: str  # the model's name
    spec: dict  # the ModelSpec, dumped: the checkpoint rebuilds its model from it alone
    score_offsets: dict[str, float]  # task -> log-odds training-time sampling added
    date: str  # the last day trained (dt=<date>)
    kind: str  # full_retrain | nightly
    days: list[str]  # the days this job trained
    parent: str | None  # the checkpoint it warm-started from
    parent_date: str | None
    parent_run_id: str | None  # the parent's MLflow run
    job_id: str  # same data, parent and settings -> same id (resume)
    config_fingerprint: str  # the model's shape and optimizer kinds
    training_fingerprint: str  # learning rates, batch size, seed
    config: dict  # the run spec it was trained under, for the record
    input_rows: int
    quarantined_rows: int
    truncated: dict[str, int]  # sequence group -> rows whose lists were cut to max_len
    files: list[dict]  # [{"url", "size"}] of the data trained
    mtrec_version: str
    mlflow_run_id: str  # tracking on
    tracking_uri: str
    world_size: int
    plan: dict  # table -> {sharding_type, ranks}
    epochs: int  # passes over the good rows (`train.epochs`, full retrains; 1 for a nightly)
    rows_trained: int  # epochs x the good rows
    rows_per_epoch: list[int]
    steps: int
    metrics: dict[str, float]  # train_loss_last_window
    rows_per_worker: list[int]
    resumed_at_step: int | None
    created_at: str
    step: int  # intra-day checkpoints: the step and the rows trained so far
    position: dict


SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
STAGING = "_staging"
PARTIAL = "_partial"


def checkpoint_root(cfg: MtrecConfig) -> str:
    return join(cfg.job.workdir, "checkpoints", cfg.name)


def checkpoint_url(cfg: MtrecConfig, day) -> str:
    return join(checkpoint_root(cfg), f"dt={day.isoformat() if hasattr(day, 'isoformat') else day}")


def _dense_state(dmp: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    import torch

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
            # moments go where the parameter lives (a GPU); Adam keeps `step` on the CPU
            state = {
                k[len(prefix) :]: v if k.endswith(".step") else v.to(p.device)
                for k, v in flat.items()
                if k.startswith(prefix)
            }
            if state:
                optimizer.state[p] = state


def state_to_save(dmp: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": dmp.state_dict(),
        "fused_optimizer": dmp.fused_optimizer.state_dict()["state"],
        "dense_optimizer": _dense_state(dmp, optimizer),
    }


def save(
    dmp: nn.Module,
    optimizer: torch.optim.Optimizer,
    url: str,
    manifest: Manifest,
    pg: dist.ProcessGroup | None = None,
    marker: bool = True,
) -> None:
    """Every rank calls this. Shards first (any half-written folder is cleared by rank 0 first),
    then, after all ranks are done, rank 0 writes the manifest and (`marker`) `_SUCCESS`. A
    published day is never written here directly: see `stage` and `publish`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

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
        dcp.save(state, storage_writer=dcp_writer(url), process_group=pg)
    if dist.is_initialized():
        dist.barrier(group=pg)
    if rank == 0:
        with fs.open(f"{path}/{MANIFEST}", "w") as fh:
            fh.write(json.dumps(manifest, indent=2, default=str))
        if marker:
            _touch(fs, f"{path}/{SUCCESS}")
    if dist.is_initialized():
        dist.barrier(group=pg)  # nobody goes on (or reads it) before it is complete


def _touch(fs, path: str) -> None:
    with fs.open(path, "w") as fh:
        fh.write("")


def staging_url(cfg: MtrecConfig, day: dt.date) -> str:
    """A fresh folder for a job's final checkpoint before it is published."""
    return join(
        checkpoint_root(cfg), STAGING, f"dt={day.isoformat()}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    )


def publish(staged: str, url: str) -> None:
    """Make the complete checkpoint at `staged` the published one at `url` (replacing a previous
    one: --force). Local disk: `_SUCCESS` into the staged folder, then renames, so `url` is
    always either the old complete checkpoint or the new one (a crash between the two renames
    leaves the old one as `<staged>.replaced`, which the next run of the day puts back). Object
    store: the old marker goes first, the objects are copied, stale ones removed, each is read
    back (size), and `_SUCCESS` is written after that (a crash in between leaves the day
    unpublished, never mixed; the next run of the day trains it again and publishes over it).

    Raises:
        CheckpointError: the storage refused an operation (one line; the staged copy is kept).
    """
    fs, src = filesystem(staged)
    _, dst = filesystem(url)
    try:
        if is_local_fs(fs):
            _touch(fs, f"{src}/{SUCCESS}")
            old = None
            if os.path.exists(dst):
                old = f"{src}.replaced"
                os.rename(dst, old)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
            if old:
                fs.rm(old, recursive=True)
            return
        if fs.exists(f"{dst}/{SUCCESS}"):
            fs.rm(f"{dst}/{SUCCESS}")
        new = {p[len(src) :].lstrip("/"): int(i["size"]) for p, i in fs.find(src, detail=True).items()}
        for rel in sorted(new):
            fs.copy(f"{src}/{rel}", f"{dst}/{rel}")
        for p in fs.find(dst) if fs.exists(dst) else []:
            if p[len(dst) :].lstrip("/") not in new:
                fs.rm(p)
        _check_copied(fs, dst, new)
        _touch(fs, f"{dst}/{SUCCESS}")
    except OSError as e:
        raise CheckpointError(
            f"publishing {staged} as {url} failed ({type(e).__name__}: {e}); the day is not published "
            "- check the storage and rerun the job"
        ) from None
    fs.rm(src, recursive=True)


def _check_copied(fs, dst: str, sizes: dict[str, int]) -> None:
    """Every object `_SUCCESS` will cover is readable at `dst` with its size (one HEAD each: a
    store may answer a copy before every reader sees it), else OSError: nothing is published."""
    for rel, size in sorted(sizes.items()):
        got = int(fs.info(f"{dst}/{rel}")["size"])
        if got != size:
            raise OSError(f"{dst}/{rel} holds {got} bytes after the copy, its staged copy {size}")


def discard(url: str) -> None:
    """Remove an unpublished folder (a failed job's staged checkpoint) if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def recover_staging(cfg: MtrecConfig, day: dt.date) -> list[str]:
    """Clean up after a driver that died while publishing day `day`: a checkpoint it had moved
    aside to replace (`.replaced`) goes back if `dt=day` is missing; staged, never-published
    folders are removed. Returns what it did, one line each."""
    fs, root = filesystem(join(checkpoint_root(cfg), STAGING))
    if not fs.exists(root):
        return []
    done = []
    _, final = filesystem(checkpoint_url(cfg, day))
    for p in sorted(fs.ls(root, detail=False)):
        p = p.rstrip("/")
        name = p.rsplit("/", 1)[-1]
        if not name.startswith(f"dt={day.isoformat()}."):
            continue
        if name.endswith(".replaced") and not fs.exists(final) and fs.exists(f"{p}/{SUCCESS}"):
            fs.mv(p, final, recursive=True)
            done.append(f"restored {checkpoint_url(cfg, day)} (a --force run died while replacing it)")
        else:
            fs.rm(p, recursive=True)
            done.append(f"removed an unpublished staged checkpoint {name}")
    return done


def partial_root(cfg: MtrecConfig, day: dt.date) -> str:
    return join(checkpoint_root(cfg), PARTIAL, f"dt={day.isoformat()}")


def partial_url(cfg: MtrecConfig, day: dt.date, step: int, run: str) -> str:
    """Folder of the intra-day checkpoint at `step` written by run `run` (the driver's run id:
    a straggling worker of a killed run never writes into the folder of the run after it)."""
    return join(partial_root(cfg, day), f"step-{step:08d}.{run}")


def latest_partial(cfg: MtrecConfig, day: dt.date) -> tuple[str, Manifest] | None:
    """The complete intra-day checkpoint of day `day` with the most steps (URL, manifest), or None."""
    fs, root = filesystem(partial_root(cfg, day))
    if not fs.exists(root):
        return None
    found = []
    for p in fs.ls(root, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        m = re.fullmatch(r"step-(\d+)\.[\w-]+", name)
        if m and fs.exists(f"{p.rstrip('/')}/{SUCCESS}"):
            found.append((int(m.group(1)), name))
    if not found:
        return None
    url = join(partial_root(cfg, day), max(found)[1])
    return url, read_manifest(url)


def prune_partials(cfg: MtrecConfig, day: dt.date, keep: str | None = None, run: str | None = None) -> None:
    """Remove day `day`'s intra-day checkpoints: all of them (`keep` None), or run `run`'s
    others than `keep` (a run never deletes another run's folders while it trains)."""
    fs, root = filesystem(partial_root(cfg, day))
    if not fs.exists(root):
        return
    if keep is None:
        fs.rm(root, recursive=True)
        return
    _, keep_path = filesystem(keep)
    for p in fs.ls(root, detail=False):
        p = p.rstrip("/")
        if p != keep_path.rstrip("/") and (run is None or p.endswith(f".{run}")):
            fs.rm(p, recursive=True)


def read_full(url: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole (shards joined), keyed `model.<name>`,
    `fused_optimizer.<...>`, `dense_optimizer.<...>`; no process group needed. The served model
    and a job's recording read a checkpoint through it; tests compare checkpoints written at
    different world sizes with it. With `prefix`, only the tensors whose key starts with it are
    read (`mtrec inspect` reads the shallow tower without the embedding tables)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import TensorStorageMetadata

    meta = dcp_reader(url).read_metadata().state_dict_metadata  # DCP's flattened names: model.<name>, ...
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(out, storage_reader=dcp_reader(url), no_dist=True)
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """(largest |a - b| over every tensor, where): the two must hold the same keys and shapes."""
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: only in one: {sorted(a.keys() ^ b.keys())[:5]}")
    worst, where = 0.0, ""
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{k}: shape {tuple(a[k].shape)} != {tuple(b[k].shape)}")
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return worst, where


def read_manifest(url: str) -> Manifest:
    """The manifest of a published checkpoint (CheckpointError when it is not published)."""
    fs, path = filesystem(url)
    if not fs.exists(f"{path}/{SUCCESS}"):
        raise CheckpointError(
            f"{url} is not a published checkpoint (no {SUCCESS}); it was never finished - rerun the job that writes it"
        )
    try:
        with fs.open(f"{path}/{MANIFEST}", "r") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{url}/{MANIFEST} is unreadable ({e}); the checkpoint is damaged - rerun the job that wrote it"
        ) from None


def spec_manifest(cfg: MtrecConfig) -> Manifest:
    """The manifest entries that make a checkpoint self-contained: the model's name, its spec and
    the score offsets of training-time sampling (`trained_spec` reads them back)."""
    return {"model": cfg.name, "spec": cfg.spec.model_dump(mode="json"), "score_offsets": cfg.score_offsets()}


def trained_spec(manifest: Manifest, url: str) -> tuple[ModelSpec, dict[str, float]]:
    """(model spec, score offsets) the checkpoint was trained under, from its manifest alone.

    Raises:
        CheckpointError: the manifest carries neither a spec nor a config.
    """
    if "spec" in manifest:
        return ModelSpec.from_json(manifest["spec"], label=f"{url} manifest"), manifest.get("score_offsets", {})
    if "config" in manifest:  # written before the manifest carried the spec
        from mtrec.config import parse_config

        cfg = parse_config(manifest["config"], label=f"{url} manifest")
        return cfg.spec, cfg.score_offsets()
    raise CheckpointError(
        f"{url}/{MANIFEST} carries no model spec; it was not written by an mtrec job "
        "- pass a published mtrec checkpoint"
    )


def check_compatible(manifest: Manifest, url: str, cfg: MtrecConfig, allow_config_change: bool = False) -> None:
    """Refuse a checkpoint of another model or model shape (always), or trained under other
    training settings (unless `allow_config_change`), with one line naming what differs."""
    if manifest.get("model") != cfg.name:
        raise CheckpointError(
            f"{url} holds model {manifest.get('model')!r}, not {cfg.name!r}; "
            "point --workdir/--config at the right model"
        )
    if manifest.get("config_fingerprint") != cfg.fingerprint():
        raise CheckpointError(
            f"{url} was trained with another model shape (config fingerprint {manifest.get('config_fingerprint')} "
            f"!= {cfg.fingerprint()}); features, tasks, model or optimizer kinds changed - retrain with `mtrec train`"
        )
    if (
        not allow_config_change
        and manifest.get("training_fingerprint", cfg.training_fingerprint()) != cfg.training_fingerprint()
    ):
        before = (manifest.get("config") or {}).get("train", {})
        now = cfg.training_settings()
        diff = (
            ", ".join(f"train.{k}: {before.get(k)!r} -> {now[k]!r}" for k in sorted(now) if before.get(k) != now[k])
            or "see the manifest"
        )
        raise CheckpointError(
            f"{url} was trained with other training settings ({diff}); pass --allow-config-change "
            "to warm-start under the new ones"
        )


def load(
    dmp: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    url: str,
    cfg: MtrecConfig,
    pg: dist.ProcessGroup | None = None,
    allow_config_change: bool = False,
) -> dict:
    """Load a checkpoint into `dmp` (and `optimizer`), at this world size and plan.

    Returns:
        dict: its manifest.
    Raises:
        CheckpointError: not published, another model, another model shape, other training
            settings (unless `allow_config_change`), or damaged shards.
    """
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    manifest = read_manifest(url)
    check_compatible(manifest, url, cfg, allow_config_change)
    state = state_to_save(dmp, optimizer) if optimizer is not None else {"model": dmp.state_dict()}
    try:
        if optimizer is not None:  # a fresh optimizer has no state yet: shape it from the checkpoint
            meta = dcp_reader(url).read_metadata().state_dict_metadata
            state["dense_optimizer"] = {
                k.removeprefix("dense_optimizer."): torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.items()
                if k.startswith("dense_optimizer.")
            }
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise _unreadable(url, e) from None
    _dcp_read(state, url, pg)
    dmp.load_state_dict(state["model"])
    if optimizer is not None:
        fused = dmp.fused_optimizer.state_dict()
        fused["state"] = state["fused_optimizer"]
        dmp.fused_optimizer.load_state_dict(fused)
        _load_dense_state(dmp, optimizer, state["dense_optimizer"])
    return manifest


def load_matching(dmp: nn.Module, url: str, pg: dist.ProcessGroup | None = None) -> list[str]:
    """Initialise `dmp` from another model's published checkpoint: every model tensor whose name
    and shape match is read (resharded to this plan); the others, and the optimizers, stay as
    they are. The names of the tensors read, sorted.

    Raises:
        CheckpointError: not published, damaged, or sharing no tensor with this model.
    """
    read_manifest(url)  # published
    meta = dcp_reader(url).read_metadata().state_dict_metadata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ShardedTensor's deprecation, on every table
        want = {
            k: v
            for k, v in dmp.state_dict().items()
            if f"model.{k}" in meta and tuple(getattr(meta[f"model.{k}"], "size", ())) == tuple(v.size())
        }
    if not want:
        raise CheckpointError(
            f"{url} shares no tensor (same name and shape) with this model; "
            "init from a checkpoint of the same architecture and features"
        )
    _dcp_read({"model": want}, url, pg)
    names = sorted(want)  # before load_state_dict: DMP prefixes the keys it is given in place
    dmp.load_state_dict(want, strict=False)
    return names


def _dcp_read(state: dict, url: str, pg: dist.ProcessGroup | None) -> None:
    """DCP's load of `state` (in place, resharded to its tensors) from the checkpoint at `url`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dcp.load(state, storage_reader=dcp_reader(url), process_group=pg)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise _unreadable(url, e) from None


def _unreadable(url: str, e: BaseException) -> CheckpointError:
    """The one-line error of shards that cannot be read, naming the root cause, not DCP's wrapper."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    cause = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", ln)), lines[0])
    return CheckpointError(
        f"{url}: the checkpoint's shards cannot be read ({cause[:160]}); it is damaged - rerun the job that wrote it"
    )


def published_days(cfg: MtrecConfig) -> list[dt.date]:
    """Days with a published checkpoint (a `_SUCCESS` marker) for this model, oldest first."""
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
        raise CheckpointError(
            f"no published checkpoint of {cfg.name} before {day} under {checkpoint_root(cfg)}; "
            "train one first (`mtrec train --from ... --to ...`) or pass --checkpoint"
        )
    return checkpoint_url(cfg, days[-1])
