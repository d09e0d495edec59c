"""Drift-from-own-start channels: hand-computed values, unit boundaries, no future reading, row
order, the config check, and the fitted predictor applying (and saving) them at scoring time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.config import MaintenanceConfig
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.predictor import feature_names
from apps.maintenance.training import split_windows
from apps.maintenance.unit_baseline import add_drift_channels
from tests.apps.maintenance.conftest import (
    check_causal_scoring_and_reload,
    tiny_config,
    two_unit_frame,
)


def test_hand_computed_and_unit_boundary():
    got = add_drift_channels(two_unit_frame(), ["a", "b"], readings=2)
    # baseline = mean of the unit's first min(n, 2) readings so far; unit 2 has its own
    np.testing.assert_allclose(got["a_drift"], [0.0, 1.0, 0.0, 4.0, 0.0, -5.0])
    np.testing.assert_allclose(got["b_drift"], [0.0, 0.0, 4.0, 0.0, 0.0, 2.0])
    pd.testing.assert_frame_equal(got.drop(columns=["a_drift", "b_drift"]), two_unit_frame())


def test_reads_nothing_after_each_reading():
    rng = np.random.default_rng(0)
    f = pd.DataFrame(
        {"unit": np.repeat([3, 4], 15), "time": np.tile(np.arange(15), 2), "a": rng.normal(size=30)}
    )
    base = add_drift_channels(f, ["a"], readings=5)["a_drift"].to_numpy()
    for i in (0, 3, 6, 14, 20):
        changed = f.copy()
        # every later reading, of this unit and the next (not a constant: drift ignores offsets)
        changed.loc[i + 1 :, "a"] += rng.normal(scale=1000.0, size=len(f) - i - 1)
        got = add_drift_channels(changed, ["a"], readings=5)["a_drift"].to_numpy()
        np.testing.assert_array_equal(got[: i + 1], base[: i + 1])
        assert not np.allclose(got[i + 1 :], base[i + 1 :])


def test_row_order_does_not_matter():
    f = two_unit_frame()
    shuffled = f.sample(frac=1.0, random_state=3)
    got = add_drift_channels(shuffled, ["a", "b"], readings=3)
    pd.testing.assert_frame_equal(got.sort_index(), add_drift_channels(f, ["a", "b"], readings=3))


def test_bad_settings_are_refused():
    with pytest.raises(MaintenanceDataError, match="unit_baseline_readings"):
        add_drift_channels(two_unit_frame(), ["a"], readings=0)
    with pytest.raises(MaintenanceDataError, match="'time'"):
        add_drift_channels(two_unit_frame().drop(columns="time"), ["a"], readings=2)
    with pytest.raises(MaintenanceDataError, match="unit_baseline_readings=-1"):
        MaintenanceConfig(unit_baseline_readings=-1)
    assert MaintenanceConfig().unit_baseline_readings == 0  # off unless configured


def test_fit_windows_and_predictor_use_the_drift(tmp_path):
    from apps.maintenance.training import fit

    cfg = tiny_config(max_epochs=1)
    cfg.unit_baseline_readings = 4
    out = fit(cfg)
    state = out.predictor.normalizer
    assert state["unit_baseline_readings"] == 4
    kept = state["kept_sensors"]
    names = feature_names(state)
    n = len(kept)
    assert names[:n] == kept and names[n : 2 * n] == [f"{s}_drift" for s in kept]
    w = split_windows(state, out.data.policy, cfg.window)
    assert w.x.shape[2] == len(names) >= 2 * n
    u = w.unit == w.unit[0]
    first_sensor = w.x[u, -1, 0].astype(np.float64)  # each reading of unit 0, in time order
    pos = np.arange(len(first_sensor))
    baseline = np.cumsum(np.where(pos < 4, first_sensor, 0.0)) / np.minimum(pos + 1, 4)
    np.testing.assert_allclose(w.x[u, -1, n], first_sensor - baseline, atol=1e-5)
    # scoring a truncated history equals the full trajectory at that reading, also after load
    loaded = check_causal_scoring_and_reload(out, tmp_path)
    assert loaded.normalizer["unit_baseline_readings"] == 4
