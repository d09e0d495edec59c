"""``refit_on_validation``: after step 1 chooses the epoch / tree count on validation, the
backbone and LightGBM are retrained on exactly the training + validation rows, for that
count, and never on a test (or delay) row."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from apps.fraud.config import FraudConfig
from apps.fraud.training import fit, refit_block, training_rows
from tests.apps.fraud.fraud_model_helpers import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def refit_run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("fraud_refit"), select_best="val/ap")
    cfg.head.neg_sample_rate = 1.0  # every train + validation row: exact counts
    # a small backbone: these tests count rows, steps and epochs, not model quality
    cfg.model.d_model, cfg.model.ffn_hidden, cfg.model.attention.n_heads = 16, 32, 2
    cfg.model.moe.expert_hidden, cfg.head.history_len = 16, 4
    cfg.trainer.max_epochs = 3
    cfg.baseline.n_estimators = 40
    cfg.baseline.early_stopping_rounds = 10
    cfg.refit_on_validation = True
    return cfg, fit(cfg)


def test_refit_trains_on_exactly_train_and_validation_rows(refit_run):
    cfg, out = refit_run
    split, ex = out.data.split, out.extra
    rows = out.refit_rows
    assert len(rows) == len(split.train) + len(split.valid) == ex["refit_rows"]
    assert np.array_equal(rows, np.sort(np.concatenate([split.train, split.valid])))
    # the Trainer consumed exactly these rows: ceil(rows / batch) optimizer steps per epoch
    per_epoch = math.ceil(len(rows) / cfg.head.batch_size)
    assert ex["refit_steps"] == ex["refit_epochs"] * per_epoch
    # LightGBM refit on the same block, with step 1's early-stopped tree count
    assert out.baseline.n_train_rows_ == len(rows)
    assert out.baseline.model_.booster_.num_trees() == ex["lightgbm_refit_trees"]
    assert 1 <= ex["lightgbm_refit_trees"] <= cfg.baseline.n_estimators


def test_refit_uses_the_chosen_epoch_count_and_schedule(refit_run):
    cfg, out = refit_run
    ex = out.extra
    assert ex["best_epoch"] in (0, 1, 2)
    assert ex["refit_epochs"] == ex["best_epoch"] + 1
    per_epoch = math.ceil(ex["refit_rows"] / cfg.head.batch_size)
    assert ex["refit_schedule_steps"] == cfg.trainer.max_epochs * per_epoch


def test_refit_never_sees_a_test_row(refit_run):
    _, out = refit_run
    split, frame = out.data.split, out.data.frame
    ts = frame.get_column("_ts").to_numpy()
    ids = frame.get_column(out.data.schema.id_column).to_numpy()
    rows = out.refit_rows
    assert ts[rows].max() < ts[split.test].min()
    assert not np.isin(ids[rows], ids[split.test]).any()
    if len(split.delay):
        assert ts[rows].max() < ts[split.delay].min()
    # and it did use the validation block, the rows nearest the test block
    assert np.isin(split.valid, rows).all()
    assert ts[rows].max() == ts[split.valid].max()
    assert str(ts[rows].max())[:19] == out.extra["refit_rows_last_time"][:19].replace(" ", "T")


def test_refit_reports_both_models_beside_step_one(refit_run):
    cfg, out = refit_run
    m = out.evaluation.metrics
    for key in ("pr_auc", "roc_auc", "baseline/pr_auc"):
        assert 0.0 <= m[key] <= 1.0
        assert 0.0 <= m[f"no_refit/{key}"] <= 1.0
    # a different model: the refit's test scores are not step 1's
    assert m["pr_auc"] != m["no_refit/pr_auc"]
    assert "Refit on validation" in out.evaluation.protocol


def test_refit_flag_round_trips_and_defaults_off(tmp_path):
    assert FraudConfig().refit_on_validation is False
    cfg = tiny_config(tmp_path)
    cfg.refit_on_validation = True
    again = FraudConfig.from_dict(cfg.to_dict())
    assert again.refit_on_validation is True


def test_refit_subsamples_legitimate_rows_like_step_one(refit_run):
    """With negative sub-sampling (the shipped configs keep 20 %), the refit keeps every
    fraud of train + validation, only rows of that block, and the very same training-block
    rows as step 1 (the seeded draws of the training part are unchanged)."""
    cfg, out = refit_run
    data, split = out.data, out.data.split
    sampled = copy.deepcopy(cfg)
    sampled.head.neg_sample_rate = 0.3
    block = refit_block(split)
    rows, pos_weight = training_rows(data, sampled, block)
    step1, _ = training_rows(data, sampled)
    assert np.isin(rows, block).all()
    assert np.isin(block[data.y[block] == 1], rows).all()
    assert np.array_equal(rows[np.isin(rows, split.train)], step1)
    n_legit = int((data.y[block] == 0).sum())
    assert 0.2 * n_legit < int((data.y[rows] == 0).sum()) < 0.4 * n_legit
    n_pos = int(data.y[rows].sum())
    assert pos_weight == pytest.approx(math.sqrt((len(rows) - n_pos) / n_pos))
