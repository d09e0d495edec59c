"""LightGBM baseline on the shipped synthetic sample, handbook protocol end to end."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from apps.fraud.baseline import LightGBMBaseline, stack_features
from apps.fraud.errors import FraudDataError
from apps.fraud.features import FeatureBuilder
from apps.fraud.metrics import average_precision, card_precision_at_k, fraud_metrics
from apps.fraud.readers import load_dataset
from apps.fraud.splits import train_delay_test_split, transaction_days
from apps.fraud.thresholds import threshold_for_alert_budget


@pytest.fixture(scope="module")
def prepared():
    frame, schema = load_dataset("synthetic")
    split = train_delay_test_split(
        frame, schema, "2018-05-01", train_days=14, valid_days=3, delay_days=7, test_days=7
    )
    builder = FeatureBuilder(schema).fit(frame[split.train])
    features = builder.transform(frame)
    x, cat = stack_features(*builder.to_matrices(features))
    y = frame.get_column("TX_FRAUD").to_numpy()
    return frame, split, builder, x, cat, y


def test_baseline_beats_chance_on_the_handbook_protocol(prepared):
    frame, split, builder, x, cat, y = prepared
    assert "TX_FRAUD_SCENARIO" not in builder.feature_columns_.all
    model = LightGBMBaseline(n_estimators=300, early_stopping_rounds=40).fit(
        x[split.train],
        y[split.train],
        eval_set=(x[split.valid], y[split.valid]),
        categorical_feature=cat,
    )
    assert 1 <= model.best_iteration_ <= 300
    assert model.scale_pos_weight_ == pytest.approx(
        (y[split.train] == 0).sum() / y[split.train].sum()
    )
    days = transaction_days(frame).to_numpy()
    cards = frame.get_column("CUSTOMER_ID").to_numpy()
    # Threshold from validation days only, then applied to the test days.
    choice = threshold_for_alert_budget(
        model.decision_function(x[split.valid]), days[split.valid], 10
    )
    scores = model.decision_function(x[split.test])
    m = fraud_metrics(
        y[split.test],
        scores,
        cards=cards[split.test],
        days=days[split.test],
        k=20,
        threshold=choice.threshold,
    )
    base_rate = y[split.test].mean()
    assert m["pr_auc"] > max(0.2, 10 * base_rate)
    assert m["roc_auc"] > 0.7
    rng = np.random.default_rng(0)
    chance = rng.random(len(scores))
    assert average_precision(y[split.test], chance) < 3 * base_rate
    chance_cp = card_precision_at_k(
        chance, y[split.test], cards[split.test], days[split.test], k=20
    )
    assert m["card_precision_at_20"] > 2 * chance_cp
    assert m["precision_at_threshold"] > 5 * base_rate
    assert model.predict(x[split.test][:5]).tolist() == (scores[:5] >= 0.5).astype(int).tolist()


def test_imbalance_modes_and_contract(prepared):
    _, split, _, x, cat, y = prepared
    idx = split.train[:4000]
    for mode, weight in (("is_unbalance", 1.0), ("none", 1.0)):
        model = LightGBMBaseline(n_estimators=20, imbalance=mode).fit(
            x[idx], y[idx], categorical_feature=cat
        )
        assert model.scale_pos_weight_ == weight
        assert model.best_iteration_ == 20
        proba = model.predict_proba(x[:10])
        assert proba.shape == (10, 2) and np.allclose(proba.sum(axis=1), 1.0)
        margin = model.margin(x[:10])  # log-odds: the score is its sigmoid
        assert np.allclose(1.0 / (1.0 + np.exp(-margin)), model.decision_function(x[:10]))
        assert np.ptp(margin) > 0
    copy = clone(LightGBMBaseline(num_leaves=7))
    assert copy.get_params()["num_leaves"] == 7 and not hasattr(copy, "model_")
    with pytest.raises(FraudDataError, match="imbalance"):
        LightGBMBaseline(imbalance="smote").fit(x[idx], y[idx])
    with pytest.raises(FraudDataError, match="row 1 is 2"):
        LightGBMBaseline().fit(x[:3], np.array([0, 2, 1]))
