"""Alarm policy k-consecutive logic and budgeted selection on validation units."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.alarms import AlarmPolicy, AlarmPolicySelector
from apps.maintenance.errors import AlarmBudgetError, MaintenanceDataError


def test_k_consecutive_firing() -> None:
    pred = np.array([1, 9, 1, 1, 9, 1, 1, 1], dtype=float)  # <= 5 at steps 0, 2, 3, 5, 6, 7
    below = (pred <= 5).tolist()
    assert AlarmPolicy(5, 1).firing(pred).tolist() == below
    assert AlarmPolicy(5, 2).firing(pred).tolist() == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
        True,
    ]
    assert AlarmPolicy(5, 3).firing(pred).tolist() == [False] * 7 + [True]
    assert AlarmPolicy(5, 4).firing(pred).tolist() == [False] * 8
    assert AlarmPolicy(5, 2).first_alarm(pred) == 3
    assert AlarmPolicy(5, 4).first_alarm(pred) is None
    assert AlarmPolicy(5, 1).firing(np.array([5.0, 5.0001])).tolist() == [
        True,
        False,
    ]  # <= is inclusive
    # a run shorter than k at the start of the unit cannot fire
    assert AlarmPolicy(5, 3).firing(np.array([1.0, 1.0])).tolist() == [False, False]


def test_policy_validation() -> None:
    with pytest.raises(MaintenanceDataError, match="k=0"):
        AlarmPolicy(5, 0)
    with pytest.raises(MaintenanceDataError, match="horizon=-1"):
        AlarmPolicy(-1, 1)
    with pytest.raises(MaintenanceDataError, match="prediction at step 1 is nan"):
        AlarmPolicy(5, 1).firing(np.array([1.0, np.nan]))


def _validation() -> pd.DataFrame:
    # one run to failure at t=10; a noisy early dip at t=3 (true RUL 7)
    t = np.arange(1, 11)
    return pd.DataFrame(
        {
            "unit": "v1",
            "time": t,
            "rul_pred": [20, 20, 8, 20, 20, 20, 4, 3, 2, 1],
            "rul_true": 10 - t,
        }
    )


def test_selector_respects_budget_and_prefers_useful_lead() -> None:
    val = _validation()
    # candidates at eval horizon 5: (10,1) fires at t=3 -> lead 7 but a false alarm (true 7 > 5);
    # (10,2) first fires t=8 (lead 2); (5,1) t=7 (lead 3); (5,2) t=8 (lead 2)
    strict = AlarmPolicySelector(
        eval_horizon=5,
        false_alarm_budget=0.0,
        horizons=[5, 10],
        ks=[1, 2],
        false_alarm_estimate="observed",
    ).fit(val)
    assert strict.best_policy_ == AlarmPolicy(5.0, 1)
    assert strict.best_metrics_["lead_time_median"] == 3.0
    grid = strict.grid_.set_index(["horizon", "k"])
    assert grid.loc[(10.0, 1), "false_alarms_per_1000_healthy"] == 1 / 4 * 1000  # 4 healthy steps
    assert not grid.loc[(10.0, 1), "feasible"] and grid.loc[(5.0, 1), "feasible"]
    loose = AlarmPolicySelector(
        eval_horizon=5,
        false_alarm_budget=300.0,
        horizons=[5, 10],
        ks=[1, 2],
        false_alarm_estimate="observed",
    ).fit(val)
    assert loose.best_policy_ == AlarmPolicy(10.0, 1)  # useful lead min(7, 5) = 5 beats 3


def test_selector_plus_one_estimate_keeps_a_margin_below_the_budget() -> None:
    # same budget as `loose` above: (10,1) observes 1 false alarm in 4 healthy steps (250 <= 300)
    # but its plus-one estimate is 2/4*1000 = 500 > 300; zero-alarm candidates estimate 250
    sel = AlarmPolicySelector(
        eval_horizon=5, false_alarm_budget=300.0, horizons=[5, 10], ks=[1, 2]
    ).fit(_validation())
    grid = sel.grid_.set_index(["horizon", "k"])
    assert grid.loc[(10.0, 1), "fa_estimate_per_1000"] == 500.0
    assert grid.loc[(5.0, 1), "fa_estimate_per_1000"] == 250.0
    assert not grid.loc[(10.0, 1), "feasible"]
    assert sel.best_policy_ == AlarmPolicy(5.0, 1)
    with pytest.raises(MaintenanceDataError, match="false_alarm_estimate"):
        AlarmPolicySelector(eval_horizon=5, false_alarm_budget=1.0, false_alarm_estimate="x").fit(
            _validation()
        )


def test_selector_lead_target_prefers_the_latest_warning_that_meets_it() -> None:
    # no false alarms for (5,1) lead 3, (5,2) lead 2, (10,2) lead 2 (eval horizon 5, budget loose)
    kw = dict(eval_horizon=5, false_alarm_budget=300.0, horizons=[5, 10], ks=[1, 2])
    sel = AlarmPolicySelector(**kw, lead_target=2.0).fit(_validation())
    assert sel.best_metrics_["useful_lead_median"] == 2.0
    assert sel.best_policy_ == AlarmPolicy(5.0, 2)  # latest, then larger k, then lower threshold
    sel3 = AlarmPolicySelector(**kw, lead_target=3.0).fit(_validation())
    assert sel3.best_policy_ == AlarmPolicy(5.0, 1)
    # unreachable target: the default ranking (most useful lead among feasible)
    sel9 = AlarmPolicySelector(**kw, lead_target=9.0).fit(_validation())
    assert sel9.best_policy_ == AlarmPolicy(5.0, 1)


def test_selector_raises_when_budget_unreachable_and_refuses_truncated_units() -> None:
    with pytest.raises(AlarmBudgetError, match="lowest reached is 250"):
        AlarmPolicySelector(
            eval_horizon=5,
            false_alarm_budget=0.0,
            horizons=[10],
            ks=[1],
            false_alarm_estimate="observed",
        ).fit(_validation())
    truncated = _validation().iloc[:6]  # ends with true RUL 4: a cut-off (test-like) unit
    with pytest.raises(MaintenanceDataError, match="not a full run-to-failure"):
        AlarmPolicySelector(eval_horizon=5, false_alarm_budget=10.0).fit(truncated)


def test_selector_default_grid_and_sklearn_params() -> None:
    sel = AlarmPolicySelector(eval_horizon=4, false_alarm_budget=1000.0)
    assert set(sel.get_params()) == {
        "eval_horizon",
        "false_alarm_budget",
        "horizons",
        "ks",
        "time_unit",
        "final_rul_tol",
        "false_alarm_estimate",
        "lead_target",
    }
    sel.fit(_validation())
    assert sorted(sel.grid_["horizon"].unique().tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0, 8.0]
    assert len(sel.grid_) == 6 * 4
