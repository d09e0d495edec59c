"""Fraud metrics, each following a published protocol (see ``shared/data/README.md``).

Conventions: ``y`` holds 0/1 labels, ``scores`` higher = more suspicious, and a
transaction raises an alert when ``score >= threshold``. Curves are evaluated at every
distinct score (ties move together), as scikit-learn does, so the numbers here match
``sklearn.metrics`` where both define them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from apps.fraud.errors import FraudDataError

ArrayLike = np.ndarray | Sequence[float] | pl.Series


def label_score_arrays(y: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays of 0/1 labels and finite scores of equal length, or FraudDataError."""
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    s_arr = np.asarray(scores, dtype=np.float64).ravel()
    if y_arr.shape != s_arr.shape:
        raise FraudDataError(
            f"labels ({y_arr.shape[0]}) and scores ({s_arr.shape[0]}) differ in length"
        )
    bad = ~np.isin(y_arr, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FraudDataError(f"labels must be 0 or 1; row {i} is {float(y_arr[i])}")
    if not np.isfinite(s_arr).all():
        i = int(np.flatnonzero(~np.isfinite(s_arr))[0])
        raise FraudDataError(f"scores must be finite; row {i} is {float(s_arr[i])}")
    return y_arr, s_arr


def _need_both(y: np.ndarray, metric: str) -> None:
    if y.sum() == 0 or y.sum() == len(y):
        raise FraudDataError(
            f"{metric} needs both frauds and legitimate transactions; got {int(y.sum())} frauds in {len(y)}"
        )


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) when alerting on ``score >= threshold``,
    one entry per distinct score, thresholds descending."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    return tps, fps, s_sorted[last]


def average_precision(y: ArrayLike, scores: ArrayLike) -> float:
    """PR-AUC as average precision: ``sum_n (R_n - R_{n-1}) P_n`` over distinct score
    thresholds (no interpolation), as ``sklearn.metrics.average_precision_score``. The
    ULB/Worldline protocol's headline metric (chance level = fraud rate)."""
    y_arr, s_arr = label_score_arrays(y, scores)
    _need_both(y_arr, "average precision")
    tps, fps, _ = _curve(y_arr, s_arr)
    precision = tps / (tps + fps)
    recall_steps = np.diff(np.r_[0.0, tps]) / tps[-1]
    return float(np.sum(recall_steps * precision))


pr_auc = average_precision


def average_precision_by_group(
    y: ArrayLike, scores: ArrayLike, groups: ArrayLike
) -> dict[str, float]:
    """Average precision of each kind of fraud: the frauds of group ``g`` against every
    legitimate row (other groups' frauds left out), keyed ``str(g)``. Says which fraud
    pattern a model misses, e.g. by the simulator's ``TX_FRAUD_SCENARIO`` (an answer key
    for analysis, never a feature). Groups of legitimate rows are ignored."""
    y_arr, s_arr = label_score_arrays(y, scores)
    g_arr = np.asarray(groups)
    if len(g_arr) != len(y_arr):
        raise FraudDataError(f"groups ({len(g_arr)}) and labels ({len(y_arr)}) differ in length")
    legit = y_arr == 0
    out = {}
    for g in np.unique(g_arr[~legit]):
        keep = legit | (g_arr == g)
        out[str(g)] = average_precision(y_arr[keep], s_arr[keep])
    return out


