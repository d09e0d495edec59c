"""Alarm policies on predicted RUL, and their selection on validation units.

A policy turns a unit's sequence of RUL predictions into an alarm state per step: it fires at
step t when the predicted RUL has been ``<= horizon`` at each of the last ``k`` consecutive
steps t-k+1..t (fewer than k steps so far: it cannot fire). Requiring k in a row trades a
little lead time for robustness to single noisy predictions.

The policy's ``horizon`` (the threshold on *predicted* RUL) is a tuning knob. What counts as a
correct alarm is fixed separately by the *evaluation* horizon (``eval_horizon``: the operator's
requirement "warn me when failure is within H"), so searching the threshold cannot make alarms
look right by moving the definition of "healthy".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from apps.maintenance.errors import AlarmBudgetError, MaintenanceDataError


@dataclass(frozen=True)
class AlarmPolicy:
    """Fire when predicted RUL <= ``horizon`` for ``k`` consecutive steps (see module docstring)."""

    horizon: float
    k: int = 1

    def __post_init__(self) -> None:
        if not np.isfinite(self.horizon) or self.horizon < 0:
            raise MaintenanceDataError(
                f"AlarmPolicy.horizon={self.horizon}: expected a finite value >= 0"
            )
        if int(self.k) != self.k or self.k < 1:
            raise MaintenanceDataError(f"AlarmPolicy.k={self.k}: expected an integer >= 1")

    def firing(self, pred_T: np.ndarray) -> np.ndarray:
        """Alarm state at each step of one unit's predictions (in time order)."""
        pred_T = np.asarray(pred_T, dtype=np.float64)
        if not np.isfinite(pred_T).all():
            i = int(np.argmax(~np.isfinite(pred_T)))
            raise MaintenanceDataError(f"AlarmPolicy.firing: prediction at step {i} is {pred_T[i]}")
        below = pred_T <= self.horizon
        idx = np.arange(len(pred_T))
        last_above = np.maximum.accumulate(np.where(below, -1, idx))  # last step not below
        run_length = idx - last_above  # consecutive below-threshold steps ending here
        return run_length >= self.k

    def first_alarm(self, pred_T: np.ndarray) -> int | None:
        """Index of the first step at which the policy fires, or None."""
        fire = self.firing(pred_T)
        return int(np.argmax(fire)) if fire.any() else None


