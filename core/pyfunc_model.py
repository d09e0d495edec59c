"""MLflow models-from-code entry point for every Keel model.

MLflow executes this file when loading a model, instead of unpickling an object; the
weights and config come from plain-file artifacts (see :mod:`core.pyfunc`).
"""

import mlflow

from core.pyfunc import KeelPyfuncModel

mlflow.models.set_model(KeelPyfuncModel())
