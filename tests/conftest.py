"""Shared fixtures: one small synthetic world per session (fast, deterministic); a minimal config
and record batch for tests of single rules."""

from __future__ import annotations

import datetime as dt
import logging

import pyarrow as pa
import pytest

from mtrec.config import load_config, parse_config
from mtrec.data.synth import write_world

DAY1 = dt.date(2026, 1, 1)
WORLD_ROWS = 20_000
# fixtures that start Ray or a server: a test that uses one must be marked `slow`
SLOW_FIXTURES = ("ray_local", "server", "two_node_cluster")


def pytest_collection_modifyitems(items):
    """Refuse to run when a test pulls in a Ray or server fixture without the `slow` mark, so
    `-m "not slow"` stays fast and never starts Ray."""
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("slow") is None and set(SLOW_FIXTURES) & set(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError(f"mark these tests @pytest.mark.slow (they use {', '.join(SLOW_FIXTURES)}): {unmarked}")


def _mini(extra_labels=None, tasks=None, model=None, dense=True):
    """A minimal ESMM config: click/conversion labels, one sparse, one dense and one bias feature."""
    return parse_config(
        {
            "name": "t",
            "labels": {"click": "binary", "conversion": "binary", **(extra_labels or {})},
            "features": {
                "sparse": [{"name": "user_id", "hash_size": 10}],
                "dense": [{"name": "price"}] if dense else [],
                "bias": [{"name": "device", "num_values": 2}],
            },
            "tasks": tasks or [{"name": "ctr", "label": "click"}],
            "model": model or {"arch": "esmm"},
        }
    )


def _batch(**cols):
    """A record batch of the columns `_mini` reads, all-clean defaults, with `cols` replacing them."""
    n = len(next(iter(cols.values())))
    base = {
        "user_id": pa.array(range(n), pa.int64()),
        "item_id": pa.array(range(n), pa.int64()),
        "position": pa.array([0] * n, pa.int32()),
        "click": pa.array([0] * n, pa.int8()),
        "conversion": pa.array([0] * n, pa.int8()),
        "price": pa.array([1.0] * n, pa.float32()),
        "device": pa.array([0] * n, pa.int8()),
    }
    base.update(cols)
    return pa.record_batch(base)


def without_floors(d: dict) -> dict:
    """A config dict whose gate floors cannot refuse: for tests of the registry's and the BN check's
    mechanics on models trained on a few thousand rows (or not at all), which (rightly) sit below
    the quality floors. The floors have their own tests."""
    d["gate"].update(min_auc=0.0, max_calibration_factor=1e9, max_loss_growth=1e9)
    return d


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> str:
    """A 3-day world of 20,000 rows/day, 4 files/day, seed 3: the logs root (a local path)."""
    root = str(tmp_path_factory.mktemp("world"))
    write_world(root, days=3, rows_per_day=WORLD_ROWS, seed=3)
    return root


@pytest.fixture(scope="session")
def seq_world(tmp_path_factory) -> tuple[str, dt.date, dt.date]:
    """A 2-day world with behaviour histories (`--preset sequences` with 3,000 users, so the day-1
    users' pasts build fast), 6,000 rows/day in 3 files: (logs root, day 1, day 2)."""
    from mtrec.data.synth import world_params

    root = str(tmp_path_factory.mktemp("seq-world"))
    write_world(
        root,
        days=2,
        rows_per_day=6_000,
        seed=5,
        files_per_day=3,
        params=world_params(["users=3000"], "sequences"),
    )
    return root, DAY1, DAY1 + dt.timedelta(days=1)


@pytest.fixture
def cfg(world, tmp_path):
    """The ESMM example config pointed at the session world and a fresh workdir."""
    return load_config("esmm", logs=world, workdir=str(tmp_path / "work"))


@pytest.fixture
def progress(caplog):
    """The progress lines mtrec's jobs log, so far: call it after the job ran."""
    caplog.set_level(logging.INFO, logger="mtrec")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("mtrec")]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (4 logical CPUs: 2 workers + 2 read slots).
    Tests that use it are marked `slow`, so `-m "not slow"` never starts Ray."""
    import ray

    from mtrec.jobs.cluster import quiet_ray

    quiet_ray()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
