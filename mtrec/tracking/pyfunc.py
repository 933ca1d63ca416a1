"""The served model's MLflow face: the pyfunc class MLflow loads, its signature, and `load_served`.

Loading a model needs only what scoring needs: MLflow's pyfunc and `mtrec.serving` (this module
imports nothing else of mtrec but its errors), so a process that serves or batch-scores a
registered model does not import the run config, the evaluation, plots or the promotion gate.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from mtrec.errors import TrackingError, first_line
from mtrec.serving import ServedModel

# the code MLflow runs to rebuild the model at load time ("models from code": no pickle); MLflow
# keeps a copy of it in the logged model
MODEL_CODE = str(Path(__file__).with_name("mlflow_model.py"))


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


__all__ = ["MODEL_CODE", "MtrecPyfunc", "load_served", "served_signature"]
