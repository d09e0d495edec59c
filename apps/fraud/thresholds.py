"""Alert thresholds, chosen on VALIDATION scores only (never test: that would leak).

Two operational rules:

* alert budget: investigators handle a fixed number of alerts a day, so take the lowest
  threshold whose mean alerts per validation day fit the budget;
* amount-dependent cost: a missed fraud costs its amount, every alert costs a fixed
  investigation cost; take the threshold minimising the total on validation data.

An alert is raised when ``score >= threshold``; ``inf``-like thresholds (no alert at all)
are returned as the next float above the top score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from apps.fraud.errors import FraudDataError
from apps.fraud.metrics import ArrayLike, label_score_arrays


@dataclass(frozen=True)
class ThresholdChoice:
    """A chosen threshold with what it does on the data it was chosen on."""

    threshold: float
    n_alerts: int
    alerts_per_day: float | None = None
    cost: float | None = None
    rule: str = ""


def _levels(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, last index of each distinct score level, score of each level), descending."""
    order = np.argsort(-scores, kind="mergesort")
    s_sorted = scores[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    return order, last, s_sorted[last]


def _above(scores: np.ndarray) -> float:
    return float(np.nextafter(scores.max(), np.inf)) if len(scores) else float("inf")


def threshold_for_alert_budget(
    scores: ArrayLike, days: ArrayLike, alerts_per_day: float
) -> ThresholdChoice:
    """Lowest threshold whose MEAN number of alerts per day over the days in ``days`` is at
    most ``alerts_per_day`` (ties at a score level are all alerted or none)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    days_s = pl.Series(days)
    if len(days_s) != len(s) or not len(s):
        raise FraudDataError(f"need as many days as scores (> 0); got {len(days_s)} and {len(s)}")
    if alerts_per_day < 0:
        raise FraudDataError(f"alerts_per_day must be >= 0, got {alerts_per_day}")
    if not np.isfinite(s).all():
        raise FraudDataError("scores must be finite")
    n_days = days_s.n_unique()
    allowed = alerts_per_day * n_days
    _, last, level = _levels(s)
    n_at = last + 1  # alerts when the threshold is each level's score
    ok = np.flatnonzero(n_at <= allowed + 1e-9)
    rule = f"alert budget {alerts_per_day:g}/day over {n_days} days"
    if not len(ok):
        return ThresholdChoice(_above(s), 0, 0.0, rule=rule)
    i = ok[-1]
    return ThresholdChoice(float(level[i]), int(n_at[i]), float(n_at[i] / n_days), rule=rule)


def threshold_for_cost(
    scores: ArrayLike, y: ArrayLike, amounts: ArrayLike, alert_cost: float
) -> ThresholdChoice:
    """Threshold minimising ``sum(amount of missed frauds) + alert_cost * n_alerts`` (every
    alert is investigated, true or false). Among equal costs the highest threshold wins
    (fewer alerts); alerting on nothing is a candidate."""
    y_arr, s = label_score_arrays(y, scores)
    amt = np.asarray(amounts, dtype=np.float64).ravel()
    if amt.shape != s.shape or not np.isfinite(amt).all():
        raise FraudDataError("amounts must be finite and as many as the scores")
    if alert_cost < 0:
        raise FraudDataError(f"alert_cost must be >= 0, got {alert_cost}")
    total = float((amt * y_arr).sum())
    rule = f"min missed fraud amount + {alert_cost:g} per alert"
    if not len(s):
        return ThresholdChoice(float("inf"), 0, cost=0.0, rule=rule)
    order, last, level = _levels(s)
    caught = np.cumsum((amt * y_arr)[order])[last]
    cost = np.r_[total, total - caught + alert_cost * (last + 1)]
    best = int(np.argmin(cost))
    if best == 0:
        return ThresholdChoice(_above(s), 0, cost=total, rule=rule)
    return ThresholdChoice(
        float(level[best - 1]), int(last[best - 1] + 1), cost=float(cost[best]), rule=rule
    )
