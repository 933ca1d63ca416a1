"""mtrec: nightly multi-task recommendation training on Ray + TorchRec + MLflow.

The public surface is small and imported lazily (torch and Ray load only when used):

    from mtrec import load_config, MtrecError
    cfg = load_config("esmm", logs="s3://bucket/logs", workdir="s3://bucket/mtrec")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from mtrec.errors import (
    BNCheckFailed,
    CheckpointError,
    ConfigError,
    DataValidationError,
    GateRefused,
    MtrecError,
    TrackingError,
)

if TYPE_CHECKING:
    from mtrec.config import MtrecConfig, load_config
    from mtrec.spec import ModelSpec

try:
    __version__ = version("mtrec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {"MtrecConfig": "mtrec.config", "load_config": "mtrec.config", "ModelSpec": "mtrec.spec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtrec' has no attribute {name!r}")


__all__ = [
    "BNCheckFailed",
    "CheckpointError",
    "ConfigError",
    "DataValidationError",
    "GateRefused",
    "ModelSpec",
    "MtrecConfig",
    "MtrecError",
    "TrackingError",
    "__version__",
    "load_config",
]
