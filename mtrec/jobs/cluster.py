"""Connecting to Ray: join a cluster (`--address` / RAY_ADDRESS) or start a local one.

A local cluster declares more logical CPUs than the box may have: the train workers reserve
`num_workers x cpus_per_worker` and Ray Data needs CPUs left to read with, otherwise the job
waits forever for a read slot (2-core machines). Torch threads are set separately
(`train.torch_threads`), so logical CPUs here are only a scheduling budget.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

from mtrec.config import MtrecConfig
from mtrec.errors import ConfigError
from mtrec.log import library_level, quiet_libraries

log = logging.getLogger(__name__)

READ_CPUS = 2  # logical CPUs a local cluster keeps for Ray Data read tasks beyond the workers


def local_cpus(cfg: MtrecConfig, extra: float = 0.0) -> int:
    """Logical CPUs of a local cluster: the workers', `extra` (e.g. `mtrec tune`'s trial actors and
    concurrent trials) and READ_CPUS, at least the box's cores."""
    need = math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker + extra) + READ_CPUS
    return max(os.cpu_count() or 1, need)


def local_startup_concurrency(num_cpus: int) -> None:
    """Before a local cluster starts: Ray caps how many worker processes start at once by the
    machine's cores, and once 4x that many are alive it prints a warning on the driver's stdout
    whatever `log_to_driver` says. A local mtrec cluster declares more logical CPUs than cores
    (READ_CPUS for Ray Data beside the workers), and a job's ordinary processes (the workers, the
    datasets' coordinators, read tasks, the served model's task) crossed that line on 2 cores. Both
    follow the logical CPUs instead, unless RAY_worker_maximum_startup_concurrency is set."""
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(num_cpus))


def quiet_ray() -> None:
    """Ray Train/Data log a lot, and warn about things a job cannot act on (e.g. that token
    authentication is on): the job prints its own progress, Ray's lines only with --verbose.
    Call it again after `import ray`, which sets Ray's loggers up."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    quiet_libraries()
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray._private"):
        logging.getLogger(name).setLevel(library_level())


@contextmanager
def ray_session(
    cfg: MtrecConfig, address: str | None = None, ray_logs: bool = False, extra_cpus: float = 0.0
) -> Iterator[dict]:
    """Ray for one job: reuse an initialized session, join `address` (or RAY_ADDRESS), or start
    a local cluster that is shut down afterwards. Worker and Ray-internal output stays in the Ray
    session's log files unless `ray_logs` (the job prints its own progress; a failure is
    reported as one line naming the worker). `extra_cpus`: logical CPUs the caller needs beside
    one job's workers (`mtrec tune`: its trial actors), added to a local cluster and to the check.

    Yields:
        dict: {"mode": "existing" | "joined" | "local", "address", "cpus", "gpus", "nodes"}.
    """
    quiet_ray()
    import ray

    quiet_ray()

    address = address or os.environ.get("RAY_ADDRESS")
    owned = False
    if ray.is_initialized():
        mode = "existing"
    elif address:
        try:
            ray.init(address=address, logging_level=library_level(), log_to_driver=ray_logs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"cannot join the Ray cluster at {address} ({str(e).splitlines()[0]}); "
                "check `ray status` there, or drop --address/RAY_ADDRESS to start a local cluster"
            ) from None
        mode, owned = "joined", True
    else:
        local_startup_concurrency(local_cpus(cfg, extra_cpus))
        ray.init(
            address="local",
            num_cpus=local_cpus(cfg, extra_cpus),
            include_dashboard=False,
            logging_level=library_level(),
            log_to_driver=ray_logs,
        )
        mode, owned = "local", True
    try:
        res = ray.cluster_resources()
        info = {
            "mode": mode,
            "address": ray.get_runtime_context().gcs_address,
            "cpus": res.get("CPU", 0),
            "gpus": res.get("GPU", 0),
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        }
        need = cfg.train.num_workers * cfg.train.cpus_per_worker + extra_cpus
        if need > info["cpus"]:
            extra = f" + {extra_cpus:g} (tune trials)" if extra_cpus else ""
            raise ConfigError(
                f"`train.num_workers` x `train.cpus_per_worker`{extra} = {need:g} CPUs but the Ray cluster has "
                f"{info['cpus']:g}; pass fewer --workers or a smaller --cpus-per-worker, or add nodes"
            )
        log.info(
            f"ray: {mode} cluster {info['address']}, {info['nodes']} node(s), {info['cpus']:g} CPUs, "
            f"{info['gpus']:g} GPUs"
        )
        yield info
    finally:
        if owned:
            ray.shutdown()
