"""One test per shim in mtrec.shims: each fails when the private API under it moved or changed
signature. Run this file first after bumping torch or Ray. None starts a Ray cluster."""

from __future__ import annotations

import inspect
import uuid
import warnings

import pytest
import torch

from mtrec import shims


@pytest.mark.parametrize("store", ["local", "memory"])
def test_dcp_reader_and_writer_round_trip_on_any_fsspec_url(tmp_path, store):
    import fsspec
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from mtrec.train.checkpoint import read_full

    for cls in (FsspecReader, FsspecWriter):  # shims pass the URL as the first argument
        assert list(inspect.signature(cls.__init__).parameters)[1] == "path", cls
    url = str(tmp_path / "ck") if store == "local" else f"memory://shims-{uuid.uuid4().hex}/ck"
    state = {
        "model": {"tower.weight": torch.arange(6.0).reshape(2, 3)},
        "dense_optimizer": {"tower.weight.step": torch.tensor(3.0)},
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": one process
            dcp.save(state, storage_writer=shims.dcp_writer(url))
        meta = shims.dcp_reader(url).read_metadata().state_dict_metadata
        assert sorted(meta) == ["dense_optimizer.tower.weight.step", "model.tower.weight"]
        back = read_full(url)
        assert back.keys() == meta.keys()
        assert torch.equal(back["model.tower.weight"], state["model"]["tower.weight"])
        assert torch.equal(back["dense_optimizer.tower.weight.step"], torch.tensor(3.0))
    finally:
        if store == "memory":
            fsspec.filesystem("memory").rm(url.rsplit("/", 1)[0], recursive=True)


def test_trainer_class_only_shortens_the_placement_group_cleaner(tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    was_up = ray.is_initialized()  # a session's shared cluster may be up already
    params = inspect.signature(PlacementGroupCleanerCallback.__init__).parameters
    assert {"check_interval_s", "get_actor_timeout_s", "stop_timeout"} <= params.keys(), params
    # the override matters only while fit() takes the controller's callbacks from it (Train v2)
    assert issubclass(TorchTrainer, DataParallelTrainer)
    assert "self._create_default_callbacks()" in inspect.getsource(DataParallelTrainer.fit)

    def callbacks(cls) -> list:
        trainer = cls(
            lambda: None, scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(storage_path=str(tmp_path))
        )
        return trainer._create_default_callbacks()

    ours, default = callbacks(shims.trainer_class()), callbacks(TorchTrainer)
    assert [type(c) for c in ours] == [type(c) for c in default]
    (cleaner,) = [c for c in ours if isinstance(c, PlacementGroupCleanerCallback)]
    assert (cleaner._check_interval_s, cleaner._get_actor_timeout_s, cleaner._stop_timeout) == (0.5, 1.0, 2.0)
    assert ray.is_initialized() == was_up  # building the callbacks started no cluster
