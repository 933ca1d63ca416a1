"""Shard a model with TorchRec DistributedModelParallel, as the config constrains it.

CPU: gloo, sharding types table_wise / column_wise / data_parallel; the embedding tables use
FBGEMM's fused optimizer (row-wise Adagrad or SGD; fused Adam is GPU-only). The planner is always
given the config's sharding types: left alone on one rank it picks data_parallel/dense and the
fused optimizer state disappears.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan

from mtrec.config import DenseOptimizer, EmbeddingOptimizer, MtrecConfig, ShardingType
from mtrec.errors import ConfigError

GPU_ONLY_SHARDING = {ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE}
_FUSED = {
    EmbeddingOptimizer.ROWWISE_ADAGRAD: EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    EmbeddingOptimizer.SGD: EmbOptimType.EXACT_SGD,
    EmbeddingOptimizer.ADAM: EmbOptimType.ADAM,
}

for _name in (
    "torchrec.distributed.planner",
    "torchrec.distributed.planner.types",
    "torchrec.distributed.planner.storage_reservations",
):
    logging.getLogger(_name).setLevel(logging.ERROR)


def device_for_backend() -> tuple[torch.device, str]:
    """(device, backend): cuda + nccl where a GPU is visible, else cpu + gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
    return torch.device("cpu"), "gloo"


def init_single_process() -> None:
    """A world-size-1 process group (in-process store) unless one exists: DMP needs one."""
    if not dist.is_initialized():
        _, backend = device_for_backend()
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _check(cfg: MtrecConfig, device: torch.device) -> None:
    if device.type == "cpu":
        bad = [s.value for s in cfg.train.sharding_types if s in GPU_ONLY_SHARDING]
        if bad:
            raise ConfigError(
                f"`train.sharding_types` has {', '.join(bad)}, which need a GPU; on CPU use table_wise, "
                "column_wise or data_parallel"
            )
        if cfg.train.embedding_optimizer.name == EmbeddingOptimizer.ADAM:
            raise ConfigError(
                "`train.embedding_optimizer.name` is adam, which FBGEMM does not support on CPU; "
                "use rowwise_adagrad or sgd"
            )


def shard(
    module: nn.Module, cfg: MtrecConfig, device: torch.device, pg: dist.ProcessGroup | None = None
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Wrap `module` (whose embedding collections are on meta) in DMP with the config's plan.

    Returns:
        (dmp, plan): the sharded module and the plan every rank agreed on.
    """
    _check(cfg, device)
    pg = pg or dist.GroupMember.WORLD
    world = dist.get_world_size(pg)
    types = [s.value for s in cfg.train.sharding_types]
    constraints = {name: ParameterConstraints(sharding_types=types) for name in cfg.features.tables()}
    eo = cfg.train.embedding_optimizer
    fused = {"optimizer": _FUSED[eo.name], "learning_rate": eo.lr}
    freeze(module, cfg)
    # pooled tables and the unpooled ones sequences read (mtrec.models.sparse_arch), one planner
    sharders = [EmbeddingBagCollectionSharder(fused_params=fused), EmbeddingCollectionSharder(fused_params=fused)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device=device.type), constraints=constraints
        )
        plan = planner.collective_plan(module, sharders, pg)
        dmp = DistributedModelParallel(module, device=device, plan=plan, sharders=sharders)
    return dmp, plan


def freeze(module: nn.Module, cfg: MtrecConfig) -> None:
    """`train.freeze` on the unsharded module (a MultiTaskTrain, tables on meta): its dense
    parameters stop requiring gradients (the dense optimizer leaves them out) and its tables train
    with a learning rate of 0 (a per-table fused parameter: FBGEMM has no frozen table)."""
    model = module.model
    for part in cfg.train.freeze:
        prefixes, tables = model.frozen(part)
        for name, p in model.named_parameters():
            if name.startswith("sparse_arch."):
                if name.rsplit(".", 2)[-2] in tables:
                    p._optimizer_kwargs = [{"learning_rate": 0.0}]  # read by TorchRec's sharders
            elif name.startswith(tuple(prefixes)):
                p.requires_grad_(False)


def dense_optimizer(dmp: DistributedModelParallel, cfg: MtrecConfig) -> torch.optim.Optimizer:
    """The optimizer of every parameter the fused embedding optimizer does not own."""
    fused = {id(p) for group in dmp.fused_optimizer.param_groups for p in group["params"]}
    params = [p for p in dmp.parameters() if id(p) not in fused and p.requires_grad]
    o = cfg.train.dense_optimizer
    cls = {
        DenseOptimizer.ADAM: torch.optim.Adam,
        DenseOptimizer.ADAGRAD: torch.optim.Adagrad,
        DenseOptimizer.SGD: torch.optim.SGD,
    }[o.name]
    return cls(params, lr=o.lr)


def plan_summary(plan: ShardingPlan) -> dict[str, dict]:
    """table -> {sharding_type, ranks}: for manifests, logs and tests."""
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            ranks = (
                sorted({s.placement.rank() for s in ps.sharding_spec.shards})
                if ps.sharding_spec
                else list(ps.ranks or [])
            )
            out[table] = {"sharding_type": ps.sharding_type, "ranks": ranks}
    return out
