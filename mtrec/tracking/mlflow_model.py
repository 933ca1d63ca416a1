"""The file MLflow runs to rebuild an mtrec model at load time ("models from code": no pickle).

`Tracker.log_model` logs this file as the model's code; `mlflow.pyfunc.load_model` executes it,
then calls `MtrecPyfunc.load_context` with the model's artifacts (weights + spec). mtrec itself
does not import this module: importing it sets MLflow's model for the process.
"""

from mlflow.models import set_model

from mtrec.tracking.pyfunc import MtrecPyfunc

set_model(MtrecPyfunc())
