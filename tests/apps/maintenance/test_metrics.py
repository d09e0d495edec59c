"""Metrics on hand-made numbers: RMSE, PHM08, lead time, false alarms, PH, alpha-lambda."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from apps.maintenance.alarms import AlarmPolicy
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.metrics import (
    alpha_lambda_accuracy,
    cmapss_test_metrics,
    lead_time_metrics,
    phm08_score,
    prognostic_horizon,
    prognostic_metrics,
    rmse,
    trajectory_frame,
    truncated_alarm_metrics,
)
from apps.maintenance.plots import plot_lead_time_histogram, plot_rul_trajectories
from apps.maintenance.windows import WindowSet


def test_rmse_and_phm08_by_hand() -> None:
    pred, true = [10.0, 20.0, 30.0], [12.0, 20.0, 25.0]  # d = -2, 0, +5
    assert rmse(pred, true) == math.sqrt((4 + 0 + 25) / 3)
    assert phm08_score(pred, true) == pytest.approx(
        (math.exp(2 / 13) - 1) + 0.0 + (math.exp(5 / 10) - 1), abs=1e-12
    )
    # late (d > 0) costs more than early by the same amount
    assert phm08_score([15.0], [10.0]) > phm08_score([5.0], [10.0])
    with pytest.raises(MaintenanceDataError):
        rmse([1.0, np.nan], [1.0, 2.0])


def test_cmapss_protocol_reports_capped_and_uncapped() -> None:
    res = cmapss_test_metrics(np.array([120.0, 100.0, 150.0]), np.array([130.0, 100.0, 140.0]))
    # capped truth [125, 100, 125]: d = -5, 0, 25; raw truth: d = -10, 0, 10
    assert res.metrics["rmse_capped"] == math.sqrt((25 + 0 + 625) / 3)
    assert res.metrics["rmse_uncapped"] == math.sqrt((100 + 0 + 100) / 3)
    assert res.metrics["phm08_capped"] == pytest.approx(
        math.exp(5 / 13) - 1 + math.exp(25 / 10) - 1, abs=1e-12
    )
    assert res.metrics["phm08_uncapped"] == pytest.approx(
        math.exp(10 / 13) - 1 + math.exp(10 / 10) - 1, abs=1e-12
    )
    assert res.metrics["n_units"] == 3
    assert "last observed cycle" in res.protocol and "capped at 125" in res.protocol


def _traj(units: dict[str, tuple[list[float], list[float], list[float]]]) -> pd.DataFrame:
    rows = []
    for u, (t, pred, true) in units.items():
        rows += [
            {"unit": u, "time": a, "rul_pred": p, "rul_true": r}
            for a, p, r in zip(t, pred, true, strict=True)
        ]
    return pd.DataFrame(rows)


def _full_runs() -> pd.DataFrame:
    return _traj(
        {
            # fails at t=10; alarm (k=2) first fires at t=3 while true RUL = 7 > 5 (false alarm),
            # again from t=8 (true RUL 2): lead = 10 - 3 = 7
            "A": (
                list(range(1, 11)),
                [20, 3, 3, 20, 20, 20, 4, 4, 2, 1],
                [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
            ),
            # never fires: missed, lead 0
            "B": (list(range(1, 7)), [50] * 6, [5, 4, 3, 2, 1, 0]),
            # fires only at the failure step itself: lead 0, missed
            "C": (list(range(1, 9)), [50] * 6 + [1, 1], [7, 6, 5, 4, 3, 2, 1, 0]),
            # fires from t=4 (true RUL 2): lead 2
            "D": (list(range(1, 7)), [9, 9, 1, 1, 1, 1], [5, 4, 3, 2, 1, 0]),
        }
    )


def test_lead_time_detected_missed_and_false_alarms_by_hand() -> None:
    res = lead_time_metrics(_full_runs(), AlarmPolicy(horizon=5, k=2))
    per = res.tables["per_unit"].set_index("unit")
    assert per["lead_time"].to_dict() == {"A": 7.0, "B": 0.0, "C": 0.0, "D": 2.0}
    assert per["detected"].to_dict() == {"A": True, "B": False, "C": False, "D": True}
    assert per["n_false_alarms"].to_dict() == {"A": 1, "B": 0, "C": 0, "D": 0}
    assert per["n_episodes"].to_dict() == {"A": 2, "B": 0, "C": 1, "D": 1}
    # healthy = true RUL > 5: A has 4 (9, 8, 7, 6), C has 2 (7, 6); exactly 5 is not healthy
    assert per["healthy_steps"].to_dict() == {"A": 4, "B": 0, "C": 2, "D": 0}
    m = res.metrics
    assert m["detection_rate"] == 0.5
    assert m["lead_time_median"] == 1.0  # of [0, 0, 2, 7]: missed failures are kept as 0
    assert m["lead_time_p10"] == 0.0
    assert m["false_alarms_per_1000_healthy"] == 1 / 6 * 1000
    assert m["n_failures"] == 4 and m["n_false_alarms"] == 1 and m["healthy_steps"] == 6
    # percentile over detected-only leads, exact: 2 + 0.1 * (7 - 2)
    only = lead_time_metrics(_full_runs()[lambda f: f["unit"].isin(["A", "D"])], AlarmPolicy(5, 2))
    assert only.metrics["lead_time_p10"] == pytest.approx(2.5, abs=1e-12)


def test_lead_time_uses_the_evaluation_horizon_when_given() -> None:
    # threshold 10 fires A at t=3 (pred 3); with an evaluation horizon of 7, true RUL 7 is not healthy
    res = lead_time_metrics(_full_runs(), AlarmPolicy(horizon=10, k=2), horizon=7)
    per = res.tables["per_unit"].set_index("unit")
    assert per.loc["A", "n_false_alarms"] == 0 and per.loc["A", "healthy_steps"] == 2
    assert per.loc["D", "lead_time"] == 6 - 2  # pred 9 <= 10 from t=1, so k=2 fires at t=2


def test_lead_time_in_hours_for_timestamps() -> None:
    t = pd.date_range("2024-01-01", periods=5, freq="2h")
    traj = pd.DataFrame(
        {"unit": "X", "time": t, "rul_pred": [9, 9, 1, 1, 1], "rul_true": [8.0, 6.0, 4.0, 2.0, 0.0]}
    )
    res = lead_time_metrics(traj, AlarmPolicy(5, 1), time_unit="h")
    assert res.metrics["lead_time_median"] == 4.0  # fires at 04:00, fails at 08:00
    assert "in h" in res.protocol
    in_minutes = traj.assign(rul_true=traj["rul_true"] * 60, rul_pred=traj["rul_pred"] * 60)
    minutes = lead_time_metrics(in_minutes, AlarmPolicy(300, 1), time_unit="m")
    assert minutes.metrics["lead_time_median"] == 240.0


def test_lead_time_refuses_truncated_or_capped_truth() -> None:
    truncated = _traj({"T": ([1, 2, 3], [5, 4, 3], [12, 11, 10])})
    with pytest.raises(MaintenanceDataError, match="unit 'T' is not a full run-to-failure"):
        lead_time_metrics(truncated, AlarmPolicy(5, 1))
    capped = _traj({"K": ([1, 2, 3, 4], [3, 3, 2, 1], [2, 2, 1, 0])})
    with pytest.raises(MaintenanceDataError, match="unit 'K', column 'rul_true'.*uncapped"):
        lead_time_metrics(capped, AlarmPolicy(5, 1))


def test_truncated_units_precision_recall_and_exact_lead() -> None:
    traj = _traj(
        {
            "TP": (
                [1, 2, 3, 4],
                [9, 9, 4, 3],
                [6, 5, 4, 3],
            ),  # alarm at last, true 3 <= 5; fired t=3
            "FP": ([1, 2, 3], [9, 4, 4], [22, 21, 20]),  # alarm at last, true 20 > 5
            "FN": ([1, 2, 3], [1, 9, 9], [4, 3, 2]),  # fired at t=1, stopped; true 2 <= 5
            "TN": ([1, 2], [40, 40], [31, 30]),
        }
    )
    res = truncated_alarm_metrics(traj, AlarmPolicy(horizon=5, k=1))
    m = res.metrics
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1)
    assert m["alarm_precision"] == 0.5 and m["alarm_recall"] == 0.5
    per = res.tables["per_unit"].set_index("unit")
    # exact lead = (t_last + true_last) - t_alarm
    assert per.loc["TP", "lead_time"] == 7 - 3 and per.loc["FN", "lead_time"] == 5 - 1
    assert per.loc["FP", "lead_time"] == 23 - 2 and np.isnan(per.loc["TN", "lead_time"])
    assert m["n_fired_in_window"] == 3 and m["lead_time_median_fired"] == 4.0
    none = truncated_alarm_metrics(traj[traj["unit"] == "TN"], AlarmPolicy(5, 1))
    assert np.isnan(none.metrics["alarm_precision"]) and np.isnan(none.metrics["alarm_recall"])


def test_prognostic_horizon_fixed_band_by_hand() -> None:
    t, true = [10, 20, 30, 40], [40, 30, 20, 10]  # t_EoL = 50, band = 0.2 * 50 = 10
    assert prognostic_horizon(t, [60, 45, 25, 15], true) == 50 - 30  # inside from t=30 on
    assert prognostic_horizon(t, [45, 60, 25, 15], true) == 50 - 30  # entering then leaving resets
    assert prognostic_horizon(t, [45, 35, 25, 15], true) == 50 - 10  # inside throughout
    assert prognostic_horizon(t, [50, 40, 30, 20], true) == 50 - 10  # |d| = 10 exactly: inside
    assert prognostic_horizon(t, [45, 35, 25, 21], true) == 0.0  # last prediction outside
    assert prognostic_horizon(t, [60, 45, 25, 15], true, alpha=0.4) == 50 - 10  # band 20


def test_alpha_lambda_by_hand() -> None:
    t, true = [10, 20, 30, 40], [40, 30, 20, 10]  # t_P = 10, t_EoL = 50, t_0.5 = 30: true 20
    assert alpha_lambda_accuracy(t, [0, 0, 24, 0], true)  # bounds [16, 24], inclusive
    assert alpha_lambda_accuracy(t, [0, 0, 16, 0], true)
    assert not alpha_lambda_accuracy(t, [0, 0, 24.5, 0], true)
    assert not alpha_lambda_accuracy(t, [0, 0, 15.5, 0], true)
    # lambda 0.6: t = 34 -> first prediction at or after it is t = 40 (true 10, bounds [8, 12])
    assert alpha_lambda_accuracy(t, [0, 0, 0, 12], true, lam=0.6)
    assert not alpha_lambda_accuracy(t, [0, 0, 20, 7.9], true, lam=0.6)


def test_prognostic_metrics_fleet() -> None:
    traj = _traj(
        {
            "a": (
                [10, 20, 30, 40],
                [60, 45, 25, 15],
                [40, 30, 20, 10],
            ),  # PH 20, alpha-lambda: 25 > 24 no
            "b": (
                [10, 20, 30, 40],
                [45, 35, 21, 15],
                [40, 30, 20, 10],
            ),  # PH 40, 21 in [16, 24] yes
        }
    )
    res = prognostic_metrics(traj)
    assert res.metrics == {"ph_mean": 30.0, "ph_median": 30.0, "alpha_lambda_accuracy": 0.5}
    assert "fixed alpha-bounds" in res.protocol


def test_trajectory_frame_and_plots_return_figures() -> None:
    ws = WindowSet(
        x=np.zeros((6, 2, 1), np.float32),
        mask=np.zeros((6, 2), bool),
        rul=np.array([2, 1, 0, 2, 1, 0], np.float32),
        unit=np.array([1, 1, 1, 2, 2, 2]),
        time=np.array([1, 2, 3, 1, 2, 3]),
        feature_names=("f",),
    )
    traj = trajectory_frame(ws, [3.0, 1.0, 0.5, 9.0, 9.0, 9.0])
    assert traj.columns.tolist() == ["unit", "time", "rul_pred", "rul_true"]
    with pytest.raises(MaintenanceDataError, match="5 predictions for 6 windows"):
        trajectory_frame(ws, [1.0] * 5)
    fig = plot_rul_trajectories(traj, policy=AlarmPolicy(1.0, 1))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == [
        "true RUL",
        "predicted RUL",
        "threshold 1",
        "alarm (k=1)",
    ]
    assert ax.get_lines()[-1].get_xdata()[0] == 2  # first alarm of unit 1 at t=2
    res = lead_time_metrics(traj, AlarmPolicy(1.0, 1))
    hist = plot_lead_time_histogram(res.tables["per_unit"])
    assert isinstance(hist, Figure) and "1 missed" in hist.axes[0].get_title()
