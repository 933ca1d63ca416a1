"""MLflow: every job a run, every published day a model version, a promotion gate that can say no.

    experiment  = model name (`cfg.name`); one run per job (full retrain, nightly day)
    run         = params (flattened config, world size, sharding plan), tags (`mtrec.*`: date, kind,
                  parent checkpoint and run, checkpoint URL, version), per-step training metrics
                  (`train/loss`, `train/loss/<task>`, `train/rows_per_s`), evaluation metrics on
                  the day after the last trained day (`eval/<task>/<metric>`), artifacts (config,
                  manifest, validation reports, plots) and the served model (pyfunc; none above
                  `tracking.max_pyfunc_mb`, tag `mtrec.served_model: none`)
    registered model = model name; one version per published day, tagged with its date and
                  checkpoint; aliases `challenger` (newest) and `champion` (serving); a version
                  without a pyfunc is scored from its checkpoint (`--workers N`)

The order a job follows, so that the registry never points at a missing checkpoint and no
checkpoint is published without its run:

    start run (fails before training when MLflow is down) -> train -> stage checkpoint
    -> record (eval metrics, artifacts, model)  -- fails: staged checkpoint discarded, nothing published
    -> publish checkpoint
    -> register version + alias challenger      -- fails: the rerun of the same command registers it
    -> end run FINISHED

The modules:

    client   `Tracker`: the tracking URI, the retrying calls, the experiment, a job's run
             (`job_run`), the served model (`log_model`), the registry (`register`)
    record   what a training job records: `record_job`, `record_bn`, `day_trend`, `example_rows`,
             `served_size` (the served model's MiB against `tracking.max_pyfunc_mb`)
    gate     the promotion gate: `promote`, `compare`, `gate_slice`, `GateDecision`
    pyfunc   the served model's MLflow face: `MtrecPyfunc`, `load_served` (refuses a version
             registered without a pyfunc: NoPyfunc); imports only what scoring needs

The names below are importable from `mtrec.tracking` and load their module on first use, so that
importing one (`load_served` in a scoring process) does not import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtrec.tracking.client import (
        CHALLENGER,
        CHAMPION,
        Tracker,
        VersionInfo,
        flatten,
        quiet_mlflow,
        registered_version,
        tracking_uri,
    )
    from mtrec.tracking.gate import GateDecision, compare, gate_slice, models_uri, promote, seen_until
    from mtrec.tracking.pyfunc import MtrecPyfunc, load_served
    from mtrec.tracking.record import day_trend, example_rows, record_bn, record_job

_LAZY = {
    "CHALLENGER": "client",
    "CHAMPION": "client",
    "Tracker": "client",
    "VersionInfo": "client",
    "flatten": "client",
    "quiet_mlflow": "client",
    "registered_version": "client",
    "tracking_uri": "client",
    "GateDecision": "gate",
    "compare": "gate",
    "gate_slice": "gate",
    "models_uri": "gate",
    "promote": "gate",
    "seen_until": "gate",
    # the code MLflow keeps with a logged model may read `from mtrec.tracking import MtrecPyfunc`
    "MtrecPyfunc": "pyfunc",
    "load_served": "pyfunc",
    "day_trend": "record",
    "example_rows": "record",
    "record_bn": "record",
    "record_job": "record",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GateDecision",
    "MtrecPyfunc",
    "Tracker",
    "VersionInfo",
    "compare",
    "day_trend",
    "example_rows",
    "flatten",
    "gate_slice",
    "load_served",
    "models_uri",
    "promote",
    "quiet_mlflow",
    "record_bn",
    "record_job",
    "registered_version",
    "seen_until",
    "tracking_uri",
]
