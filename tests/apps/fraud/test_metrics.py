"""Metric values on hand-made cases, agreement with scikit-learn, thresholds and plots."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from apps.fraud.errors import FraudDataError
from apps.fraud.metrics import (
    alerts_per_day,
    average_precision,
    average_precision_by_group,
    card_precision_at_k,
    card_precision_at_k_daily,
    fraud_metrics,
    recall_at_fpr,
    recall_at_precision,
    roc_auc,
)
from apps.fraud.plots import pr_curve_figure, save_figure
from apps.fraud.thresholds import threshold_for_alert_budget, threshold_for_cost

Y = [1, 1, 0, 1, 0, 0, 1, 0]
S = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_and_roc_auc_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(500) < 0.1).astype(int)
    s = np.round(rng.random(500) + 0.5 * y, 1)  # coarse scores: many ties
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_hand_made_ranking_metrics():
    # Alerting the top n: precision 1, 1, 2/3, 3/4, 3/5, 1/2, 4/7, 1/2; recall steps of 1/4.
    assert average_precision(Y, S) == pytest.approx((1 + 1 + 3 / 4 + 4 / 7) / 4)
    assert recall_at_precision(Y, S, 0.9) == 0.5
    assert recall_at_precision(Y, S, 0.75) == 0.75
    assert recall_at_precision(Y, S, 0.55) == 1.0
    assert recall_at_fpr(Y, S, 0.0) == 0.5
    assert recall_at_fpr(Y, S, 0.25) == 0.75  # one false alarm out of 4 legit allowed
    assert recall_at_fpr(Y, S, 0.5) == 0.75  # top 5: 2 false alarms; top 7 needs 3
    assert recall_at_fpr(Y, S, 0.75) == 1.0
    assert roc_auc(Y, S) == pytest.approx(12 / 16)  # 12 of 16 fraud-legit pairs ordered right


def test_card_precision_at_k_handbook_definition():
    rows = [  # (day, card, score, label)
        (1, "A", 0.9, 0), (1, "A", 0.2, 1), (1, "B", 0.8, 0), (1, "C", 0.85, 1), (1, "D", 0.1, 1),
        (2, "A", 0.99, 1), (2, "C", 0.95, 1), (2, "B", 0.7, 0), (2, "D", 0.6, 1), (2, "E", 0.5, 0),
        (3, "F", 0.3, 1),
    ]  # fmt: skip
    days, cards, scores, y = (list(col) for col in zip(*rows, strict=True))
    daily = card_precision_at_k_daily(scores, y, cards, days, k=2)
    # Day 1: cards by max score A .9 (has a fraud), C .85 (fraud), B .8 -> top 2 both compromised.
    # Day 2: A and C were detected on day 1 and are excluded; B .7 (legit), D .6 (fraud) -> 1/2.
    # Day 3: a single card, still divided by k (handbook) -> 1/2.
    assert daily.get_column("card_precision").to_list() == [1.0, 0.5, 0.5]
    assert daily.get_column("n_cards").to_list() == [4, 3, 1]
    assert card_precision_at_k(scores, y, cards, days, k=2) == pytest.approx(2 / 3)
    kept = card_precision_at_k(scores, y, cards, days, k=2, remove_detected=False)
    assert kept == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    with pytest.raises(FraudDataError, match="differ in length"):
        card_precision_at_k(scores, y, cards[:-1], days, k=2)


def test_alerts_per_day_and_fraud_metrics():
    days = [1, 1, 1, 2, 2, 3, 3, 3]
    assert alerts_per_day(S, days, 0.65) == pytest.approx((3 + 0 + 0) / 3)
    assert alerts_per_day(S, days, 0.45) == pytest.approx((3 + 2 + 0) / 3)
    m = fraud_metrics(Y, S, cards=list("abcdefgh"), days=days, k=1, threshold=0.45)
    assert m["pr_auc"] == pytest.approx(average_precision(Y, S))
    assert m["recall_at_precision_0.9"] == 0.5
    assert m["recall_at_fpr_0.01"] == 0.5
    assert m["card_precision_at_1"] == pytest.approx(
        (1 + 1 + 0) / 3
    )  # day 3: top card f (.4) is legit
    assert m["precision_at_threshold"] == pytest.approx(3 / 5)
    assert m["recall_at_threshold"] == pytest.approx(3 / 4)
    assert m["alerts_per_day"] == pytest.approx(5 / 3)


def test_bad_inputs_raise():
    with pytest.raises(FraudDataError, match="row 1 is 2.0"):
        average_precision([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(FraudDataError, match="both frauds and legitimate"):
        roc_auc([0, 0], [0.1, 0.2])
    with pytest.raises(FraudDataError, match="finite"):
        recall_at_precision([0, 1], [0.1, float("nan")])


def test_threshold_for_alert_budget_respects_the_budget():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 2)
    days = np.repeat(np.arange(10), 30)
    choice = threshold_for_alert_budget(scores, days, alerts_per_day=4.0)
    n_alerts = int((scores >= choice.threshold).sum())
    assert n_alerts == choice.n_alerts <= 40
    lower = scores[scores < choice.threshold].max()
    assert (scores >= lower).sum() > 40  # the next level down breaks the budget
    assert choice.alerts_per_day == pytest.approx(n_alerts / 10)
    none = threshold_for_alert_budget([0.5, 0.5, 0.5], [1, 1, 1], alerts_per_day=2)
    assert none.n_alerts == 0 and none.threshold > 0.5


def test_threshold_for_cost_matches_brute_force():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.05).astype(int)
    scores = np.round(rng.random(400) * 0.7 + 0.3 * y, 2)
    amounts = np.round(rng.exponential(80, 400), 2)
    for alert_cost in (0.0, 5.0, 40.0, 1e6):
        choice = threshold_for_cost(scores, y, amounts, alert_cost)
        candidates = np.r_[np.unique(scores), np.inf]
        costs = [
            ((amounts * y)[scores < t].sum() + alert_cost * (scores >= t).sum()) for t in candidates
        ]
        assert choice.cost == pytest.approx(min(costs))
        own = (amounts * y)[scores < choice.threshold].sum() + alert_cost * (
            scores >= choice.threshold
        ).sum()
        assert own == pytest.approx(choice.cost)
    assert threshold_for_cost(scores, y, amounts, 1e6).n_alerts == 0


def test_pr_curve_figure_saves_png(tmp_path):
    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.2).astype(int)
    s = rng.random(200) + y
    fig = pr_curve_figure(y, s, label="test", threshold=1.0)
    assert fig.axes[0].get_xlabel() == "recall"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == f"test (AP {average_precision(y, s):.3f})"
    out = save_figure(fig, tmp_path / "plots" / "pr.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["pr.png"]  # no temp file left


def test_average_precision_by_group_scores_each_kind_against_all_legit_rows():
    # kind 1 frauds score top, kind 2 frauds sit below two legitimate rows
    y = [1, 1, 0, 0, 1, 0, 1, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    g = [1, 1, 0, 0, 2, 0, 2, 0]
    by = average_precision_by_group(y, s, g)
    assert set(by) == {"1", "2"}  # legitimate rows' group (0) is not a kind of fraud
    assert by["1"] == pytest.approx(1.0)
    # kind 2 alone: ranks 3 and 5 among legit + kind 2 -> (1/3 + 2/5) / 2
    assert by["2"] == pytest.approx((1 / 3 + 2 / 5) / 2)
    assert by["2"] == pytest.approx(average_precision_score([0, 0, 1, 0, 1, 0], s[2:]))
    with pytest.raises(FraudDataError, match="groups"):
        average_precision_by_group(y, s, g[:-1])
