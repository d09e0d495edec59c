"""RULEstimator follows the scikit-learn contract and predicts per asset and per reading."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.estimator import RULEstimator
from apps.maintenance.training import input_example


def test_init_only_stores_and_unfitted_predict_fails():
    est = RULEstimator("demo", trainer={"max_epochs": 1}, window=20)
    assert est.get_params() == {"config": "demo", "trainer": {"max_epochs": 1}, "window": 20}
    assert not [k for k in vars(est) if k.endswith("_")]
    with pytest.raises(MaintenanceDataError, match="not fitted"):
        est.predict(pd.DataFrame())


def test_fit_returns_self_with_fitted_state_and_predicts():
    est = RULEstimator(None, trainer={"max_epochs": 2}, model={"d_model": 32, "ffn_hidden": 64})
    assert est.fit() is est
    assert est.config_.trainer.max_epochs == 2 and est.config_.model.d_model == 32
    assert est.policy_.k in est.config_.alarm.ks
    assert np.isfinite(est.metrics_["rmse_capped"])
    frame = input_example(_data(est), n_units=3, max_rows=50)
    per_asset = est.predict(frame)
    assert len(per_asset) == frame["asset_id"].nunique()
    traj = est.predict_trajectory(frame)
    assert len(traj) == len(frame)
    assert {"rul", "alarm", "asset_id", "timestamp"} <= set(traj.columns)


def _data(est: RULEstimator):
    from apps.maintenance.data import prepare_data

    return prepare_data(est.config_)
