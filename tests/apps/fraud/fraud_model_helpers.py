"""Tiny fraud model configs on a small synthetic file (for the model-level tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.fraud.config import FraudConfig, load_config
from apps.fraud.metrics import average_precision
from apps.fraud.synthetic import SyntheticConfig, generate_transactions, write_frame
from apps.fraud.training import FitOutput, fit


def tiny_data(folder: Path) -> Path:
    """45 days, 250 cards (~20k rows, ~1% fraud), seed 5."""
    path = folder / "tiny.parquet"
    if not path.exists():
        frame = generate_transactions(
            SyntheticConfig(n_customers=250, n_terminals=350, n_days=45, seed=5)
        )
        write_frame(frame, path)
    return path


def fit_two_epochs_keeps_best_val_ap(cfg: FraudConfig) -> FitOutput:
    """``training.fit`` for 2 epochs (no baseline) with ``head.select_best='val/ap'`` set by
    the caller; asserts the kept weights score the recorded best validation AP again."""
    cfg.trainer.max_epochs = 2
    cfg.baseline.enabled = False
    out = fit(cfg)
    assert out.extra["best_epoch"] in (0, 1)
    valid = out.data.split.valid
    logits, _ = out.predictor.score_inputs(out.inputs.take(valid))
    ap = average_precision(out.data.y[valid], logits)
    assert ap == pytest.approx(out.extra["best_val_ap"], abs=1e-4)
    return out


def tiny_config(folder: Path, **head) -> FraudConfig:
    cfg = load_config("demo")
    cfg.data_path = str(tiny_data(folder))
    cfg.protocol.train_start = "2018-04-15"
    cfg.protocol.train_days = 14
    cfg.protocol.valid_days = 4
    cfg.protocol.delay_days = 7
    cfg.protocol.test_days = 7
    cfg.protocol.card_precision_k = 10
    cfg.model.d_model = 32
    cfg.model.ffn_hidden = 64
    cfg.model.moe.expert_hidden = 32
    cfg.head.neg_sample_rate = 0.3
    cfg.trainer.max_epochs = 3
    cfg.threshold.alerts_per_day = 10
    cfg.baseline.n_estimators = 60
    for k, v in head.items():
        setattr(cfg.head, k, v)
    return cfg
