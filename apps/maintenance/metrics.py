"""RUL and alarm metrics, each following a stated protocol.

Trajectory frames (per unit, per step) have columns ``unit``, ``time``, ``rul_pred``,
``rul_true`` (renamable through keyword arguments). ``rul_true`` must be the *uncapped* true
RUL: the alarm, lead-time and prognostic metrics derive each unit's failure time as
``t + rul_true`` and check that it is the same at every step (a capped truth fails that check
with a clear error instead of silently moving failures). Times are cycles (numbers, used as
given) or timestamps (converted to elapsed ``time_unit`` since the unit's first reading, so
durations such as lead times are in hours by default).

References:
* PHM08 score: A. Saxena, K. Goebel, D. Simon, N. Eklund, "Damage propagation modeling for
  aircraft engine run-to-failure simulation", PHM 2008.
* Prognostic horizon, alpha-lambda accuracy: A. Saxena, J. Celaya, B. Saha, S. Saha,
  K. Goebel, "Metrics for offline evaluation of prognostic performance", International Journal
  of Prognostics and Health Management 1(1), 2010 (and Saxena et al., "Metrics for evaluating
  performance of prognostic techniques", PHM 2008).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from apps.maintenance.errors import MaintenanceDataError, show
from apps.maintenance.preprocess import RUL_CAP
from core.spec import EvalResult

if TYPE_CHECKING:
    from apps.maintenance.alarms import AlarmPolicy
    from apps.maintenance.windows import WindowSet

_REL_TOL = 1e-9  # inclusive bounds tolerate float rounding of alpha * value


# ------------------------------------------------------------------ point metrics
def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Root mean squared error ``sqrt(mean((pred - true)^2))``."""
    d = _diff(pred, true)
    return float(np.sqrt(np.mean(d**2)))


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    """PHM08 challenge score (Saxena et al. 2008): with ``d = pred - true``,
    ``sum(exp(-d/13) - 1 for d < 0) + sum(exp(d/10) - 1 for d >= 0)``. Lower is better; late
    predictions (d > 0, over-estimated life) are penalised more than early ones. A *sum* over
    units, so it grows with the number of test units."""
    d = _diff(pred, true)
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


