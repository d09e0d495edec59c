"""Package any app predictor as an MLflow pyfunc model (models-from-code).

The logged model is ``core/pyfunc_model.py`` plus two artifacts: ``keel_meta.yaml``
(which app spec rebuilds the predictor) and ``predictor/`` (the predictor's plain files).
Nothing is pickled, so ``mlflow.pyfunc.load_model`` runs no stored code.
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

from core.spec import Predictor, load_app_spec

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")

# What a served Keel model imports, pinned to the versions it was logged with. Stating them
# skips MLflow's requirement inference, which loads the model in a subprocess on every
# log (tens of seconds per registration on a 2-core machine).
SERVING_DISTRIBUTIONS = (
    "torch",
    "lightning",
    "mlflow",
    "numpy",
    "pandas",
    "pyarrow",
    "pyyaml",
    "scikit-learn",
    "polars",
    "lightgbm",
    "pydicom",
    "monai",
    "highdicom",
)


def pip_requirements() -> list[str]:
    """``name==version`` for each installed serving dependency (local build tags dropped)."""
    reqs = []
    for dist in SERVING_DISTRIBUTIONS:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={version.split('+')[0]}")
    return reqs


class KeelPyfuncModel(mlflow.pyfunc.PythonModel):
    """Generic pyfunc wrapper: loads the app's predictor from artifacts and delegates."""

    def load_context(self, context: Any) -> None:
        meta = yaml.safe_load(Path(context.artifacts["keel_meta"]).read_text())
        spec = load_app_spec(meta["app"])
        self.predictor = spec.predictor_cls.load(Path(context.artifacts["predictor"]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self.predictor.predict(model_input)


def log_predictor(
    predictor: Predictor,
    app: str,
    *,
    input_example: pd.DataFrame,
    registered_model_name: str | None = None,
    name: str = "model",
) -> Any:
    """Log ``predictor`` to the active run as a pyfunc model, optionally registering it.

    The signature is inferred from the input example and the predictor's own output on
    it, so serving refuses frames that do not match.
    """
    from mlflow.models import infer_signature

    output_example = predictor.predict(input_example)
    signature = infer_signature(input_example, output_example)
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir = Path(tmp) / "predictor"
        pred_dir.mkdir()
        predictor.save(pred_dir)
        meta = Path(tmp) / "keel_meta.yaml"
        meta.write_text(yaml.safe_dump({"app": app, "format_version": 1}))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"predictor": str(pred_dir), "keel_meta": str(meta)},
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            # Read by batch scoring: e.g. a group column whose rows must stay in one chunk.
            metadata={"keel_app": app, **dict(getattr(predictor, "scoring_metadata", {}) or {})},
        )


def set_alias(name: str, alias: str, version: int | str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


def load_model(uri: str) -> Any:
    """Load a pyfunc model, e.g. ``models:/keel-fraud@champion``."""
    return mlflow.pyfunc.load_model(uri)
