"""Probability calibration of model logits, fitted on the VALIDATION block only.

A model trained on sub-sampled legitimate rows with a weighted loss ranks well but its raw
sigmoid is not a probability. ``platt`` fits ``p = sigmoid(a * logit + b)`` (strictly
monotone for a > 0, so rankings and PR-AUC are unchanged); ``isotonic`` fits a monotone
step function (more flexible, but it ties scores, which can lower PR-AUC). State is
plain JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from apps.fraud.errors import FraudDataError


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_calibration(logits: np.ndarray, y: np.ndarray, method: str) -> dict[str, Any]:
    """Calibration parameters as a JSON-able dict (``{"method": ..., ...}``)."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.float64)
    if method == "none":
        return {"method": "none"}
    if y.sum() == 0 or y.sum() == len(y):
        raise FraudDataError(
            f"calibration needs frauds and legitimate rows in the validation block; got "
            f"{int(y.sum())} frauds in {len(y)} rows"
        )
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e6, max_iter=1000).fit(logits[:, None], y)
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if a <= 0:  # an anti-correlated validation block: keep the ranking, fit only the offset
            a = 1.0
            b = float(np.log(y.mean() / (1 - y.mean())) - np.median(logits))
        return {"method": "platt", "a": a, "b": b}
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(logits, y)
        return {
            "method": "isotonic",
            "x": [float(v) for v in iso.X_thresholds_],
            "y": [float(v) for v in iso.y_thresholds_],
        }
    raise FraudDataError(f"unknown calibration method {method!r}")


def apply_calibration(logits: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    method = params["method"]
    if method == "none":
        return _sigmoid(logits)
    if method == "platt":
        return _sigmoid(params["a"] * logits + params["b"])
    if method == "isotonic":
        return np.interp(logits, np.asarray(params["x"]), np.asarray(params["y"]))
    raise FraudDataError(f"unknown calibration method {method!r}")
