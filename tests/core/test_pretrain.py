"""Masked-token pretraining: mask rules, loss only on masked tokens, it learns."""

from __future__ import annotations

import math

import pytest
import torch

from core.adapters import FeatureTokenizer, PatchEmbed1d, PatchEmbed3d
from core.backbone import Backbone
from core.config import AttentionConfig, BackboneConfig, MoEConfig
from core.errors import KeelInputError
from core.pretrain import MaskedTokenPretrainer, sample_token_mask

D = 32


def _backbone() -> Backbone:
    cfg = BackboneConfig(
        d_model=D,
        n_layers=2,
        ffn_hidden=64,
        attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_hidden=16),
    )
    return Backbone(cfg)


def _series(B: int, L: int = 32, seed: int = 0) -> torch.Tensor:
    """Two channels: a per-row level plus a fixed-phase wave plus noise. A masked patch is
    predictable from the other patches (the level) and its position (the wave)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(L, dtype=torch.float32)
    level = torch.randn(B, 1, 2, generator=g)
    wave = torch.stack([torch.sin(0.4 * t), torch.cos(0.2 * t)], dim=-1)
    return level + 0.5 * wave + 0.05 * torch.randn(B, L, 2, generator=g)


def test_sample_token_mask_counts_and_respects_maskable() -> None:
    maskable = torch.ones(3, 10, dtype=torch.bool)
    maskable[:, 0] = False
    maskable[1, 6:] = False
    maskable[2, 1:] = False  # nothing maskable
    mask = sample_token_mask(maskable, 0.4, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [round(0.4 * 9), round(0.4 * 5), 0]
    assert not (mask & ~maskable).any()


def test_cls_and_padding_are_never_masked_and_masked_inputs_are_replaced() -> None:
    torch.manual_seed(0)
    pre = MaskedTokenPretrainer(_backbone(), mask_ratio=0.5)
    tokens = torch.randn(4, 9, D)
    pad = torch.zeros(4, 9, dtype=torch.bool)
    pad[2, 5:] = True
    _, det = pre(tokens, pad, generator=torch.Generator().manual_seed(1))
    mask = det["mask_BT"]
    assert not mask[:, 0].any() and not (mask & pad).any()
    assert mask.sum(1).tolist() == [4, 4, 2, 4]
    assert det["n_masked"] == 14


def test_loss_ignores_unmasked_positions() -> None:
    torch.manual_seed(0)
    pre = MaskedTokenPretrainer(_backbone(), mask_ratio=0.3, target_dim=5)
    tokens = torch.randn(2, 9, D)
    target = torch.randn(2, 8, 5, requires_grad=True)  # T - 1: no target for CLS
    loss, det = pre(tokens, target_BTK=target, generator=torch.Generator().manual_seed(3))
    mask = det["mask_BT"][:, 1:]
    target2 = target.detach().clone()
    target2[~mask] += 100.0
    loss2, _ = pre(tokens, target_BTK=target2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, loss2)
    (grad,) = torch.autograd.grad(loss, target)
    assert (grad[~mask] == 0).all() and (grad[mask].abs().sum(-1) > 0).all()
    # the loss is exactly the masked mean of the per-token squared error
    err = (det["pred_BTK"][:, 1:] - target).pow(2).mean(-1)
    torch.testing.assert_close(loss, err[mask].mean())


def test_pretraining_loss_decreases_on_structured_series() -> None:
    torch.manual_seed(0)
    patch = PatchEmbed1d(n_channels=2, patch_len=4, d_model=D)
    pre = MaskedTokenPretrainer(_backbone(), mask_ratio=0.3, target_dim=4 * 2)
    params = list(patch.parameters()) + list(pre.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(50):
        x = _series(16, seed=step)
        tokens = patch(x)
        target = patch.patchify(x)[0]  # raw patch values: a target the adapter cannot game
        pos = patch.position_embeddings(x.shape[1])
        loss, _ = pre(tokens, target_BTK=target, positions_BTD=pos, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for moe in pre.backbone.moe_layers():
            moe.update_expert_bias()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isfinite(last)
    assert last < 0.4 * first, (first, last)


def test_works_with_tabular_and_volume_adapters() -> None:
    torch.manual_seed(0)
    tab = FeatureTokenizer(3, [4], D)
    pre = MaskedTokenPretrainer(_backbone(), mask_ratio=0.5)
    tokens = tab(torch.randn(5, 3), torch.randint(0, 4, (5, 1)))
    loss, det = pre(tokens, positions_BTD=tab.position_embeddings())
    loss.backward()
    assert torch.isfinite(loss) and det["n_masked"] == 5 * 2
    assert tab.num_bias_ND.grad is not None  # position codes carry gradient to the adapter
    vol = PatchEmbed3d(1, 2, D)
    x = torch.randn(2, 1, 4, 4, 4)
    target = x.unfold(2, 2, 2).unfold(3, 2, 2).unfold(4, 2, 2).reshape(2, 8, 8)
    pre3 = MaskedTokenPretrainer(_backbone(), mask_ratio=0.5, target_dim=8, n_prefix_tokens=0)
    loss3, det3 = pre3(vol(x), target_BTK=target, positions_BTD=vol.position_embeddings((2, 2, 2)))
    assert torch.isfinite(loss3) and det3["n_masked"] == 2 * 4


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedTokenPretrainer(_backbone(), mask_ratio=1.0)
    pre = MaskedTokenPretrainer(_backbone(), target_dim=3)
    with pytest.raises(KeelInputError, match="target_BTK must be given"):
        pre(torch.randn(2, 5, D))
    with pytest.raises(KeelInputError, match="positions"):
        pre(torch.randn(2, 5, D), target_BTK=torch.randn(2, 7, 3))
