"""bench.fraud_teachers: the blend-weight rule and the cross-fitting (no data needed)."""

from __future__ import annotations

import numpy as np
import pytest

from apps.fraud.metrics import average_precision
from bench.fraud_teachers import (
    BLEND_GRID,
    blend,
    choose_blend_weight,
    cross_fitted_margins,
    standardised,
    weight_from_folds,
)


def test_blend_weight_is_chosen_on_validation_and_ties_go_to_lightgbm() -> None:
    # frauds 0 and 1: the backbone ranks fraud 0 first, LightGBM fraud 1; each alone puts
    # one legitimate row above its missed fraud, the even blend puts both frauds on top
    y = np.array([1, 1, 0, 0, 0])
    nn = np.array([3.0, 0.0, 1.0, -1.0, -2.0])
    gb = np.array([0.0, 3.0, 1.0, -1.0, -2.0])
    w, per_w = choose_blend_weight(y, nn, gb, average_precision)
    assert per_w[0.0] == pytest.approx(average_precision(y, gb))
    assert per_w[1.0] == pytest.approx(average_precision(y, nn))
    assert per_w[0.5] == pytest.approx(1.0)
    assert per_w[0.0] < 1.0 and per_w[1.0] < 1.0
    assert per_w[0.4] == pytest.approx(1.0)  # 0.4*3 = 1.2 > 1, 0.6*3 = 1.8 > 1: both on top
    assert w == min(g for g in BLEND_GRID if per_w[g] == pytest.approx(1.0))
    assert w == 0.4
    assert np.allclose(blend(nn, gb, 0.25), 0.25 * nn + 0.75 * gb)


def test_identical_models_choose_lightgbm_alone() -> None:
    y = np.array([1, 0, 1, 0])
    s = np.array([2.0, 1.0, 0.5, -1.0])
    w, per_w = choose_blend_weight(y, s, s, average_precision)
    assert w == 0.0 and len(set(per_w.values())) == 1


def test_cross_fitted_margins_never_predict_a_row_from_its_own_chunk() -> None:
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def fit_predict(fit_pos: np.ndarray, pred_pos: np.ndarray) -> np.ndarray:
        seen.append((fit_pos, pred_pos))
        return np.full(len(pred_pos), float(fit_pos.sum()))

    n = 11
    out = cross_fitted_margins(fit_predict, n, 3)
    assert len(seen) == 3
    predicted = np.concatenate([p for _, p in seen])
    assert np.array_equal(np.sort(predicted), np.arange(n))  # every row once
    for fit_pos, pred_pos in seen:
        assert not set(fit_pos) & set(pred_pos)
        assert len(fit_pos) + len(pred_pos) == n
        assert np.array_equal(pred_pos, np.arange(pred_pos[0], pred_pos[-1] + 1))  # contiguous
        assert np.all(out[pred_pos] == fit_pos.sum())
    with pytest.raises(ValueError, match="folds=1"):
        cross_fitted_margins(fit_predict, n, 1)
    with pytest.raises(ValueError, match="folds=12"):
        cross_fitted_margins(fit_predict, n, 12)


def test_standardised_uses_the_reference_statistics() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    z = standardised(ref, ref)
    assert z.mean() == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    assert standardised(np.array([2.5 + ref.std()]), ref)[0] == pytest.approx(1.0)
    assert np.all(standardised(np.array([5.0, 7.0]), np.ones(3)) == [4.0, 6.0])  # sd 0: shift only


def test_fold_weight_is_the_best_mean_over_folds() -> None:
    grid = [f"{w:.1f}" for w in BLEND_GRID]
    a = dict.fromkeys(grid, 0.5) | {"0.3": 0.9, "0.8": 0.6}
    b = dict.fromkeys(grid, 0.5) | {"0.3": 0.5, "0.8": 0.9}  # 0.8: mean 0.75 > 0.3's 0.70
    w, mean = weight_from_folds([a, b])
    assert w == 0.8 and mean[0.8] == pytest.approx(0.75) and mean[0.3] == pytest.approx(0.7)
    w, _ = weight_from_folds([dict.fromkeys(grid, 0.5)])  # all tied: LightGBM alone
    assert w == 0.0
    with pytest.raises(ValueError, match="no folds"):
        weight_from_folds([])
