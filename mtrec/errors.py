"""One small exception hierarchy. Every message is one line naming the problem and the fix.

The classes hold only a message string, so they pickle and survive Ray workers.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200, typed: bool = False) -> str:
    """An exception as one short line for a message of ours (Ray's, MLflow's and requests'
    messages run to many lines): the first non-blank line of its message, cut at `limit`
    characters with " ..." after a cut, or its class name when the message is empty. `typed`
    puts the class name in front: "RuntimeError: CUDA out of memory"."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit] + " ..."
    if typed and text:
        return f"{type(exc).__name__}: {text}"
    return text or type(exc).__name__


class MtrecError(Exception):
    """Base class: the CLI prints ``mtrec: error: <message>`` and exits non-zero."""

    exit_code = 2

    def reworded(self, message: str) -> MtrecError:
        """The same kind of error (same exit code) with another message. An error raised in a Ray
        worker arrives as a Ray wrapper class deriving from this one: the mtrec class is used."""
        cls = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        return cls(message)


class ConfigError(MtrecError):
    """The YAML config (or a CLI override) is invalid."""


class NoPyfunc(ConfigError):
    """A command that loads the served model (the pyfunc) was given a version registered without
    one (above `tracking.max_pyfunc_mb`): it is scored from its checkpoint, with --workers N."""


class DataValidationError(MtrecError):
    """A day's logs break the data contract (schema), or too many rows were quarantined."""

    exit_code = 3


class CheckpointError(MtrecError):
    """A checkpoint is missing, incomplete, corrupted or belongs to another model/config."""

    exit_code = 4


class GateRefused(MtrecError):
    """The promotion gate refused the challenger."""

    exit_code = 5


class GateDeferred(GateRefused):
    """The promotion gate cannot judge yet: no day with logs that neither model trained on. Its
    own exit code, so a scheduled `mtrec promote` tells "not yet" from "no"."""

    exit_code = 10


class TrackingError(MtrecError):
    """MLflow (tracking store or registry) is unreachable or refused a call."""

    exit_code = 6


class BNCheckFailed(MtrecError):
    """A model's BatchNorm running statistics do not match the serving-like slice."""

    exit_code = 7


class LockHeld(MtrecError):
    """Another job is training the same model (it holds the model's lock)."""

    exit_code = 8


class ClusterError(MtrecError):
    """The Ray cluster's job server cannot be reached, or a submitted job never ran its command."""

    exit_code = 9


class StorageError(MtrecError):
    """A file system or object store operation failed after the client's own retries (denied,
    missing, unreachable): the CLI's one line for an OSError that no job step named itself."""

    exit_code = 11
