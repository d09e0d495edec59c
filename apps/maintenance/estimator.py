"""``RULEstimator``: the maintenance app as a scikit-learn-style object for notebooks.

    est = RULEstimator("demo", trainer={"max_epochs": 5}).fit()
    est.metrics_["rmse_capped"], est.policy_
    est.predict(sensor_frame)             # one row per asset: RUL now, alarm state
    est.predict_trajectory(sensor_frame)  # one row per reading

``__init__`` only stores its arguments; ``fit`` builds the config (named config, YAML path or
:class:`MaintenanceConfig`, then ``overrides`` merged into it), trains, chooses the alarm
policy on validation units and evaluates; fitted state ends in ``_``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from apps.maintenance.config import MaintenanceConfig, load_config
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.predictor import MaintenancePredictor
from apps.maintenance.training import evaluate_prepared, fit


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class RULEstimator:
    """Fit on the data a :class:`MaintenanceConfig` names; predict per asset or per reading.

    ``config``: ``None`` (the demo config), a config name in ``apps/maintenance/configs``, a
    YAML path, or a :class:`MaintenanceConfig`. ``overrides``: nested dicts merged into it,
    e.g. ``trainer={"max_epochs": 3}``, ``window=20``.
    """

    def __init__(self, config: str | Path | MaintenanceConfig | None = None, **overrides: Any):
        self.config = config
        self.overrides = overrides

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"config": self.config, **self.overrides}

    def set_params(self, **params: Any) -> RULEstimator:
        if "config" in params:
            self.config = params.pop("config")
        self.overrides.update(params)
        return self

    def _build_config(self) -> MaintenanceConfig:
        if isinstance(self.config, MaintenanceConfig):
            base = self.config
        else:
            base = load_config(self.config if self.config is not None else "demo")
        return MaintenanceConfig.from_dict(_merge(base.to_dict(), self.overrides))

    def fit(self, X: Any = None, y: Any = None) -> RULEstimator:
        """Train on the config's data (``X``/``y`` unused: the data source is configured)."""
        cfg = self._build_config()
        out = fit(cfg)
        ev = evaluate_prepared(out.predictor, out.data, cfg, figures=False)
        self.config_ = cfg
        self.predictor_ = out.predictor
        self.policy_ = out.predictor.policy
        self.policy_grid_ = out.selector.grid_ if out.selector is not None else None
        self.metrics_ = ev.metrics
        self.protocol_ = ev.protocol
        self.evaluation_tables_ = ev.tables
        self.known_limits_ = out.known_limits
        return self

    def _check(self) -> MaintenancePredictor:
        if not hasattr(self, "predictor_"):
            raise MaintenanceDataError("RULEstimator is not fitted; call fit() first")
        return self.predictor_

    def predict(self, sensor_frame: pd.DataFrame) -> pd.DataFrame:
        """One row per asset: RUL at its last reading, alarm state, first alarm time, reject reason."""
        return self._check().predict(sensor_frame)

    def predict_trajectory(self, sensor_frame: pd.DataFrame) -> pd.DataFrame:
        """One row per reading: predicted RUL and alarm state at that reading."""
        return self._check().predict_trajectory(sensor_frame)

    def save(self, path: str | Path) -> None:
        self._check().save(Path(path))
