"""The top-k threshold op (CPU path = the reference the CUDA kernel is checked against)."""

import torch

from core.topk_threshold import keep_threshold, topk_threshold, topk_threshold_reference


def _qk(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 20, 8, generator=g), torch.randn(2, 3, 24, 8, generator=g)


def test_threshold_is_kth_largest_logit() -> None:
    q, k = _qk()
    logits = q @ k.transpose(-2, -1) / 8**0.5
    for top_k in (1, 5, 24):
        thr = topk_threshold(q, k, top_k, None)
        expected = logits.sort(dim=-1, descending=True).values[..., top_k - 1]
        torch.testing.assert_close(thr, expected, rtol=0, atol=1e-6)


def test_keep_threshold_keeps_exactly_k_real_keys() -> None:
    q, k = _qk(1)
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 10:] = True
    logits = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(pad[:, None, None, :], float("-inf"))
    thr = keep_threshold(q, k, 4, pad)
    kept = (logits >= thr.unsqueeze(-1)).sum(-1)
    assert torch.equal(kept, torch.full_like(kept, 4))
    # fewer real keys than k: the threshold is -inf, every real key stays
    thr_all = keep_threshold(q, k, 12, pad)
    assert torch.isinf(thr_all[1]).all() and (thr_all[1] < 0).all()


def test_custom_op_matches_reference_under_compile() -> None:
    q, k = _qk(2)
    fn = torch.compile(lambda a, b: topk_threshold(a, b, 3, None), backend="eager")
    torch.testing.assert_close(fn(q, k), topk_threshold_reference(q, k, 3))
