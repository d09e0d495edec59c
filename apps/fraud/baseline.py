"""LightGBM baseline on the app's features: the bar a backbone model has to clear.

Gradient-boosted trees on hand-made transaction aggregates are the standard strong
baseline for card fraud (the handbook's best models are boosted trees on the same
features). Imbalance is handled by ``scale_pos_weight = n_legit / n_fraud`` (or LightGBM's
``is_unbalance``); the number of trees is chosen by early stopping on average precision
over a LATER validation block, never on test days.
"""

from __future__ import annotations

import inspect

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from apps.fraud.errors import FraudDataError

IMBALANCE_MODES = ("scale_pos_weight", "is_unbalance", "none")


def stack_features(x_num: np.ndarray, x_cat: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """One float matrix ``[x_num | x_cat]`` and the indices of its categorical columns (for
    LightGBM's native categorical splits; codes are ints >= 0, 0 = unseen)."""
    if x_num.shape[0] != x_cat.shape[0]:
        raise FraudDataError(f"x_num has {x_num.shape[0]} rows but x_cat {x_cat.shape[0]}")
    x = np.hstack([x_num.astype(np.float64), x_cat.astype(np.float64)])
    return x, list(range(x_num.shape[1], x.shape[1]))


class LightGBMBaseline(ClassifierMixin, BaseEstimator):
    """Binary LightGBM classifier (scikit-learn contract) with early stopping.

    ``fit(x, y, eval_set=(x_val, y_val), categorical_feature=[...])``; without an
    ``eval_set`` all ``n_estimators`` trees are kept. ``n_jobs=1`` by default: the
    development machines are shared.
    """

    def __init__(
        self,
        n_estimators: int = 500,
        learning_rate: float = 0.05,
        num_leaves: int = 31,
        min_child_samples: int = 20,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        reg_lambda: float = 1.0,
        imbalance: str = "scale_pos_weight",
        early_stopping_rounds: int = 50,
        random_state: int = 0,
        n_jobs: int = 1,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.imbalance = imbalance
        self.early_stopping_rounds = early_stopping_rounds
        self.random_state = random_state
        self.n_jobs = n_jobs

    @staticmethod
    def _labels(y: np.ndarray, what: str) -> np.ndarray:
        y = np.asarray(y).ravel()
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise FraudDataError(f"{what} labels must be 0 or 1; row {i} is {y[i]}")
        return y.astype(np.int64)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
        categorical_feature: list[int] | None = None,
    ) -> LightGBMBaseline:
        import lightgbm as lgb

        if self.imbalance not in IMBALANCE_MODES:
            raise FraudDataError(
                f"imbalance must be one of {IMBALANCE_MODES}, got {self.imbalance!r}"
            )
        y = self._labels(y, "training")
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == len(y):
            raise FraudDataError(
                f"training needs frauds and legitimate rows; got {n_pos} frauds in {len(y)}"
            )
        self.scale_pos_weight_ = (
            (len(y) - n_pos) / n_pos if self.imbalance == "scale_pos_weight" else 1.0
        )
        params = dict(
            objective="binary",
            metric="average_precision",
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples,
            subsample=self.subsample,
            subsample_freq=1 if self.subsample < 1 else 0,
            colsample_bytree=self.colsample_bytree,
            reg_lambda=self.reg_lambda,
            random_state=self.random_state,
            n_jobs=self.n_jobs,
            deterministic=True,
            force_row_wise=True,
            verbose=-1,
        )
        if self.imbalance == "scale_pos_weight":
            params["scale_pos_weight"] = self.scale_pos_weight_
        elif self.imbalance == "is_unbalance":
            params["is_unbalance"] = True
        model = lgb.LGBMClassifier(**params)
        fit_kw: dict = {"categorical_feature": categorical_feature or "auto"}
        if eval_set is not None:
            x_val, y_val = eval_set
            y_val = self._labels(y_val, "validation")
            if "eval_X" in inspect.signature(model.fit).parameters:  # lightgbm >= 4.7
                fit_kw.update(eval_X=(x_val,), eval_y=(y_val,))
            else:
                fit_kw["eval_set"] = [(x_val, y_val)]
            if self.early_stopping_rounds and 0 < y_val.sum() < len(y_val):
                fit_kw["callbacks"] = [
                    lgb.early_stopping(self.early_stopping_rounds, verbose=False)
                ]
        model.fit(x, y, **fit_kw)
        self.model_ = model
        self.n_train_rows_ = len(y)
        self.best_iteration_ = int(model.best_iteration_ or self.n_estimators)
        self.evals_result_ = dict(model.evals_result_)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = int(np.shape(x)[1])
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``[n, 2]`` probabilities (legit, fraud) from the early-stopped model."""
        return self.model_.predict_proba(x, num_iteration=self.best_iteration_)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Fraud score ``P(fraud)`` per row (what metrics and thresholds take)."""
        return self.predict_proba(x)[:, 1]

    def margin(self, x: np.ndarray) -> np.ndarray:
        """Raw log-odds per row from the early-stopped model: ``decision_function`` is
        ``sigmoid(margin)``. A model that blends with or learns from the baseline needs
        the margin: probabilities squash the top of the ranking into ``[0, 1]``."""
        return self.model_.predict(x, raw_score=True, num_iteration=self.best_iteration_)

    def predict(self, x: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """0/1 alerts at ``threshold``; choose it on validation data (``apps.fraud.thresholds``)."""
        return (self.decision_function(x) >= threshold).astype(np.int64)
