"""Backbone: structure, padding, gradients, accounting, config round-trip."""

from __future__ import annotations

import math

import pytest
import torch

from core.backbone import Backbone, BackboneOutput
from core.config import AttentionConfig, BackboneConfig, MoEConfig
from core.ffn import SwiGLU
from core.moe import MoEFeedForward

D, L, T = 32, 3, 10


def _cfg(**kw) -> BackboneConfig:
    base = dict(
        d_model=D,
        n_layers=L,
        ffn_hidden=64,
        attention=AttentionConfig(n_heads=4, top_k=4, query_chunk_size=4),
        moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=16),
        n_dense_layers=1,
    )
    base.update(kw)
    return BackboneConfig(**base)


def _bb(**kw) -> Backbone:
    torch.manual_seed(0)
    return Backbone(_cfg(**kw))


def _inputs(B: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 6:] = True
    return x, pad


def test_outputs_hidden_states_gates_and_balance() -> None:
    bb = _bb()
    x, pad = _inputs()
    out = bb(x, pad, return_hidden=True, return_gates=True)
    assert isinstance(out, BackboneOutput)
    assert out.last_hidden.shape == (2, T, D)
    assert len(out.hidden_states) == L + 1
    assert out.hidden_states[0] is x
    assert all(h.shape == (2, T, D) for h in out.hidden_states)
    assert len(out.gates) == L and all(g.shape == (2, 4, T) for g in out.gates)
    assert out.load_balance.shape == (L - 1,) and (out.load_balance >= 1).all()
    # last_hidden is the final norm of the last block's output
    torch.testing.assert_close(out.last_hidden, bb.norm(out.hidden_states[-1]))
    plain = bb(x, pad)
    assert plain.hidden_states is None and plain.gates is None
    torch.testing.assert_close(plain.last_hidden, out.last_hidden)


def test_layer_placement_follows_is_moe_layer() -> None:
    bb = _bb(n_dense_layers=2, n_layers=4)
    kinds = [type(b.ffn) for b in bb.blocks]
    assert kinds == [SwiGLU, SwiGLU, MoEFeedForward, MoEFeedForward]
    assert len(list(bb.moe_layers())) == 2
    dense = _bb(moe=None)
    assert all(isinstance(b.ffn, SwiGLU) for b in dense.blocks)
    assert dense(_inputs()[0]).load_balance is None
    ungated = _bb(attention=AttentionConfig(n_heads=4, gated=False))
    assert ungated(_inputs()[0], return_gates=True).gates == [None] * L


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_padding_is_ignored_by_real_tokens(norm: str) -> None:
    bb = _bb(norm=norm)
    x, pad = _inputs()
    out = bb(x, pad).last_hidden
    x2 = x.clone()
    x2[pad] = 50.0 * torch.randn(int(pad.sum()), D)
    out2 = bb(x2, pad).last_hidden
    torch.testing.assert_close(out[~pad], out2[~pad], rtol=1e-5, atol=1e-5)
    # the unpadded row matches running it alone
    alone = bb(x[:1]).last_hidden
    torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-5)


