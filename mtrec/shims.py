"""Every private API of a pinned library that mtrec relies on, each behind one small function.

    torch 2.13  torch.distributed.checkpoint._fsspec_filesystem.FsspecReader / FsspecWriter
                (`dcp_reader`, `dcp_writer`)
    ray 2.60    Ray Train v2's PlacementGroupCleanerCallback and
                DataParallelTrainer._create_default_callbacks (`trainer_class`)

Each docstring says which private API, what it buys and what breaks if it changes.
tests/test_shims.py has one test per shim that fails when the private API moves or changes
signature: run it first after bumping a pin. The imports happen inside the functions, so
importing this module loads neither torch nor Ray.
"""

from __future__ import annotations


def dcp_writer(url: str):
    """A torch.distributed.checkpoint StorageWriter for any fsspec URL (a path, file://, s3://,
    memory://...): every rank writes its own shards straight to the store.

    Private API: `torch.distributed.checkpoint._fsspec_filesystem.FsspecWriter(path)` (torch
    2.13); torch exports only the local-disk FileSystemWriter. DCP's own fallback
    (`dcp.save(..., checkpoint_id=url)`) imports the same class from the same module, so it is
    no way around it. If it moves or changes: every checkpoint save fails at once (nothing is
    published).
    """
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url)


def dcp_reader(url: str):
    """A torch.distributed.checkpoint StorageReader for any fsspec URL; `read_metadata()` gives
    the checkpoint's tensors (names, sizes, dtypes) without reading them.

    Private API: `torch.distributed.checkpoint._fsspec_filesystem.FsspecReader(path)` (torch
    2.13), as `dcp_writer`. If it moves or changes: every checkpoint load fails (warm starts,
    resumes, evaluation, serving); `checkpoint.load` reports it as shards that cannot be read.
    """
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url)


def trainer_class():
    """TorchTrainer whose placement-group cleaner gives up quickly. Ray Train 2.x starts a detached
    cleaner actor per run and, at the end, waits for its monitor thread, which may sit in a 10 s
    state-API call (or fail to reach the state API when the local cluster runs without a
    dashboard): 12 s added to every job. With 1 s/2 s timeouts the run ends in about 3 s; the
    cleaner still removes the placement group if the controller dies.

    Private API (ray 2.60, Ray Train v2): `PlacementGroupCleanerCallback(check_interval_s,
    get_actor_timeout_s, stop_timeout)` from
    `ray.train.v2._internal.callbacks.placement_group_callback`, and the trainer's
    `_create_default_callbacks()`, which builds the controller's callbacks (`RunConfig(callbacks=)`
    can only add one, not replace the default). If the module moves or the parameters change: an
    ImportError / TypeError when a job starts. If `_create_default_callbacks` is renamed or no
    longer called by `fit`: nothing fails, every job takes 12 s longer.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [
                PlacementGroupCleanerCallback(check_interval_s=0.5, get_actor_timeout_s=1.0, stop_timeout=2.0)
                if isinstance(cb, PlacementGroupCleanerCallback)
                else cb
                for cb in super()._create_default_callbacks()
            ]

    return Trainer
