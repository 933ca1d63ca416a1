"""Where progress goes: every module logs to its own logger under "mtrec"; the command line
(`configure`) sends them to stderr as plain lines. Ray's and MLflow's own log lines and warnings
(Ray's token-authentication notice, MLflow's colour-coded warnings, ...) are kept out unless
`verbose`: the user reads mtrec's lines and, on failure, one error line.

Example:
    >>> import logging, sys
    >>> configure(sys.stderr)
    >>> logging.getLogger("mtrec.jobs.nightly").info("published dt=2026-01-03")   # on stderr
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

NOISY = (
    "ray",
    "mlflow",
    "alembic",
    "urllib3",
    "filelock",
    "torch.distributed",
    "torch.fx",
    "torchrec",
    "fbgemm_gpu",
    "py4j",
    "git",
)
# warnings raised on behalf of a library but attributed to the caller's module
NOISY_WARNINGS = (r"Hint: Inferred schema contains integer column",)
_state = {"verbose": False}


def configure(stream: TextIO, verbose: bool = False) -> None:
    """mtrec's progress to `stream` as plain lines (INFO; DEBUG too with `verbose`); the
    libraries' own lines only with `verbose`."""
    logger = logging.getLogger("mtrec")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    _state["verbose"] = verbose
    quiet_libraries()


def reset() -> None:
    """Back to Python's defaults for the "mtrec" logger (no handler of ours, records propagate)."""
    logger = logging.getLogger("mtrec")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def verbose() -> bool:
    return _state["verbose"]


def library_level() -> int:
    """The level Ray and MLflow log at: their warnings only with --verbose."""
    return logging.WARNING if _state["verbose"] else logging.ERROR


def quiet_libraries() -> None:
    """Ray's and MLflow's loggers at `library_level()`; their Python warnings ignored unless
    verbose; MLflow leaves logging to us (no colour codes of its own) and shows no progress bars."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name in NOISY:
        logging.getLogger(name).setLevel(library_level())
    if not _state["verbose"]:
        for module in ("ray", "mlflow", "torchrec", "fbgemm_gpu", "torch", "pydantic"):
            warnings.filterwarnings("ignore", module=module)
        for message in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{message}")


def to_json(data, indent: int | None = 2) -> str:
    """`data` as strict JSON, what every JSON mtrec prints or writes for a person's tools goes
    through (`--json`, `--summary`): a number that is not finite (AUC of a one-class slice, a
    diverged loss) is `null`, never a bare NaN / Infinity that strict parsers (JavaScript's, Go's,
    `json.loads(..., parse_constant=...)`) reject; numpy scalars and arrays are plain numbers and
    lists; anything else that JSON has no type for (a date) is its str().

    Example:
        >>> to_json({"auc": float("nan"), "rows": 3}, indent=None)
        '{"auc": null, "rows": 3}'
    """

    def strict(x):
        if type(x).__module__ == "numpy" and hasattr(x, "tolist"):
            x = x.tolist()  # np.float32 (not a float subclass) would otherwise be written as a string
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(data), indent=indent, default=str, allow_nan=False)  # a miss fails, not prints NaN


@contextmanager
def redirected(stream: TextIO) -> Iterator[None]:
    """mtrec's progress lines go to `stream` (and only there) for the block, e.g. one demo step's log."""
    logger = logging.getLogger("mtrec")
    saved, level = list(logger.handlers), logger.level
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        logger.handlers[:] = saved
        logger.setLevel(level)