def test_gradients_finite_everywhere() -> None:
    bb = _bb().train()
    x, pad = _inputs()
    x.requires_grad_(True)
    out = bb(x, pad).last_hidden
    (out[~pad] ** 2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in bb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_autocast_bf16_close_to_fp32() -> None:
    bb = _bb()
    x, pad = _inputs()
    ref = bb(x, pad).last_hidden
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bb(x, pad).last_hidden
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_init_scales_residual_projections() -> None:
    cfg = _cfg(d_model=128, n_layers=8, ffn_hidden=256)
    torch.manual_seed(0)
    bb = Backbone(cfg)
    std = cfg.init_std
    out_std = std / math.sqrt(2 * 8)
    assert abs(bb.blocks[0].attn.qkv.weight.std().item() - std) < 0.1 * std
    assert abs(bb.blocks[0].attn.out_proj.weight.std().item() - out_std) < 0.1 * out_std
    assert abs(bb.blocks[0].ffn.w2.weight.std().item() - out_std) < 0.1 * out_std
    moe = bb.blocks[3].ffn
    assert abs(moe.w2_EDF.std().item() - out_std) < 0.1 * out_std
    assert abs(moe.w1_EFD.std().item() - std) < 0.1 * std


def test_param_counts() -> None:
    bb = _bb()
    total = sum(p.numel() for p in bb.parameters())
    assert bb.count_params() == total
    # 2 MoE layers, each skipping (4 - 2) experts of 3 * D * F parameters
    expected_active = total - 2 * (4 - 2) * 3 * D * 16
    assert bb.count_active_params() == expected_active
    assert bb.count_params(total=False) == expected_active
    dense = _bb(moe=None)
    assert dense.count_active_params() == dense.count_params()


def test_flops_per_token_formula() -> None:
    cfg = _cfg(moe=None, attention=AttentionConfig(n_heads=4, gated=False))
    bb = Backbone(cfg)
    # dense, ungated: per layer qkv (3 D^2) + out (D^2) + SwiGLU (3 D F) matmul weights
    n = L * (4 * D * D + 3 * D * 64)
    assert bb.flops_per_token(T) == 6 * n + 12 * L * D * T
    topk = _bb()
    assert topk.flops_per_token(100) == 6 * topk.matmul_params_per_token() + 6 * L * D * (100 + 4)
    assert topk.matmul_params_per_token() < topk.count_active_params()


def test_config_yaml_round_trip(tmp_path) -> None:
    cfg = _cfg(norm="layernorm", dropout=0.1)
    text = cfg.to_yaml(tmp_path / "bb.yaml")
    assert BackboneConfig.from_yaml(text) == cfg
    back = BackboneConfig.from_yaml(tmp_path / "bb.yaml")
    assert back == cfg and isinstance(back.attention, AttentionConfig)
    assert isinstance(back.moe, MoEConfig)
    no_moe = _cfg(moe=None)
    assert BackboneConfig.from_yaml(no_moe.to_yaml()) == no_moe
    # a model rebuilt from the YAML loads the original's weights (strict)
    torch.manual_seed(0)
    bb = Backbone(cfg)
    Backbone(back).load_state_dict(bb.state_dict(), strict=True)
    with pytest.raises(ValueError, match="unknown"):
        BackboneConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_bad_inputs_raise_clear_errors() -> None:
    bb = _bb()
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        bb(torch.randn(2, T, 16))
    with pytest.raises(ValueError, match="padding_mask_BT"):
        bb(torch.randn(2, T, D), torch.zeros(2, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm"):
        _cfg(norm="batchnorm")


def test_traces_as_one_graph_for_torch_compile() -> None:
    """fullgraph=True fails on any graph break (.item(), data-dependent Python branches).

    Traced in fp32 (dense MoE fallback) and under bf16 autocast (grouped-matmul path).
    """
    bb = _bb().train()
    x, pad = _inputs()
    compiled = torch.compile(bb, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, pad).last_hidden, bb(x, pad).last_hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, pad, return_gates=True)
    assert torch.isfinite(out.last_hidden).all() and len(out.gates) == L


def test_count_active_params_of_task_modules_sums_every_backbone() -> None:
    from core.distill import count_active_params

    class Task(torch.nn.Module):  # a backbone plus a head, as the apps' task modules are
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _bb()
            self.head = torch.nn.Linear(D, 1)

    class Ensemble(torch.nn.Module):  # members that all run on every input
        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList([Task(), Task()])

    one = Task()
    head = D + 1
    assert count_active_params(one) == one.backbone.count_active_params() + head
    ens = Ensemble()
    assert count_active_params(ens) == 2 * count_active_params(one)
    assert count_active_params(ens) < sum(p.numel() for p in ens.parameters())  # experts skipped
    assert count_active_params(torch.nn.Linear(3, 2)) == 8  # no backbone: every parameter
