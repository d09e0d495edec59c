"""RULModel.grow_d_model: d_model growth through core.growth keeps the model's outputs."""

from __future__ import annotations

import torch

from apps.maintenance.model import RULModel
from core.config import AttentionConfig, BackboneConfig
from core.growth import apply_growth


def _batch(seed: int, b: int = 6, w: int = 20, c: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, w, dtype=torch.bool)
    mask[0, :7] = True  # a left-padded short unit
    return {"x": torch.randn(b, w, c, generator=g), "mask": mask}


def test_grow_d_model_is_function_preserving_and_trainable() -> None:
    torch.manual_seed(0)
    cfg = BackboneConfig(
        d_model=16,
        n_layers=2,
        ffn_hidden=32,
        attention=AttentionConfig(n_heads=2, gated=True),
        n_dense_layers=2,
        dropout=0.0,
    )
    model = RULModel(cfg, n_channels=5, window=20, patch_len=4).eval()
    batch = _batch(1)
    with torch.no_grad():
        before = model(batch)
    apply_growth(model, "grow_width", new_d_model=48, new_ffn_hidden=64)
    assert model.patch_embed.proj.out_features == 48
    assert model.rul_head[0].in_features == 96 and model.alarm_head.in_features == 96
    with torch.no_grad():
        after = model(batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # the new parts are not dead: the first step gives the new token channels and the RUL
    # head's new hidden units a gradient (the head's new input columns read channels that
    # are still exactly 0, so they start moving one step later)
    model.train()
    model(batch)[:, 0].sum().backward()
    assert model.patch_embed.proj.weight.grad[16:].abs().sum() > 0
    assert model.rul_head[2].weight.grad[:, 16:].abs().sum() > 0
