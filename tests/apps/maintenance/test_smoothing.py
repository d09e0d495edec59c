"""Causal RUL smoothing: exact values, no future readings, unit boundaries, and the predictor
and the C-MAPSS evaluation reading the model through it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.model import RULModel
from apps.maintenance.predictor import MaintenancePredictor, causal_smooth_rul, elapsed_in
from apps.maintenance.training import input_example
from tests.apps.maintenance.conftest import tiny_config


def test_exact_values_and_unit_boundaries():
    rul = np.array([100.0, 98.0, 99.0, 95.0, 50.0, 47.0])
    unit = np.array([1, 1, 1, 1, 2, 2])
    t = np.array([1, 2, 3, 4, 1, 2])
    got = causal_smooth_rul(rul, unit, t, n_last=3)
    expected = [
        100.0,  # only itself
        (98.0 + (100.0 - 1)) / 2,
        (99.0 + (98.0 - 1) + (100.0 - 2)) / 3,
        (95.0 + (99.0 - 1) + (98.0 - 2)) / 3,
        50.0,  # unit 2 starts fresh: unit 1's readings never enter
        (47.0 + (50.0 - 1)) / 2,
    ]
    np.testing.assert_allclose(got, expected)
    np.testing.assert_array_equal(causal_smooth_rul(rul, unit, t, n_last=1), rul)


def test_a_perfect_linear_trajectory_is_unchanged_and_noise_shrinks():
    t = np.arange(1, 201, dtype=float)
    truth = 250.0 - t
    unit = np.zeros(len(t), dtype=int)
    np.testing.assert_allclose(causal_smooth_rul(truth, unit, t, 10), truth)
    noisy = truth + np.random.default_rng(0).normal(0.0, 8.0, len(t))
    err_raw = np.sqrt(np.mean((noisy[20:] - truth[20:]) ** 2))
    err_smooth = np.sqrt(np.mean((causal_smooth_rul(noisy, unit, t, 10)[20:] - truth[20:]) ** 2))
    assert err_smooth < 0.5 * err_raw  # averaging 10 independent errors: about 1/sqrt(10)


def test_uses_no_future_reading():
    rng = np.random.default_rng(1)
    rul = rng.uniform(0, 125, 40)
    unit = np.repeat([7, 8], 20)
    t = np.tile(np.arange(20), 2).astype(float)
    base = causal_smooth_rul(rul, unit, t, 5, cap=125.0)
    for i in (0, 3, 19, 25):
        changed = rul.copy()
        changed[i + 1 :] += 1000.0  # every later reading, of this unit and the next
        np.testing.assert_array_equal(
            causal_smooth_rul(changed, unit, t, 5, 125.0)[: i + 1], base[: i + 1]
        )


def test_elapsed_time_not_reading_count_and_clipping():
    # readings 2 h apart: the earlier estimate is moved forward by 2 h, not by 1
    times = pd.to_datetime(["2024-01-01 00:00", "2024-01-01 02:00"]).to_numpy()
    got = causal_smooth_rul(np.array([10.0, 9.0]), np.array([0, 0]), elapsed_in(times, "h"), 2)
    np.testing.assert_allclose(got, [10.0, (9.0 + 8.0) / 2])
    clipped = causal_smooth_rul(
        np.array([1.0, 0.5]), np.array([0, 0]), np.array([0.0, 5.0]), 2, 125.0
    )
    assert clipped[1] == 0.0  # (0.5 + (1 - 5)) / 2 < 0 -> 0
    with pytest.raises(MaintenanceDataError, match="rul_smoothing"):
        causal_smooth_rul(np.ones(3), np.zeros(3), np.arange(3.0), 0)


def test_predictor_applies_smoothing_causally_and_keeps_it_on_save(tiny_fit, tmp_path):
    _, out = tiny_fit
    p0 = out.predictor
    p5 = MaintenancePredictor(p0.model, p0.normalizer, p0.schema, p0.policy, p0.time_unit, 5)
    frame = input_example(out.data, n_units=2, max_rows=50)
    raw = p0.predict_trajectory(frame)
    smooth = p5.predict_trajectory(frame)
    a = frame["asset_id"].iloc[0]
    r, s = raw[raw["asset_id"] == a], smooth[smooth["asset_id"] == a]
    exp = causal_smooth_rul(
        r["rul"].to_numpy(), r["asset_id"].to_numpy(), elapsed_in(r["timestamp"].to_numpy(), "h"), 5,
        p0.model.rul_cap,
    )  # fmt: skip
    np.testing.assert_allclose(s["rul"].to_numpy(), exp, rtol=1e-6)
    assert not np.allclose(s["rul"].to_numpy(), r["rul"].to_numpy())  # smoothing did something
    # scoring a prefix of the history gives the same RUL as the full trajectory at that reading
    one = frame[frame["asset_id"] == a]
    cut = one.iloc[:-7]
    np.testing.assert_allclose(
        p5.predict(cut)["rul"].iloc[0], s["rul"].iloc[len(cut) - 1], rtol=1e-5
    )
    p5.save(tmp_path)
    loaded = MaintenancePredictor.load(tmp_path)
    assert loaded.rul_smoothing == 5
    pd.testing.assert_frame_equal(loaded.predict(frame), p5.predict(frame))


def test_input_noise_only_in_training_mode():
    cfg = tiny_config()
    m = RULModel(cfg.model, cfg.optim, n_channels=3, window=12, patch_len=4, input_noise=0.5)
    ref = RULModel(cfg.model, cfg.optim, n_channels=3, window=12, patch_len=4)
    ref.load_state_dict(m.state_dict())
    batch = {"x": torch.randn(4, 12, 3), "mask": torch.zeros(4, 12, dtype=torch.bool)}
    m.eval(), ref.eval()
    torch.testing.assert_close(m(batch), ref(batch))  # no noise when predicting
    m.train()
    torch.manual_seed(0)
    a = m.tokens(batch)[0]
    b = m.tokens(batch)[0]
    assert not torch.allclose(a, b)  # fresh noise per call while training


def test_evaluation_scores_test_units_with_the_predictors_smoothed_rul(tiny_fit):
    from apps.maintenance.training import evaluate_prepared

    cfg, out = tiny_fit
    p0 = out.predictor
    p4 = MaintenancePredictor(p0.model, p0.normalizer, p0.schema, p0.policy, p0.time_unit, 4)
    last = evaluate_prepared(p4, out.data, cfg, figures=False).tables["test_last_cycle"]
    raw = evaluate_prepared(p0, out.data, cfg, figures=False).tables["test_last_cycle"]
    # what the benchmark scores is what scoring the same truncated histories returns
    frame = input_example(out.data, n_units=out.data.test["unit"].nunique(), max_rows=10**6)
    scored = p4.predict(frame).set_index("asset_id")["rul"]
    np.testing.assert_allclose(last["rul_pred"].to_numpy(), scored.loc[last["unit"]], rtol=1e-5)
    assert not np.allclose(last["rul_pred"], raw["rul_pred"])
    np.testing.assert_array_equal(last["rul_true"], raw["rul_true"])


def test_epoch_choice_on_readings_near_failure():
    from apps.maintenance.training import fit, split_windows

    cfg = tiny_config(max_epochs=3)
    cfg.val_max_rul = 48.0  # hours, on the demo fleet
    out = fit(cfg)
    assert out.best_epoch == int(np.argmin(out.val_rmse_history))
    w = split_windows(out.predictor, out.data.policy, cfg.window)
    pred, _ = out.predictor.model.predict_windows(w.x, w.mask)
    near = w.rul <= 48.0
    assert 0 < near.sum() < len(near)
    expected = float(np.sqrt(np.mean((pred[near] - np.minimum(w.rul[near], cfg.rul_cap)) ** 2)))
    assert min(out.val_rmse_history) == pytest.approx(expected, rel=1e-4)
    assert out.val_rmse_by_smoothing[1] == pytest.approx(expected, rel=1e-6)
    everything = float(np.sqrt(np.mean((pred - np.minimum(w.rul, cfg.rul_cap)) ** 2)))
    assert abs(everything - expected) > 1e-3  # a different number from the every-reading RMSE


def test_new_recipe_options_are_checked():
    with pytest.raises(MaintenanceDataError, match="rul_smoothing"):
        tiny_config().__class__(rul_smoothing=0)
    with pytest.raises(MaintenanceDataError, match="input_noise"):
        tiny_config().__class__(input_noise=-0.1)
    with pytest.raises(MaintenanceDataError, match="val_max_rul"):
        tiny_config().__class__(val_max_rul=0.0)
