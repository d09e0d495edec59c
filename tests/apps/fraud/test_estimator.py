"""FraudDetector: scikit-learn contract on a notebook-style fit from a frame."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.base import clone

from apps.fraud.config import FraudConfigError
from apps.fraud.estimator import FraudDetector
from tests.apps.fraud.fraud_model_helpers import tiny_config


def test_fit_predict_explain_from_a_frame(tmp_path):
    cfg = tiny_config(tmp_path)
    frame = pl.read_parquet(cfg.data_path)
    det = FraudDetector(cfg, trainer__max_epochs=1, baseline__enabled=False)
    assert not hasattr(det, "predictor_")
    with pytest.raises(RuntimeError, match="not fitted"):
        det.predict(frame.to_pandas())
    assert det.fit(frame) is det
    assert det.config_.trainer.max_epochs == 1 and cfg.trainer.max_epochs == 3  # not mutated
    assert det.metrics_["pr_auc"] > det.metrics_["fraud_rate"]
    assert "baseline/pr_auc" not in det.metrics_
    sample = frame.tail(500).drop("TX_FRAUD", "TX_FRAUD_SCENARIO").to_pandas()
    proba = det.predict_proba(sample)
    assert proba.shape == (500, 2) and np.allclose(proba.sum(1), 1.0)
    pred = det.predict(sample)
    np.testing.assert_array_equal(pred, proba[:, 1] >= det.threshold_)
    expl = det.explain(sample)
    assert expl.loc[expl["decision"], "reasons"].notna().all()
    with pytest.raises(ValueError, match="unknown config key"):
        FraudDetector(cfg, head__nope=1).fit(frame)


def test_init_only_stores_parameters():
    det = FraudDetector(None, trainer__max_epochs=2)
    assert det.config is None and det.overrides == {"trainer__max_epochs": 2}
    assert not any(k.endswith("_") for k in vars(det))
    copy = clone(det)
    assert copy.get_params() == {"config": None, "trainer__max_epochs": 2}


def test_overrides_pass_the_config_checks():
    """An override is checked like a YAML value: the error names the key before any fit."""
    cfg = FraudDetector(None, ensemble_size=2, head__row_mlp=[8])._config()
    assert cfg.ensemble_size == 2 and list(cfg.head.row_mlp) == [8]
    with pytest.raises(FraudConfigError, match="ensemble_size=0"):
        FraudDetector(None, ensemble_size=0)._config()
    with pytest.raises(FraudConfigError, match="head.row_mlp"):
        FraudDetector(None, head__row_mlp=[0])._config()