def _diff(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape or p.size == 0:
        raise MaintenanceDataError(
            f"pred has {p.size} values and true {t.size}; expected the same, > 0"
        )
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise MaintenanceDataError(
            "pred and true must be finite (a NaN prediction is not a prediction)"
        )
    return p - t


def cmapss_test_metrics(
    pred_last: np.ndarray, true_rul: np.ndarray, cap: float = RUL_CAP
) -> EvalResult:
    """C-MAPSS test protocol: exactly one prediction per test unit, made at its last observed
    cycle, against the true RUL from ``RUL_FDxxx``. Reports RMSE and the PHM08 score twice:
    with the truth capped at ``min(true, cap)`` (``*_capped``, what most papers report) and
    with the raw truth (``*_uncapped``). Predictions are used as given (never clipped)."""
    pred = np.asarray(pred_last, dtype=np.float64)
    true = np.asarray(true_rul, dtype=np.float64)
    capped = np.minimum(true, cap)
    c = int(cap) if float(cap).is_integer() else cap
    metrics = {
        "rmse_capped": rmse(pred, capped),
        "phm08_capped": phm08_score(pred, capped),
        "rmse_uncapped": rmse(pred, true),
        "phm08_uncapped": phm08_score(pred, true),
        "n_units": float(len(pred)),
    }
    protocol = (
        f"C-MAPSS test: one prediction per test unit at its last observed cycle (n={len(pred)}); "
        f"d = pred - true; RMSE and PHM08 score = sum(exp(-d/13)-1 if d<0 else exp(d/10)-1); "
        f"*_capped: truth capped at {c} cycles; *_uncapped: raw NASA truth; predictions not clipped"
    )
    return EvalResult(metrics=metrics, protocol=protocol)


# ----------------------------------------------------------------- trajectories
def trajectory_frame(
    windows: WindowSet, pred: np.ndarray, true: np.ndarray | None = None
) -> pd.DataFrame:
    """Per-step frame for the trajectory metrics from windows and their predictions.

    ``true`` defaults to ``windows.rul``; build the windows with the *uncapped* RUL as target
    (or pass it here) for alarm and prognostic metrics."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    if len(pred) != len(windows):
        raise MaintenanceDataError(f"{len(pred)} predictions for {len(windows)} windows")
    return pd.DataFrame(
        {
            "unit": windows.unit,
            "time": windows.time,
            "rul_pred": pred,
            "rul_true": windows.rul.astype(np.float64)
            if true is None
            else np.asarray(true, np.float64),
        }
    )


@dataclass
class _Unit:
    unit: object
    t: np.ndarray  # float times (cycles as given, or elapsed time_unit since the first reading)
    pred: np.ndarray
    true: np.ndarray
    failure_time: float
    t0_time: object  # the unit's first time as given (for reporting timestamps)


def _units(
    traj: pd.DataFrame,
    time_unit: str,
    unit: str = "unit",
    time: str = "time",
    pred: str = "rul_pred",
    true: str = "rul_true",
) -> Iterator[_Unit]:
    missing = [c for c in (unit, time, pred, true) if c not in traj.columns]
    if missing:
        raise MaintenanceDataError(f"trajectory frame: missing column(s) {missing}")
    if len(traj) == 0:
        raise MaintenanceDataError("trajectory frame has no rows")
    for u, g in traj.groupby(unit, sort=True):
        g = g.sort_values(time, kind="stable")
        tt = g[time]
        if pd.api.types.is_datetime64_any_dtype(tt):
            t = ((tt - tt.iloc[0]) / np.timedelta64(1, time_unit)).to_numpy(np.float64)
        else:
            t = tt.to_numpy(np.float64)
        if (np.diff(t) <= 0).any():
            raise MaintenanceDataError(
                f"trajectory of unit {show(u)}: repeated time {tt.iloc[int(np.argmax(np.diff(t) <= 0))]}"
            )
        p = g[pred].to_numpy(np.float64)
        r = g[true].to_numpy(np.float64)
        for name, v in ((pred, p), (true, r)):
            if not np.isfinite(v).all():
                i = int(np.argmax(~np.isfinite(v)))
                raise MaintenanceDataError(
                    f"trajectory of unit {show(u)}, column {name!r}, time {tt.iloc[i]}: {v[i]}"
                )
        fail = t + r
        if np.abs(fail - fail[-1]).max() > 1e-6 * max(1.0, abs(fail[-1])):
            i = int(np.argmax(np.abs(fail - fail[-1])))
            raise MaintenanceDataError(
                f"trajectory of unit {show(u)}, column {true!r}: time + true RUL is {fail[i]:g} at time "
                f"{tt.iloc[i]} but {fail[-1]:g} at the last step; the true RUL must fall one-for-one "
                "with time (pass the uncapped RUL)"
            )
        yield _Unit(u, t, p, r, float(fail[-1]), tt.iloc[0])


def _episode_starts(fire: np.ndarray) -> np.ndarray:
    """Steps where a maximal run of consecutive firing steps begins."""
    return fire & ~np.r_[False, fire[:-1]]


# ---------------------------------------------------------------- alarm metrics
def lead_time_metrics(
    traj: pd.DataFrame,
    policy: AlarmPolicy,
    horizon: float | None = None,
    time_unit: str = "h",
    final_rul_tol: float = 0.0,
    **columns: str,
) -> EvalResult:
    """Lead time of an alarm policy on held-out *full run-to-failure* units.

    Protocol, per unit (steps in time order): the failure time is ``t_last + rul_true_last``;
    the unit must have run to failure (``rul_true_last <= final_rul_tol``, else an error: use
    :func:`truncated_alarm_metrics`). The alarm time ``t_a`` is the first step at which the
    policy fires; lead time = failure time - ``t_a``. A failure is *detected* when the policy
    fires strictly before it (lead > 0); a missed failure counts as lead time 0 and is never
    dropped. Fleet: ``detection_rate`` = detected / units; ``lead_time_median`` and
    ``lead_time_p10`` over all units, zeros included (numpy linear-interpolation percentiles).
    False alarms: an *episode* is a maximal run of consecutive firing steps; it is false when it
    starts at a step whose true RUL is above ``horizon`` (default ``policy.horizon``).
    ``false_alarms_per_1000_healthy`` = false episodes / (steps with true RUL > horizon) * 1000
    (NaN when there are no healthy steps). Lead times are in cycles, or in ``time_unit`` for
    timestamps. ``tables['per_unit']`` holds every unit's numbers (its ``alarm_time`` and
    ``failure_time`` are cycles, or elapsed ``time_unit`` since the unit's first reading).
    """
    h = float(policy.horizon if horizon is None else horizon)
    rows = []
    for u in _units(traj, time_unit, **columns):
        if u.true[-1] > final_rul_tol:
            raise MaintenanceDataError(
                f"unit {show(u.unit)} is not a full run-to-failure trajectory (true RUL {u.true[-1]:g} at its "
                f"last step > final_rul_tol={final_rul_tol}); use truncated_alarm_metrics for truncated units"
            )
        fire = policy.firing(u.pred)
        first = int(np.argmax(fire)) if fire.any() else None
        alarm_time = u.t[first] if first is not None else np.nan
        lead = u.failure_time - alarm_time if first is not None else 0.0
        detected = first is not None and lead > 0
        starts = _episode_starts(fire)
        healthy = u.true > h
        rows.append(
            {
                "unit": u.unit,
                "failure_time": u.failure_time,
                "alarm_time": alarm_time,
                "lead_time": float(lead) if detected else 0.0,
                "detected": detected,
                "n_episodes": int(starts.sum()),
                "n_false_alarms": int((starts & healthy).sum()),
                "healthy_steps": int(healthy.sum()),
            }
        )
    table = pd.DataFrame(rows)
    leads = table["lead_time"].to_numpy(np.float64)
    healthy_total = int(table["healthy_steps"].sum())
    n_false = int(table["n_false_alarms"].sum())
    metrics = {
        "detection_rate": float(table["detected"].mean()),
        "lead_time_median": float(np.median(leads)),
        "lead_time_p10": float(np.percentile(leads, 10)),
        "false_alarms_per_1000_healthy": n_false / healthy_total * 1000.0
        if healthy_total
        else float("nan"),
        "n_failures": float(len(table)),
        "n_detected": float(table["detected"].sum()),
        "n_false_alarms": float(n_false),
        "healthy_steps": float(healthy_total),
    }
    unit_name = "cycles" if not _is_timestamp(traj, columns) else time_unit
    protocol = (
        f"lead time on full run-to-failure units; policy: predicted RUL <= {policy.horizon:g} for "
        f"{policy.k} consecutive steps; lead = failure time - first alarm, in {unit_name}; missed "
        f"failures count as 0; false alarm = alarm episode starting while true RUL > {h:g}, per 1000 "
        "healthy steps"
    )
    return EvalResult(metrics=metrics, protocol=protocol, tables={"per_unit": table})


def truncated_alarm_metrics(
    traj: pd.DataFrame,
    policy: AlarmPolicy,
    horizon: float | None = None,
    time_unit: str = "h",
    **columns: str,
) -> EvalResult:
    """Alarms on truncated units (C-MAPSS test: observed until some time before failure).

    Protocol: at each unit's last observed step, the alarm state (does the policy fire at that
    step) is compared with the truth ``rul_true_last <= horizon`` (default ``policy.horizon``):
    ``alarm_precision`` = TP / (TP + FP), ``alarm_recall`` = TP / (TP + FN), NaN when the
    denominator is 0. For units whose alarm fired inside the observed window, the exact lead
    time is known (the failure time ``t_last + rul_true_last`` comes from the RUL truth):
    ``lead_time_median_fired`` over those units (NaN if none); units whose alarm did not fire
    in the window have no lead time yet and are not scored on it.
    """
    h = float(policy.horizon if horizon is None else horizon)
    rows = []
    for u in _units(traj, time_unit, **columns):
        fire = policy.firing(u.pred)
        first = int(np.argmax(fire)) if fire.any() else None
        starts = _episode_starts(fire)
        rows.append(
            {
                "unit": u.unit,
                "rul_true_last": float(u.true[-1]),
                "alarm_at_last": bool(fire[-1]),
                "positive": bool(u.true[-1] <= h),
                "fired_in_window": first is not None,
                "alarm_time": u.t[first] if first is not None else np.nan,
                "lead_time": u.failure_time - u.t[first] if first is not None else np.nan,
                "n_false_alarms": int((starts & (u.true > h)).sum()),
            }
        )
    table = pd.DataFrame(rows)
    a, p = table["alarm_at_last"].to_numpy(), table["positive"].to_numpy()
    tp, fp, fn, tn = (
        int((a & p).sum()),
        int((a & ~p).sum()),
        int((~a & p).sum()),
        int((~a & ~p).sum()),
    )
    fired = table["lead_time"].dropna().to_numpy()
    metrics = {
        "alarm_precision": tp / (tp + fp) if tp + fp else float("nan"),
        "alarm_recall": tp / (tp + fn) if tp + fn else float("nan"),
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "tn": float(tn),
        "n_units": float(len(table)),
        "n_fired_in_window": float(len(fired)),
        "lead_time_median_fired": float(np.median(fired)) if len(fired) else float("nan"),
    }
    protocol = (
        f"truncated units: alarm state at the last observed step (predicted RUL <= {policy.horizon:g} "
        f"for {policy.k} consecutive steps) vs true RUL <= {h:g}; precision/recall over units; exact "
        "lead times only for units whose alarm fired inside the observed window"
    )
    return EvalResult(metrics=metrics, protocol=protocol, tables={"per_unit": table})


def _is_timestamp(traj: pd.DataFrame, columns: dict[str, str]) -> bool:
    return pd.api.types.is_datetime64_any_dtype(traj[columns.get("time", "time")])


# ------------------------------------------------------------ prognostic metrics
def prognostic_horizon(
    t: np.ndarray, pred: np.ndarray, true: np.ndarray, alpha: float = 0.2
) -> float:
    """Prognostic horizon (Saxena et al. 2010) of one unit, fixed-band variant.

    ``t_EoL = t_last + true_last`` (times as given: C-MAPSS cycles count from 1, so t_EoL is the
    life length in cycles). The alpha-bounds are the *fixed band* ``true(t) +- alpha * t_EoL``
    (not a fraction of the current RUL). ``i`` is the first step from which *every* later
    prediction stays inside the band (bounds inclusive); PH = ``t_EoL - t_i``. When the last
    prediction is outside the band PH = 0 (no useful horizon).
    """
    t, pred, true = (np.asarray(a, dtype=np.float64) for a in (t, pred, true))
    t_eol = t[-1] + true[-1]
    band = alpha * t_eol
    inside = np.abs(pred - true) <= band * (1 + _REL_TOL)
    if not inside[-1]:
        return 0.0
    outside = np.flatnonzero(~inside)
    i = int(outside[-1]) + 1 if len(outside) else 0
    return float(t_eol - t[i])


def alpha_lambda_accuracy(
    t: np.ndarray, pred: np.ndarray, true: np.ndarray, alpha: float = 0.2, lam: float = 0.5
) -> bool:
    """Alpha-lambda accuracy (Saxena et al. 2010) of one unit.

    ``t_P`` = the first prediction's time, ``t_EoL = t_last + true_last``,
    ``t_lambda = t_P + lam * (t_EoL - t_P)``. At the first step with ``t >= t_lambda`` the
    prediction must lie in ``[(1 - alpha) * true, (1 + alpha) * true]`` (inclusive, true RUL at
    that same step). Raises when no prediction is made at or after ``t_lambda``.
    """
    t, pred, true = (np.asarray(a, dtype=np.float64) for a in (t, pred, true))
    t_p, t_eol = t[0], t[-1] + true[-1]
    t_lam = t_p + lam * (t_eol - t_p)
    after = np.flatnonzero(t >= t_lam - _REL_TOL * max(1.0, abs(t_lam)))
    if len(after) == 0:
        raise MaintenanceDataError(
            f"alpha_lambda_accuracy: no prediction at or after t_lambda={t_lam:g}"
        )
    j = int(after[0])
    slack = _REL_TOL * max(1.0, abs(true[j]))
    return bool((1 - alpha) * true[j] - slack <= pred[j] <= (1 + alpha) * true[j] + slack)


def prognostic_metrics(
    traj: pd.DataFrame,
    alpha_ph: float = 0.2,
    alpha: float = 0.2,
    lam: float = 0.5,
    time_unit: str = "h",
    **columns: str,
) -> EvalResult:
    """Fleet summary of :func:`prognostic_horizon` (fixed band ``alpha_ph * t_EoL``) and
    :func:`alpha_lambda_accuracy` (``alpha``, ``lam``) over units with full trajectories.
    ``ph_mean``/``ph_median`` are in cycles (or ``time_unit``); ``alpha_lambda_accuracy`` is the
    fraction of units that are alpha-lambda accurate."""
    rows = []
    for u in _units(traj, time_unit, **columns):
        rows.append(
            {
                "unit": u.unit,
                "eol": u.failure_time,
                "ph": prognostic_horizon(u.t, u.pred, u.true, alpha_ph),
                "alpha_lambda_ok": alpha_lambda_accuracy(u.t, u.pred, u.true, alpha, lam),
            }
        )
    table = pd.DataFrame(rows)
    metrics = {
        "ph_mean": float(table["ph"].mean()),
        "ph_median": float(table["ph"].median()),
        "alpha_lambda_accuracy": float(table["alpha_lambda_ok"].mean()),
    }
    protocol = (
        f"Saxena et al. 2010: PH with fixed alpha-bounds true +- {alpha_ph:g} * t_EoL, all later "
        f"predictions inside; alpha-lambda accuracy with alpha={alpha:g}, lambda={lam:g} "
        "(t_lambda = t_P + lambda (t_EoL - t_P), prediction within (1 +- alpha) * true RUL)"
    )
    return EvalResult(metrics=metrics, protocol=protocol, tables={"per_unit": table})