def roc_auc(y: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (trapezoids over distinct thresholds, ties count half),
    as ``sklearn.metrics.roc_auc_score``. Reported with PR-AUC on the ULB protocol."""
    y_arr, s_arr = label_score_arrays(y, scores)
    _need_both(y_arr, "ROC-AUC")
    tps, fps, _ = _curve(y_arr, s_arr)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def recall_at_precision(y: ArrayLike, scores: ArrayLike, min_precision: float = 0.9) -> float:
    """Largest recall over thresholds whose precision is >= ``min_precision`` (0 when no
    threshold reaches it): the 'recall at a fixed precision' of the ULB protocol."""
    y_arr, s_arr = label_score_arrays(y, scores)
    _need_both(y_arr, "recall at precision")
    tps, fps, _ = _curve(y_arr, s_arr)
    ok = tps / (tps + fps) >= min_precision
    return float(tps[ok].max() / tps[-1]) if ok.any() else 0.0


def recall_at_fpr(y: ArrayLike, scores: ArrayLike, max_fpr: float = 0.01) -> float:
    """Largest recall (TPR) over thresholds whose false-positive rate is <= ``max_fpr``
    (default 1 %): recall at a fixed rate of wrongly blocked legitimate transactions."""
    y_arr, s_arr = label_score_arrays(y, scores)
    _need_both(y_arr, "recall at FPR")
    tps, fps, _ = _curve(y_arr, s_arr)
    ok = fps / fps[-1] <= max_fpr
    return float(tps[ok].max() / tps[-1]) if ok.any() else 0.0


def card_precision_at_k_daily(
    scores: ArrayLike,
    y: ArrayLike,
    cards: ArrayLike,
    days: ArrayLike,
    k: int = 100,
    *,
    remove_detected: bool = True,
) -> pl.DataFrame:
    """Card Precision@k per day, the handbook's definition (Le Borgne et al., ch. 4):

    per day, each card gets the max score and the max label of its transactions that day;
    cards are ranked by that score (ties: smaller card id first) and the top ``k`` taken;
    precision = (cards among them with at least one fraud that day) / ``k``. With
    ``remove_detected`` (handbook default), a compromised card caught in a day's top k is
    excluded on the following days (it is blocked). Known-compromised cards from before the
    test period must already be removed (``splits.train_delay_test_split`` does it).

    Returns one row per day: ``day, card_precision, n_cards, n_fraud_cards, n_detected``.
    """
    if k < 1:
        raise FraudDataError(f"k must be >= 1, got {k}")
    y_arr, s_arr = label_score_arrays(y, scores)
    cards_s, days_s = pl.Series(cards), pl.Series(days)
    if not len(cards_s) == len(days_s) == len(s_arr):
        raise FraudDataError(
            f"scores ({len(s_arr)}), cards ({len(cards_s)}) and days ({len(days_s)}) differ in length"
        )
    frame = pl.DataFrame({"day": days_s, "card": cards_s, "score": s_arr, "y": y_arr})
    per_card = frame.group_by(["day", "card"]).agg(pl.col("score").max(), pl.col("y").max())
    detected: set = set()
    rows = []
    for day in sorted(per_card.get_column("day").unique().to_list()):
        today = per_card.filter(pl.col("day") == day)
        if detected:
            today = today.filter(~pl.col("card").is_in(list(detected)))
        top = today.sort(["score", "card"], descending=[True, False]).head(k)
        hits = top.filter(pl.col("y") == 1).get_column("card").to_list()
        rows.append(
            {
                "day": day,
                "card_precision": len(hits) / k,
                "n_cards": today.height,
                "n_fraud_cards": int(today.get_column("y").sum()),
                "n_detected": len(hits),
            }
        )
        if remove_detected:
            detected.update(hits)
    return pl.DataFrame(rows)


def card_precision_at_k(
    scores: ArrayLike,
    y: ArrayLike,
    cards: ArrayLike,
    days: ArrayLike,
    k: int = 100,
    *,
    remove_detected: bool = True,
) -> float:
    """Mean over test days of :func:`card_precision_at_k_daily` (handbook protocol; report
    it as 'Card Precision@k per day', k = 100 on the handbook set)."""
    daily = card_precision_at_k_daily(scores, y, cards, days, k, remove_detected=remove_detected)
    return float(daily.get_column("card_precision").mean())


def alerts_per_day(scores: ArrayLike, days: ArrayLike, threshold: float) -> float:
    """Mean number of alerts (``score >= threshold``) per day over the days present in
    ``days`` (days without alerts count as 0): the investigators' workload."""
    s_arr = np.asarray(scores, dtype=np.float64).ravel()
    days_s = pl.Series(days)
    if len(days_s) != len(s_arr):
        raise FraudDataError(f"scores ({len(s_arr)}) and days ({len(days_s)}) differ in length")
    frame = pl.DataFrame({"day": days_s, "alert": s_arr >= threshold})
    per_day = frame.group_by("day").agg(pl.col("alert").sum())
    return float(per_day.get_column("alert").mean())


def fraud_metrics(
    y: ArrayLike,
    scores: ArrayLike,
    *,
    cards: ArrayLike | None = None,
    days: ArrayLike | None = None,
    k: int = 100,
    min_precision: float = 0.9,
    max_fpr: float = 0.01,
    threshold: float | None = None,
) -> dict[str, float]:
    """All metrics of the protocols on one test set: PR-AUC, ROC-AUC, recall at precision
    ``min_precision``, recall at FPR ``max_fpr``; with cards and days Card Precision@k per
    day; with a threshold (chosen on validation data!) the alerts per day and its
    precision/recall. Keys name the operating point (``recall_at_precision_0.9``)."""
    y_arr, s_arr = label_score_arrays(y, scores)
    out = {
        "n": float(len(y_arr)),
        "fraud_rate": float(y_arr.mean()),
        "pr_auc": average_precision(y_arr, s_arr),
        "roc_auc": roc_auc(y_arr, s_arr),
        f"recall_at_precision_{min_precision:g}": recall_at_precision(y_arr, s_arr, min_precision),
        f"recall_at_fpr_{max_fpr:g}": recall_at_fpr(y_arr, s_arr, max_fpr),
    }
    if cards is not None and days is not None:
        out[f"card_precision_at_{k}"] = card_precision_at_k(s_arr, y_arr, cards, days, k)
    if threshold is not None:
        alert = s_arr >= threshold
        tp = float((alert & (y_arr == 1)).sum())
        out["threshold"] = float(threshold)
        out["precision_at_threshold"] = tp / alert.sum() if alert.any() else 0.0
        out["recall_at_threshold"] = tp / y_arr.sum() if y_arr.any() else 0.0
        if days is not None:
            out["alerts_per_day"] = alerts_per_day(s_arr, days, threshold)
    return out
