"""Dynamic graph attention: paths agree with a readable reference; masks, top-k, gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.attention import DynamicGraphAttention, attention_reference, topk_attention
from core.config import AttentionConfig
from core.topk_threshold import TIE_MARGIN

D, H, T = 16, 4, 12


def _attn(**kw) -> DynamicGraphAttention:
    torch.manual_seed(0)
    m = DynamicGraphAttention(D, AttentionConfig(n_heads=H, **kw))
    if m.gate is not None:  # spread the gates so a wrong gate would show in the outputs
        torch.nn.init.normal_(m.gate.weight, std=0.5)
    return m


def _inputs(B: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 8:] = True
    pad[2, 3:] = True
    return x, pad


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fast_path_matches_einsum_reference(gated: bool, qk_norm: bool) -> None:
    m = _attn(gated=gated, qk_norm=qk_norm)
    x, pad = _inputs()
    for mask in (None, pad):
        out, _ = m(x, mask)
        ref, _ = attention_reference(m, x, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_topk_path_matches_reference_and_is_chunk_invariant() -> None:
    x, pad = _inputs()
    outs = []
    for chunk in (1, 5, T):
        m = _attn(top_k=3, query_chunk_size=chunk)
        out, _ = m(x, pad)
        ref, _ = attention_reference(m, x, pad)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=1e-6)


def test_topk_with_k_equal_T_equals_dense_gated_attention() -> None:
    """The sparse kernel keeping all T keys is dense attention, within float rounding."""
    dense = _attn(gated=True)
    x, pad = _inputs()
    q, k, v = dense._project(x)
    out_sparse, _, _ = topk_attention(q, k, v, top_k=T, key_pad_BS=pad, query_chunk_size=5)
    out_dense = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
    torch.testing.assert_close(out_sparse, out_dense, rtol=1e-5, atol=1e-6)
    # At module level: a layer configured with top_k == T gives the dense gated output.
    sparse_mod = _attn(gated=True, top_k=T)
    sparse_mod.load_state_dict(dense.state_dict())
    torch.testing.assert_close(sparse_mod(x, pad)[0], dense(x, pad)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 3])
def test_padded_keys_do_not_change_outputs(top_k: int | None) -> None:
    m = _attn(top_k=top_k)
    x, pad = _inputs()
    out, _ = m(x, pad)
    x2 = x.clone()
    x2[pad] = 100.0 * torch.randn(int(pad.sum()), D)  # garbage in every padded position
    out2, _ = m(x2, pad)
    keep = ~pad
    torch.testing.assert_close(out[keep], out2[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[pad], out2[pad])  # padded rows did see the new values


@pytest.mark.parametrize("top_k", [None, 3])
def test_fully_padded_sequence_gives_finite_output(top_k: int | None) -> None:
    m = _attn(top_k=top_k)
    x, pad = _inputs()
    pad[0] = True
    out, g = m(x, pad, return_gates=True)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_topk_keeps_exactly_k_real_keys_per_query() -> None:
    k = 3
    m = _attn(top_k=k, query_chunk_size=4)
    x, pad = _inputs()
    weights = m.attention_graph(x, pad)  # [B, H, T, T], the weights forward uses
    nonzero = (weights > 0).sum(-1)
    assert (nonzero == k).all(), nonzero
    assert (weights[pad[:, None, None, :].expand_as(weights)] == 0).all()  # never a padded key
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    # The kept keys are the k largest logits: same weights as the dense masked reference.
    _, ref_weights = attention_reference(m, x, pad)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_topk_larger_than_real_keys_puts_zero_weight_on_padding() -> None:
    m = _attn(top_k=5)
    x, pad = _inputs()  # row 2 has only 3 real keys
    weights = m.attention_graph(x, pad)
    assert ((weights[2] > 0).sum(-1) == 3).all()
    ref, _ = attention_reference(m, x, pad)
    torch.testing.assert_close(m(x, pad)[0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 3])
def test_gradients_reach_inputs_and_every_parameter(top_k: int | None) -> None:
    m = _attn(top_k=top_k, qk_norm=True)
    x, pad = _inputs()
    x.requires_grad_(True)
    out, _ = m(x, pad)
    (out**2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_topk_gradients_match_reference() -> None:
    m = _attn(top_k=4, query_chunk_size=5)
    x, pad = _inputs()
    out, _ = m(x, pad)
    grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    ref, _ = attention_reference(m, x, pad)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_gates_shape_range_and_init() -> None:
    m = DynamicGraphAttention(D, AttentionConfig(n_heads=H))
    x, _ = _inputs()
    _, g = m(x, return_gates=True)
    assert g.shape == (3, H, T)
    assert ((g > 0) & (g < 1)).all()
    assert abs(g.mean().item() - 0.5) < 0.05  # gate_bias_init=0: gates start near 0.5
    m_open = DynamicGraphAttention(D, AttentionConfig(n_heads=H, gate_bias_init=4.0))
    assert m_open(x, return_gates=True)[1].min() > 0.9
    assert m(x, return_gates=False)[1] is None
    assert _attn(gated=False)(x, return_gates=True)[1] is None


def test_gates_scale_each_head_output() -> None:
    """Closing one head's gate (bias -> -inf) removes exactly that head's contribution."""
    m = _attn(gated=True)
    x, _ = _inputs()
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias.fill_(30.0)  # all gates ~1: plain attention
    open_out, _ = m(x)
    ungated = _attn(gated=False)
    ungated.qkv.load_state_dict(m.qkv.state_dict())
    ungated.out_proj.load_state_dict(m.out_proj.state_dict())
    torch.testing.assert_close(open_out, ungated(x)[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        m.gate.bias[1] = -30.0
        ungated.out_proj.weight[:, 4:8] = 0.0  # drop head 1's slice of W_o instead
    torch.testing.assert_close(m(x)[0], ungated(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 3])
def test_autocast_bf16_close_to_fp32(top_k: int | None) -> None:
    m = _attn(top_k=top_k)
    x, pad = _inputs()
    ref, _ = m(x, pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(x, pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        DynamicGraphAttention(10, AttentionConfig(n_heads=4))
    with pytest.raises(ValueError, match="top_k"):
        AttentionConfig(top_k=0)


@pytest.mark.parametrize("impl", ["mask", "gather"])
@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_both_topk_implementations_match_reference_and_each_other(impl: str, top_k: int) -> None:
    """The fused-SDPA mask path and the gather path compute the same sparse-graph attention."""
    m = _attn(gated=True, top_k=top_k, topk_impl=impl)
    x, pad = _inputs()
    x.requires_grad_(True)
    for mask in (None, pad):
        out, _ = m(x, mask)
        ref, _ = attention_reference(m, x, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        (g_out,) = torch.autograd.grad(out.square().sum(), x)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


def test_auto_topk_impl_switches_to_gather_past_the_mask_budget() -> None:
    m = _attn(top_k=3, mask_budget=3 * H * T * T)
    assert m._topk_impl(3, T) == "mask"
    assert m._topk_impl(4, T) == "gather"


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_flex_topk_forward_matches_reference(top_k: int) -> None:
    """The CUDA default (FlexAttention score_mod) computes the same graph; forward on CPU.

    FlexAttention has no CPU backward, so its gradients are checked on the GPU by
    ``bench.train_bench --check-flex`` against the mask path.
    """
    m = _attn(gated=True, top_k=top_k, topk_impl="flex")
    x, pad = _inputs()
    with torch.no_grad():
        for mask in (None, pad):
            out, _ = m(x, mask)
            ref, _ = attention_reference(m, x, mask, tie_margin=TIE_MARGIN)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
