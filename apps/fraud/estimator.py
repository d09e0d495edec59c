"""``FraudDetector``: the fraud app as a scikit-learn-style notebook class.

``__init__`` only stores parameters; ``fit(transactions)`` (a path or a polars/pandas frame
with the schema's columns and labels) runs the same protocol as ``keel train fraud``:
time split, backbone + LightGBM baseline, calibration and threshold on validation, test
metrics in ``metrics_``. Fitted state ends in ``_``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from apps.fraud.config import FraudConfig, load_config


class FraudDetector:
    def __init__(self, config: FraudConfig | str | None = None, **overrides: Any) -> None:
        self.config = config
        self.overrides = overrides

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """scikit-learn parameters: ``config`` plus the ``a__b`` overrides (for ``clone``)."""
        return {"config": self.config, **self.overrides}

    def set_params(self, **params: Any) -> FraudDetector:
        if "config" in params:
            self.config = params.pop("config")
        self.overrides.update(params)
        return self

    def _config(self) -> FraudConfig:
        cfg = self.config
        cfg = (
            load_config("demo")
            if cfg is None
            else load_config(cfg)
            if isinstance(cfg, str)
            else cfg
        )
        # core's dotted overrides: a copy rebuilt through from_dict, so every section's
        # checks see the overridden values (a bad value fails here, naming its key)
        dotted = {key.replace("__", "."): value for key, value in self.overrides.items()}
        try:
            return cfg.with_overrides(dotted)
        except KeyError as err:
            raise ValueError(
                f"FraudDetector: unknown config key ({err.args[0]}; use a__b for nesting)"
            ) from None

    def fit(
        self, transactions: str | Path | pd.DataFrame | pl.DataFrame, y: Any = None
    ) -> FraudDetector:
        from apps.fraud.training import fit

        cfg = self._config()
        if isinstance(transactions, (str, Path)):
            cfg.data_path = str(transactions)
            out = fit(cfg)
        else:
            frame = (
                transactions
                if isinstance(transactions, pl.DataFrame)
                else pl.from_pandas(transactions)
            )
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "transactions.parquet"
                frame.write_parquet(path)
                cfg.data_path = str(path)
                out = fit(cfg)
        self.config_ = cfg
        self.predictor_ = out.predictor
        self.threshold_ = out.predictor.threshold
        self.metrics_ = dict(out.evaluation.metrics)
        self.protocol_ = out.evaluation.protocol
        return self

    def _check(self) -> None:
        if not hasattr(self, "predictor_"):
            raise RuntimeError("FraudDetector is not fitted; call fit(transactions) first")

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """``[n, 2]`` (legit, fraud) calibrated probabilities; NaN rows for rejected input."""
        self._check()
        s = self.predictor_.predict(frame)["score"].to_numpy(dtype=float)
        return np.stack([1 - s, s], axis=1)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Alert decisions (bool) at the validation-chosen threshold."""
        self._check()
        return self.predictor_.predict(frame)["decision"].to_numpy(dtype=bool)

    def explain(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The predictor's full output (score, decision, reasons, reject_reason)."""
        self._check()
        return self.predictor_.predict(frame)
