"""The served model's MLflow face: the pyfunc class MLflow loads, its signature, and `load_served`.

Loading a model needs only what scoring needs: MLflow's pyfunc and `mtrec.serving` (this module
imports nothing else of mtrec but its errors), so a process that serves or batch-scores a
registered model does not import the run config, the evaluation, plots or the promotion gate.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from mtrec.errors import NoPyfunc, TrackingError, first_line
from mtrec.serving import ServedModel

# the code MLflow runs to rebuild the model at load time ("models from code": no pickle); MLflow
# keeps a copy of it in the logged model
MODEL_CODE = str(Path(__file__).with_name("mlflow_model.py"))
# what a run and its version say about the served model (`mtrec.tracking.record.ServedSize`): a
# model above `tracking.max_pyfunc_mb` is registered without a pyfunc, and the readers refuse it
SERVED_TAG = "mtrec.served_model"  # "pyfunc", or "none": no pyfunc was logged
SIZE_TAG = "mtrec.served_model_mb"  # MiB of the served model's tensors
LIMIT_TAG = "mtrec.max_pyfunc_mb"  # the job's tracking.max_pyfunc_mb ("": no limit)
REGISTERED = re.compile(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))")  # models:/NAME/N or models:/NAME@alias


def without_pyfunc(tags: dict[str, str]) -> bool:
    """Whether a run's or version's tags say it was recorded without a pyfunc (`SERVED_TAG`)."""
    return tags.get(SERVED_TAG) == "none"


class MtrecPyfunc(mlflow.pyfunc.PythonModel):
    """The MLflow face of `ServedModel`: a pandas DataFrame of raw feature columns in, one column
    per task (probability; regression value) out (MLflow's schema check takes DataFrames; for
    Arrow batches use `load_served(uri).predict(table)`, the same model). The DataFrame becomes
    Arrow columns of the data contract's types (`ServedModel.from_pandas`: null ids, integer and
    string ids) and is scored by `ServedModel.predict`, as `mtrec predict` scores Parquet
    batches. Needs mtrec installed where it is loaded."""

    def load_context(self, context) -> None:
        self.served = ServedModel.load(context.artifacts["served"])

    # a DataFrame hint: MLflow validates against the logged signature (no type-hint inference)
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # params={"request": True}: the rows are one user's candidates, the user side sent once (first row)
        return self.served.predict_pandas(model_input, request=bool((params or {}).get("request", False)))


def served_signature(served: ServedModel):
    """The logged model's signature, from the spec rather than from example rows: each feature
    column as its kind lists it (`mtrec.data.kinds.COLUMN_TYPES[kind].served`; ids, bags and
    sequences as ``Any``, since the contract allows integer or string ids and nulls, which MLflow's
    typed columns would refuse), one float column per output, and the `request` parameter
    (`ServedModel.predict`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    from mtrec.data.kinds import COLUMN_TYPES

    roles = served.spec.column_roles()
    inputs = []
    for col in served.columns:
        kind = COLUMN_TYPES[roles[col][0]].served or "any"  # a column a label also names: Any
        inputs.append(ColSpec(AnyType() if kind == "any" else kind, col))
    outputs = Schema([ColSpec("float", name) for name in served.outputs])
    return ModelSignature(Schema(inputs), outputs, ParamSchema([ParamSpec("request", "boolean", False)]))


def load_served(model_uri: str) -> ServedModel:
    """The ServedModel inside a logged/registered model (`models:/<name>@champion`, `runs:/...`)."""
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - MLflow, network, a model logged by another version: one line
        _refuse_without_pyfunc(model_uri)  # a version registered without one: say that, and the fix
        raise TrackingError(
            f"cannot load {model_uri}: {first_line(e, limit=240)}; check the name, version or alias "
            f"and the tracking URI ({mlflow.get_tracking_uri()})"
        ) from None
    inner = model.unwrap_python_model()
    if not isinstance(inner, MtrecPyfunc):
        raise TrackingError(
            f"{model_uri} is not an mtrec model ({type(inner).__name__}); point --model at one mtrec logged"
        )
    return inner.served


def no_pyfunc_reason(model_uri: str, tags: dict[str, str]) -> str | None:
    """The one line refusing to load `model_uri` when its version's `tags` say it was registered
    without a pyfunc (`SERVED_TAG` "none"); None for a version that has one."""
    if not without_pyfunc(tags):
        return None
    limit = tags.get(LIMIT_TAG) or "none"
    return (
        f"{model_uri} has no pyfunc: its model's tensors ({_mib(tags.get(SIZE_TAG))} MiB) were above "
        f"tracking.max_pyfunc_mb ({_mib(limit)}) when it was trained; score it from its checkpoint on Ray workers "
        "with --workers N (mtrec predict/evaluate/promote)"
    )


def _refuse_without_pyfunc(model_uri: str) -> None:
    """Raise NoPyfunc when `model_uri` (`models:/NAME/N`, `models:/NAME@alias`) names a version
    registered without a pyfunc. Asked only once loading failed (such a version's source is its
    run's artifacts, with no MLmodel), so a model that loads costs no extra call; a version that
    cannot be read is left to the caller's message."""
    m = REGISTERED.fullmatch(model_uri)
    if not m:
        return
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version(m[1], m[2]) if m[2] else client.get_model_version_by_alias(m[1], m[3])
    except Exception:  # noqa: BLE001 - absent, unreachable: the caller's one line says it
        return
    what = model_uri if m[2] else f"{model_uri} (version {mv.version})"
    reason = no_pyfunc_reason(what, dict(mv.tags or {}))
    if reason:
        raise NoPyfunc(reason)


def _mib(value: str | float | None) -> str:
    """A size in MiB as the refusal prints it: 12,345 (and 0.0123 below 10)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{x:,.0f}" if x >= 10 else f"{x:.3g}"


__all__ = ["MODEL_CODE", "MtrecPyfunc", "load_served", "no_pyfunc_reason", "served_signature"]
