"""``head.neg_resample``: legitimate training rows drawn afresh each epoch."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from apps.fraud.config import FraudConfigError, HeadConfig
from apps.fraud.distillation import distill_fit_predictor
from apps.fraud.inputs import InputBuilder
from apps.fraud.model import BatchLoader, ResampledBatchLoader, predict_logits
from apps.fraud.training import fit, load_data, training_loader, training_rows
from tests.apps.fraud.fraud_model_helpers import tiny_config


def _pool(n: int = 400, n_fraud: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.zeros(n, np.int64)
    y[rng.choice(n, n_fraud, replace=False)] = 1
    return {"x_num": np.arange(n, dtype=np.float32)[:, None], "y": y}


def _first(pool: dict[str, np.ndarray], rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.flatnonzero((pool["y"] == 1) | (rng.random(len(pool["y"])) < rate))


def _epoch_rows(batches) -> np.ndarray:
    return np.sort(np.concatenate([b["x_num"][:, 0].numpy().astype(np.int64) for b in batches]))


def test_epoch_zero_batches_as_the_fixed_draw_and_later_epochs_draw_anew() -> None:
    pool, seed = _pool(), 3
    first = _first(pool, 0.2, seed)
    rs = ResampledBatchLoader(pool, first, batch_size=32, seed=seed)
    fixed = BatchLoader({k: v[first] for k, v in pool.items()}, 32, shuffle=True, seed=seed)
    assert len(rs) == len(fixed) == -(-len(first) // 32)
    # epoch 0: the same rows in the same batches, in the same order
    for a, b in zip(list(rs), list(fixed), strict=True):
        assert np.array_equal(a["x_num"].numpy(), b["x_num"].numpy())
    frauds = np.flatnonzero(pool["y"] == 1)
    seen = set(first.tolist())
    for _ in range(1, 8):
        rows = _epoch_rows(list(rs))
        assert len(rows) == len(first) and len(np.unique(rows)) == len(rows)  # no repeats
        assert np.isin(frauds, rows).all()  # every fraud, every epoch
        assert (pool["y"][rows] == 0).sum() == len(first) - len(frauds)  # same class ratio
        assert not np.array_equal(rows, first)
        seen |= set(rows.tolist())
    assert rs.epoch == 8
    # 8 draws of a fifth cover most legitimate rows (1 - 0.8**8 = 83% expected)
    legit_seen = sum(pool["y"][i] == 0 for i in seen) / (pool["y"] == 0).sum()
    assert 0.7 < legit_seen < 0.95
    # deterministic for a seed
    again = ResampledBatchLoader(pool, first, batch_size=32, seed=seed)
    assert all(np.array_equal(again.rows(e), rs.rows(e)) for e in range(4))


def test_epoch_zero_must_hold_every_fraud() -> None:
    pool = _pool()
    no_fraud = np.flatnonzero(pool["y"] == 0)[:50]
    with pytest.raises(ValueError, match="every fraud"):
        ResampledBatchLoader(pool, no_fraud, batch_size=8)


def test_config_rejects_resampling_with_every_row_kept() -> None:
    with pytest.raises(FraudConfigError, match="neg_sample_rate below 1"):
        HeadConfig(neg_resample=True, neg_sample_rate=1.0)


def test_training_loader_draws_from_the_whole_training_block(tmp_path) -> None:
    cfg = tiny_config(tmp_path, neg_resample=True)
    out_cfg = tiny_config(tmp_path)
    data = load_data(cfg)
    ib = InputBuilder(data.schema, cfg.features, cfg.head.history_len)
    ib.fit(data.frame[data.split.train], context=data.frame, train_rows=data.split.train)
    mi = ib.fitted_inputs_
    rows, _ = training_rows(data, cfg)
    batches = training_loader(data, cfg, mi, rows)
    plain = training_loader(data, out_cfg, mi, rows)
    assert len(batches) == len(plain)
    train_legit = int((data.y[data.split.train] == 0).sum())
    n_legit = int((data.y[rows] == 0).sum())
    seen: set[bytes] = set()
    for _ in range(3):
        xs = np.concatenate([b["x_num"].numpy() for b in batches])
        ys = np.concatenate([b["y"].numpy() for b in batches])
        assert len(xs) == len(rows) and int((ys == 0).sum()) == n_legit
        assert int(ys.sum()) == int(data.y[rows].sum())  # every training fraud each epoch
        seen |= {r.tobytes() for r in xs[ys == 0]}
    # three draws of 30% meet more legitimate rows than one, and never a row outside the block
    assert n_legit < len(seen) <= train_legit
    assert len(seen) > 1.8 * n_legit


def test_fit_with_resampling_equals_the_fixed_draw_for_one_epoch_then_learns(tmp_path) -> None:
    """Through the real fit: one epoch of the fresh-draw recipe is the fixed-draw model to
    the bit, and two epochs learn. (That the second epoch's rows differ is the loader's
    test above; the distilled student's test below also checks it through a fit.)"""
    outs = {}
    for epochs, resample in ((1, False), (1, True), (2, True)):
        cfg = tiny_config(tmp_path, neg_resample=resample)
        cfg.model.d_model, cfg.model.n_layers, cfg.model.n_dense_layers = 16, 2, 1
        cfg.model.moe.expert_hidden = 16  # one expert layer (probe-free since the fix)
        cfg.trainer.max_epochs = epochs
        cfg.baseline.enabled = False
        outs[epochs, resample] = fit(cfg)
    valid = outs[1, False].data.split.valid

    def logits(o):
        return predict_logits(o.predictor.model, o.inputs.take(valid))

    # epoch 0 is the fixed draw, batched identically: the same model
    np.testing.assert_array_equal(logits(outs[1, True]), logits(outs[1, False]))
    # the second epoch changes the model, and it learns: test PR-AUC well above the test
    # block's fraud rate (a random ranking)
    assert np.abs(logits(outs[2, True]) - logits(outs[1, True])).max() > 1e-3
    data = outs[2, True].data
    base_rate = float(data.y[data.split.test].mean())
    assert outs[2, True].evaluation.metrics["pr_auc"] > 5 * base_rate


def test_distilled_student_resamples_like_the_teacher(tiny_fraud_run) -> None:
    """The student draws its legitimate rows afresh too (soft labels for the whole training
    block); for one epoch it equals the fixed-draw student; transfer rows are refused."""
    cfg, out = tiny_fraud_run
    valid = out.inputs.take(out.data.split.valid)
    logits = {}
    for epochs in (1, 2):
        for resample in (False, True):
            scfg = copy.deepcopy(cfg)
            scfg.model.d_model, scfg.model.n_layers, scfg.model.moe = 16, 1, None
            scfg.trainer.max_epochs, scfg.baseline.enabled = epochs, False
            scfg.head.neg_resample = resample
            res = distill_fit_predictor(scfg, out.predictor, {"alpha": 0.5}, data=out.data)
            logits[epochs, resample] = predict_logits(res.predictor.model, valid)
            assert np.isfinite(res.evaluation.metrics["pr_auc"])
    np.testing.assert_array_equal(logits[1, True], logits[1, False])
    # identical paths agree exactly (above), so any difference is the second epoch's rows
    assert np.abs(logits[2, True] - logits[2, False]).max() > 1e-5
    scfg.head.neg_resample = True
    with pytest.raises(FraudConfigError, match="transfer_rows"):
        distill_fit_predictor(
            scfg, out.predictor, data=out.data, transfer_rows=out.data.split.delay
        )
