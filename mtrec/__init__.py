"""mtrec: nightly multi-task recommendation training on Ray + TorchRec + MLflow.

The public surface is small and imported lazily (torch and Ray load only when used):

    from mtrec import load_config, MtrecError
    cfg = load_config("esmm", logs="s3://bucket/logs", workdir="s3://bucket/mtrec")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mtrec.config import MtrecConfig, load_config
from mtrec.errors import (
    BNCheckFailed,
    CheckpointError,
    ConfigError,
    DataValidationError,
    GateRefused,
    MtrecError,
    TrackingError,
)

try:
    __version__ = version("mtrec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["BNCheckFailed", "CheckpointError", "ConfigError", "DataValidationError", "GateRefused", "MtrecConfig", "MtrecError", "TrackingError", "__version__", "load_config"]
