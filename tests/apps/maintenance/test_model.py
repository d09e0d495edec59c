"""RULModel learns on the synthetic fleet; masked pretraining runs and changes the encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from apps.maintenance.metrics import rmse
from apps.maintenance.model import RULModel, pretrain_masked
from apps.maintenance.training import fit, split_windows
from tests.apps.maintenance.conftest import tiny_config


def _model(n_channels: int = 3, window: int = 12, patch_len: int = 4) -> RULModel:
    cfg = tiny_config()
    return RULModel(cfg.model, cfg.optim, n_channels=n_channels, window=window, patch_len=patch_len)


def test_forward_shapes_and_padding_only_early_windows():
    m = _model()
    x = torch.randn(5, 12, 3)
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[0, :10] = True  # a unit with only 2 readings so far
    out = m({"x": x, "mask": mask})
    assert out.shape == (5, 2)
    assert torch.isfinite(out).all()
    loss = m.loss(out, {"rul": torch.tensor([0.0, 10.0, 50.0, 130.0, 400.0])})
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_model_learns_well_below_constant_predictor(tiny_fit):
    cfg, out = tiny_fit
    pred = out.predictor
    held = np.concatenate([out.data.policy["unit"].unique(), out.data.lead["unit"].unique()])
    # held-out full runs, never trained on
    frame = pd.concat([out.data.policy, out.data.lead], ignore_index=True)
    assert set(frame["unit"]) == set(held)
    w = split_windows(pred, frame, cfg.window)
    y = np.minimum(w.rul, cfg.rul_cap)
    p, _ = pred.model.predict_windows(w.x, w.mask)
    const = np.full_like(y, np.minimum(out.data.train["rul_uncapped"], cfg.rul_cap).mean())
    model_rmse, const_rmse = rmse(p, y), rmse(const, y)
    assert model_rmse < 0.75 * const_rmse, (model_rmse, const_rmse)


def test_masked_pretraining_runs_and_updates_encoder():
    torch.manual_seed(0)
    m = _model()
    rng = np.random.default_rng(0)
    t = np.arange(12)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, size=(64, 1, 3))
    x = np.sin(0.4 * t + phase).astype(np.float32)  # smooth: masked patches are predictable
    mask = np.zeros((64, 12), dtype=bool)
    mask[:8, :6] = True
    before = m.patch_embed.proj.weight.detach().clone()
    head_before = m.rul_head[0].weight.detach().clone()
    losses = pretrain_masked(m, x, mask, epochs=6, batch_size=16, lr=3e-3, seed=0)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert not torch.equal(before, m.patch_embed.proj.weight)
    assert torch.equal(head_before, m.rul_head[0].weight)  # heads untouched by pretraining


def test_fit_with_pretrain_epochs_runs():
    cfg = tiny_config(max_epochs=1)
    cfg.pretrain_epochs = 1
    out = fit(cfg)
    assert len(out.pretrain_losses) == 1 and np.isfinite(out.pretrain_losses[0])
