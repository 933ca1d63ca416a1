"""The Ray Train worker entry: `train_loop_per_worker(config)`, and the small actor that carries
progress and per-worker results back to the driver (no shared storage needed).

Each worker: builds the model on meta, shards it with DistributedModelParallel (the config's
planner constraints; Ray Train has already joined the process group: gloo on CPU, nccl on GPU),
streams its share of the Ray Data stream as Arrow batches, and runs the lockstep loop
(`mtrec.train.loop`). Rank 0 sends progress records; every rank sends its stats at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import ray
import ray.train
import torch

from mtrec.config import MtrecConfig
from mtrec.errors import MtrecError
from mtrec.models import MultiTaskTrain, build_model
from mtrec.train import checkpoint
from mtrec.train.loop import Progress, gather_stats, train_stream
from mtrec.train.sharding import dense_optimizer, device_for_backend, plan_summary, shard
from mtrec.train.stream import rebatch


@ray.remote(num_cpus=0)
class RunCollector:
    """Driver-side inbox: worker registrations, progress records, final per-worker results."""

    def __init__(self):
        self.workers: dict[int, dict] = {}
        self.pending: list[dict] = []
        self.history: list[dict] = []
        self.result: dict | None = None

    def register(self, rank: int, info: dict) -> None:
        self.workers[rank] = info

    def progress(self, rec: dict) -> None:
        self.pending.append(rec)
        self.history.append(rec)

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out

    def finish(self, result: dict) -> None:
        self.result = result

    def snapshot(self) -> dict:
        return {"workers": self.workers, "history": self.history, "result": self.result}


def torch_threads(requested: int, local_world_size: int) -> int:
    """`train.torch_threads`, or (0) the node's cores shared by the workers on it."""
    return requested if requested > 0 else max(1, (os.cpu_count() or 1) // max(local_world_size, 1))


def _kill_switch(batches, rank: int, kill: str | None):
    """Fault injection for tests and drills (`MTREC_KILL_WORKER=<rank>:<batches>` on the driver):
    that rank SIGKILLs itself after that many batches, as an OOM kill or a lost node would."""
    if not kill:
        yield from batches
        return
    who, after = (int(x) for x in kill.split(":"))
    for i, b in enumerate(batches):
        if who == rank and i == after:
            os.kill(os.getpid(), signal.SIGKILL)
        yield b


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry. `config`: {"cfg": MtrecConfig as JSON dict, "collector": RunCollector,
    "log_every": int, "expected_rows": good rows validated, "checkpoint": URL to publish,
    "manifest": its fields known to the driver}. The dataset shard "train" yields canonical
    Arrow batches. Publishes the checkpoint only when the rows trained equal `expected_rows`."""
    cfg = MtrecConfig.model_validate(config["cfg"])
    collector = config["collector"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    threads = torch_threads(cfg.train.torch_threads, ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device, backend = device_for_backend()
    ray.get(collector.register.remote(rank, {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                                             "pid": os.getpid(), "device": str(device), "backend": backend, "torch_threads": threads}))
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    dmp, plan = shard(MultiTaskTrain(build_model(cfg, "meta"), cfg), cfg, device)
    optimizer = dense_optimizer(dmp, cfg)
    setup_s = time.perf_counter() - t0

    shard_it = ray.train.get_dataset_shard("train")
    tables = shard_it.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", prefetch_batches=2)
    # exact-size batches already; rebatch only merges a small last one (BatchNorm never sees 1 row)
    batches = rebatch((rb for t in tables for rb in t.combine_chunks().to_batches()), cfg.train.batch_size)

    batches = _kill_switch(batches, rank, config.get("kill"))

    def on_progress(p: Progress) -> None:
        if rank == 0:
            collector.progress.remote({"step": p.step, "rows": p.rows, "rows_per_s": p.rows_per_s, "loss": p.loss, "line": p.line()})

    stats = train_stream(dmp, optimizer, batches, cfg, device, log_every=config.get("log_every", 50), on_progress=on_progress)
    everyone = gather_stats(stats)
    rows = sum(w["rows"] for w in everyone)
    if rows != config["expected_rows"]:  # every rank sees the same sums: all stop before publishing
        per = ", ".join(f"{w['rows']:,}" for w in everyone)
        raise MtrecError(f"workers trained {rows:,} rows ({per} per worker) but validation "
                         f"counted {config['expected_rows']:,} good rows; nothing was published - rerun the job")
    t1 = time.perf_counter()
    plan_dict = plan_summary(plan)
    manifest = {**config["manifest"], "world_size": len(everyone), "plan": plan_dict, "rows_trained": rows,
                "rows_per_worker": [w["rows"] for w in everyone], "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    checkpoint.save(dmp, optimizer, config["checkpoint"], manifest)
    if rank == 0:
        ray.get(collector.finish.remote({"workers": everyone, "plan": plan_dict, "setup_s": setup_s,
                                         "checkpoint_s": time.perf_counter() - t1}))
