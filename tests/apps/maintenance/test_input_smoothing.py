"""Causal input smoothing: hand-computed values, unit boundaries, no future reading, row order,
the config check, and the fitted predictor applying (and saving) it at scoring time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.config import MaintenanceConfig
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.input_smoothing import InputSmoothingConfig, causal_smooth_inputs
from apps.maintenance.training import split_windows
from tests.apps.maintenance.conftest import (
    check_causal_scoring_and_reload,
    tiny_config,
    two_unit_frame,
)

EWM = {"kind": "ewm", "alpha": 0.5}


def test_ewm_hand_computed_and_unit_boundary():
    got = causal_smooth_inputs(two_unit_frame(), ["a", "b"], EWM)
    # s0 = x0; s_t = 0.5 x_t + 0.5 s_{t-1}; unit 2 starts again from its own first reading
    np.testing.assert_allclose(got["a"], [1.0, 2.0, 2.0, 4.0, 10.0, 5.0])
    np.testing.assert_allclose(got["b"], [0.0, 0.0, 2.0, 1.0, -2.0, 0.0])
    np.testing.assert_array_equal(got["other"], 9.0)  # columns not named stay as they are


def test_trailing_mean_hand_computed():
    got = causal_smooth_inputs(two_unit_frame(), ["a"], {"kind": "mean", "window": 2})
    np.testing.assert_allclose(got["a"], [1.0, 2.0, 2.5, 4.0, 10.0, 5.0])
    off = causal_smooth_inputs(two_unit_frame(), ["a"], {"kind": "none"})
    pd.testing.assert_frame_equal(off, two_unit_frame())


@pytest.mark.parametrize("spec", [EWM, {"kind": "mean", "window": 3}])
def test_reads_nothing_after_each_cycle(spec):
    rng = np.random.default_rng(0)
    f = pd.DataFrame(
        {"unit": np.repeat([3, 4], 15), "time": np.tile(np.arange(15), 2), "a": rng.normal(size=30)}
    )
    base = causal_smooth_inputs(f, ["a"], spec)["a"].to_numpy()
    for i in (0, 6, 14, 20):
        changed = f.copy()
        changed.loc[i + 1 :, "a"] += 1000.0  # every later reading, of this unit and the next
        got = causal_smooth_inputs(changed, ["a"], spec)["a"].to_numpy()
        np.testing.assert_array_equal(got[: i + 1], base[: i + 1])
        assert not np.allclose(got[i + 1 :], base[i + 1 :])


def test_row_order_does_not_matter():
    f = two_unit_frame()
    shuffled = f.sample(frac=1.0, random_state=3)
    got = causal_smooth_inputs(shuffled, ["a", "b"], EWM)
    pd.testing.assert_frame_equal(got.sort_index(), causal_smooth_inputs(f, ["a", "b"], EWM))


def test_bad_settings_are_refused():
    with pytest.raises(MaintenanceDataError, match="input_smoothing.kind"):
        InputSmoothingConfig(kind="median")
    with pytest.raises(MaintenanceDataError, match="alpha"):
        InputSmoothingConfig(kind="ewm", alpha=0.0)
    with pytest.raises(MaintenanceDataError, match="window"):
        causal_smooth_inputs(two_unit_frame(), ["a"], {"kind": "mean", "window": 0})
    with pytest.raises(MaintenanceDataError, match="'time'"):
        causal_smooth_inputs(two_unit_frame().drop(columns="time"), ["a"], EWM)
    cfg = MaintenanceConfig.from_dict({"input_smoothing": {"kind": "ewm", "alpha": 0.2}})
    assert cfg.input_smoothing == InputSmoothingConfig(kind="ewm", alpha=0.2)
    assert MaintenanceConfig().input_smoothing.kind == "none"  # off unless configured


def test_fit_windows_and_predictor_use_the_smoothing(tmp_path):
    from apps.maintenance.training import fit

    cfg = tiny_config(max_epochs=1)
    cfg.input_smoothing = InputSmoothingConfig(kind="ewm", alpha=0.25)
    out = fit(cfg)
    state = out.predictor.normalizer
    assert state["input_smoothing"] == {"kind": "ewm", "alpha": 0.25, "window": 5}
    # the training windows hold the causally smoothed normalised sensors
    plain = {k: v for k, v in state.items() if k != "input_smoothing"}
    w = split_windows(state, out.data.policy, cfg.window)
    w_plain = split_windows(plain, out.data.policy, cfg.window)
    n_sensors = len(state["kept_sensors"])
    assert not np.allclose(w.x[:, :, :n_sensors], w_plain.x[:, :, :n_sensors])
    u = w_plain.unit == w_plain.unit[0]
    raw_last = w_plain.x[u, -1, 0].astype(np.float64)  # first sensor, each reading of unit 0
    expected = pd.Series(raw_last).ewm(alpha=0.25, adjust=False).mean().to_numpy()
    np.testing.assert_allclose(w.x[u, -1, 0], expected, rtol=1e-5, atol=1e-6)
    # scoring a truncated history equals the full trajectory at that reading, also after load
    loaded = check_causal_scoring_and_reload(out, tmp_path)
    assert loaded.normalizer["input_smoothing"]["kind"] == "ewm"