class AlarmPolicySelector(BaseEstimator):
    """Grid search of (horizon, k) on *validation* run-to-failure units under a false-alarm budget.

    Each candidate is scored with :func:`apps.maintenance.metrics.lead_time_metrics` at the fixed
    ``eval_horizon``. Feasible candidates have ``false_alarms_per_1000_healthy <= budget``. Among
    them the best maximises, in order: detection rate; 10th percentile and then median of the
    *useful* lead time ``min(lead, eval_horizon)`` (warning earlier than the requirement earns
    nothing); then minimises the false-alarm rate, the horizon, and k. ``fit`` only accepts full
    run-to-failure units (true RUL at the last step <= ``final_rul_tol``), so truncated C-MAPSS
    test units cannot be used to choose the policy. Raises :class:`AlarmBudgetError` when no
    candidate meets the budget.

    ``horizons=None`` searches ``eval_horizon * (0.5, 0.75, 1, 1.25, 1.5, 2)``.

    ``false_alarm_estimate``: ``observed`` compares the observed rate (false episodes per 1000
    healthy steps) with the budget. With a few validation units that is optimistic: the ranking
    then picks the most aggressive candidate that *just* fits on validation, and its rate on
    new units is typically above the budget. ``plus_one`` (default) compares
    ``(false episodes + 1) / healthy steps * 1000`` instead (the rule-of-one upper estimate), so a
    candidate is feasible only if one more false alarm would still keep it within budget; the
    grid keeps both columns (``false_alarms_per_1000_healthy`` and ``fa_estimate_per_1000``).

    ``lead_target`` (optional): among the feasible candidates with the best detection rate,
    those whose median useful lead reaches ``lead_target`` are preferred, and of them the one
    that warns *latest* (smallest median useful lead, then fewest false alarms, larger k,
    lower threshold). Warning earlier than needed buys nothing and is where false alarms come
    from: healthy steps near the threshold. Without such a candidate the ranking above applies.
    """

    def __init__(
        self,
        eval_horizon: float,
        false_alarm_budget: float,
        horizons: Sequence[float] | None = None,
        ks: Sequence[int] = (1, 2, 3, 5),
        time_unit: str = "h",
        final_rul_tol: float = 0.0,
        false_alarm_estimate: str = "plus_one",
        lead_target: float | None = None,
    ) -> None:
        self.false_alarm_estimate = false_alarm_estimate
        self.lead_target = lead_target
        self.eval_horizon = eval_horizon
        self.false_alarm_budget = false_alarm_budget
        self.horizons = horizons
        self.ks = ks
        self.time_unit = time_unit
        self.final_rul_tol = final_rul_tol

    def fit(
        self, trajectories: pd.DataFrame, y: object = None, **columns: str
    ) -> AlarmPolicySelector:
        """``trajectories``: validation units' per-step ``rul_pred``/``rul_true`` (see
        :func:`apps.maintenance.metrics.trajectory_frame`); ``columns`` renames them."""
        from apps.maintenance.metrics import lead_time_metrics

        if self.false_alarm_estimate not in ("plus_one", "observed"):
            raise MaintenanceDataError(
                f"false_alarm_estimate={self.false_alarm_estimate!r}: expected 'plus_one' or 'observed'"
            )
        horizons = (
            list(self.horizons)
            if self.horizons is not None
            else [self.eval_horizon * f for f in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)]
        )
        rows = []
        for h in horizons:
            for k in self.ks:
                res = lead_time_metrics(
                    trajectories,
                    AlarmPolicy(float(h), int(k)),
                    horizon=self.eval_horizon,
                    time_unit=self.time_unit,
                    final_rul_tol=self.final_rul_tol,
                    **columns,
                )
                useful = np.minimum(
                    res.tables["per_unit"]["lead_time"].to_numpy(), self.eval_horizon
                )
                m = res.metrics
                rows.append(
                    {
                        "horizon": float(h),
                        "k": int(k),
                        "detection_rate": m["detection_rate"],
                        "lead_time_p10": m["lead_time_p10"],
                        "lead_time_median": m["lead_time_median"],
                        "useful_lead_p10": float(np.percentile(useful, 10)),
                        "useful_lead_median": float(np.median(useful)),
                        "false_alarms_per_1000_healthy": m["false_alarms_per_1000_healthy"],
                        "n_false_alarms": m["n_false_alarms"],
                        "healthy_steps": m["healthy_steps"],
                    }
                )
        grid = pd.DataFrame(rows)
        extra = 1.0 if self.false_alarm_estimate == "plus_one" else 0.0
        healthy = grid["healthy_steps"].to_numpy(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            est = np.where(
                healthy > 0, (grid["n_false_alarms"].to_numpy() + extra) / healthy * 1000.0, 0.0
            )  # no healthy steps: no false alarm possible
        grid["fa_estimate_per_1000"] = est
        fa = grid["fa_estimate_per_1000"]
        grid["feasible"] = fa <= self.false_alarm_budget
        self.grid_ = grid
        feasible = grid[grid["feasible"]]
        if feasible.empty:
            raise AlarmBudgetError(
                f"no (horizon, k) in the grid meets false_alarm_budget={self.false_alarm_budget} per 1000 "
                f"healthy steps on the validation units ({self.false_alarm_estimate} estimate); the "
                f"lowest reached is {fa.min():.3g} "
                f"(horizon={grid.loc[fa.idxmin(), 'horizon']}, k={grid.loc[fa.idxmin(), 'k']}); "
                "widen the grid (larger k, smaller horizons) or raise the budget"
            )
        ranked = feasible.assign(_fa=fa[feasible.index]).sort_values(
            ["detection_rate", "useful_lead_p10", "useful_lead_median", "_fa", "horizon", "k"],
            ascending=[False, False, False, True, True, True],
            kind="stable",
        )
        if self.lead_target is not None:
            top = ranked[ranked["detection_rate"] == ranked["detection_rate"].iloc[0]]
            meets = top[top["useful_lead_median"] >= self.lead_target]
            if not meets.empty:  # the latest-warning candidate that still meets the lead target
                ranked = meets.sort_values(
                    ["useful_lead_median", "_fa", "k", "horizon"],
                    ascending=[True, True, False, True],
                    kind="stable",
                )
        best = ranked.iloc[0]
        self.best_policy_ = AlarmPolicy(float(best["horizon"]), int(best["k"]))
        self.best_metrics_ = {k: float(best[k]) for k in grid.columns if k not in ("feasible",)}
        return self
