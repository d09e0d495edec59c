"""The row path (``head.row_mlp``, ``model.RowMLP``): an MLP over the whole row of scaled
numeric features whose logit is added to the CLS logit; its attributions, its config
checks, and a fit through the real protocol that saves and reloads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.fraud.config import FraudConfigError, HeadConfig
from apps.fraud.model import FraudModel, RowMLP
from apps.fraud.predictor import FraudPredictor
from apps.fraud.training import fit
from core.config import small_backbone
from tests.apps.fraud.fraud_model_helpers import tiny_config


def _model(row_mlp: tuple[int, ...]) -> FraudModel:
    torch.manual_seed(0)
    return FraudModel(small_backbone(d_model=16), n_numeric=3, row_mlp=row_mlp).eval()


def test_row_path_adds_its_mlp_logit_to_the_deep_logit() -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    deep, both = _model(()), _model((8, 4))
    assert deep.row is None and both.row is not None
    both.load_state_dict(deep.state_dict(), strict=False)  # same deep weights
    batch = {"x_num": x}
    torch.testing.assert_close(both(batch), deep(batch) + both.row(x))
    # the row path is not a constant: different rows get different terms
    assert both.row(x).std() > 1e-3


def test_row_path_attributions_are_gradient_times_input() -> None:
    """Each feature's contribution gains x_i * d row(x) / d x_i over the deep model's, with
    the gradient computed here independently (autograd's Jacobian, one row at a time)."""
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32))
    deep, both = _model(()), _model((8, 4))
    both.load_state_dict(deep.state_dict(), strict=False)
    batch = {"x_num": x}
    logit_deep, contrib_deep = deep.attributions(batch)
    logit_both, contrib_both = both.attributions(batch)
    grad = torch.stack([torch.autograd.functional.jacobian(both.row, r) for r in x])
    torch.testing.assert_close(contrib_both, contrib_deep + x * grad)
    torch.testing.assert_close(logit_both, both(batch))


def test_config_rejects_empty_or_non_positive_hidden_sizes() -> None:
    for bad in ([], [0], [16, -1], [8.5]):
        with pytest.raises(FraudConfigError, match="head.row_mlp"):
            HeadConfig(row_mlp=bad)
    assert HeadConfig(row_mlp=[64, 32]).row_mlp == [64, 32]
    with pytest.raises(ValueError, match="row_mlp"):
        FraudModel(small_backbone(d_model=16), n_numeric=2, row_mlp=(0,))


def test_fit_with_row_path_learns_and_reloads(tmp_path) -> None:
    """Through the real protocol (Lightning Trainer, calibration, threshold): the model
    carries the row path, ranks test frauds far above their rate, and a saved predictor
    reloads to the same scores and reasons."""
    cfg = tiny_config(tmp_path, row_mlp=[16, 8])
    cfg.model.d_model, cfg.model.n_layers, cfg.model.moe = 16, 1, None
    cfg.trainer.max_epochs = 1
    cfg.baseline.enabled = False
    out = fit(cfg)
    model = out.predictor.model
    assert isinstance(model.row, RowMLP)
    assert model.row.net[0].in_features == model.tokenizer.n_numeric
    data = out.data
    base_rate = float(data.y[data.split.test].mean())
    assert out.evaluation.metrics["pr_auc"] > 5 * base_rate

    out.predictor.save(tmp_path / "model")
    loaded = FraudPredictor.load(tmp_path / "model")
    arrays = out.inputs.take(data.split.test[:200])
    np.testing.assert_allclose(
        loaded.score_inputs(arrays)[0], out.predictor.score_inputs(arrays)[0], rtol=0, atol=1e-6
    )
    assert loaded.explain_inputs(arrays) == out.predictor.explain_inputs(arrays)
