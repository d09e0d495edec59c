"""Diagnostic: where a flex top-k mismatch comes from (threshold kernel vs fused kernel vs tie margin).

    python -m bench.flex_parity_diag   # CUDA, float32, B=4, T=512, D=1024, 16 heads, k=64

Prints the threshold kernel vs the float32 torch.topk reference, compiled vs eager
FlexAttention under the same threshold, and the module (with its tie margin) vs an exact
top-k softmax. Used for the parity paragraph in BENCHMARKS.md.
"""

import torch

from core.attention import DynamicGraphAttention, attention_reference, flex_topk_attention
from core.config import AttentionConfig
from core.topk_threshold import topk_threshold, topk_threshold_reference

torch.manual_seed(0)
x = torch.randn(4, 512, 1024, device="cuda")
cfg = AttentionConfig(n_heads=16, gated=True, top_k=64, topk_impl="flex")
m = DynamicGraphAttention(1024, cfg).cuda()


def rel(a, b):
    return float((a - b).norm() / b.norm())


with torch.no_grad():
    q, k, v = m._project(x)
    t1 = topk_threshold(q, k, 64, None)
    t0 = topk_threshold_reference(q, k, 64)
    print(
        "thr fp32 kernel vs ref max abs",
        float((t1 - t0).abs().max()),
        "scale",
        float(t0.abs().mean()),
    )
    ref, _ = attention_reference(m, x)
    y_c, _ = torch.compile(m)(x)
    print("compiled flex vs ref", rel(y_c, ref))
    fo = flex_topk_attention(q, k, v, 64)  # eager unfused flex
    from torch.nn.attention.flex_attention import flex_attention

    kth = t0

    def sm(score, b, h, qi, ki):
        return torch.where(score >= kth[b, h, qi], score, -float("inf"))

    fc = torch.compile(flex_attention)(q, k, v, score_mod=sm)
    fe = flex_attention(q, k, v, score_mod=sm)
    print("flex compiled vs eager, same ref threshold", rel(fc, fe))
    lg = (q @ k.transpose(-2, -1)) / 8.0
    w = torch.softmax(lg.masked_fill(lg < kth[..., None], -float("inf")), -1)
    print("eager flex vs manual", rel(fe, w @ v), "kernel-thr eager flex vs manual", rel(fo, w @ v))
    torch.backends.cuda.matmul.allow_tf32 = True
    print(
        "allow_tf32 on, manual in tf32 vs manual ieee:",
        rel(
            torch.softmax(
                ((q @ k.transpose(-2, -1)) / 8.0).masked_fill(lg < kth[..., None], -float("inf")),
                -1,
            )
            @ v,
            w @ v,
        ),
    )
