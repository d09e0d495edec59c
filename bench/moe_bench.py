"""MoE layer forward+backward: grouped dispatch vs the per-expert loop vs a dense FFN.

Issue #2 setting: E=64 routed experts, k=6, D=768, expert width F=512, 16,384 tokens,
bf16. The dense baseline is a SwiGLU with the same *active* FLOPs: hidden = (k + S) * F
(the shared experts are dense work in both). Grouped and dense run under torch.compile;
the loop reference runs eagerly (its data-dependent shapes are what it is).

    python -m bench.moe_bench [--tokens 16384] [--shared 2] [--no-compile]

Writes ``moe_grouped_vs_loop_speedup`` (loop time / grouped time) and
``moe_grouped_vs_dense_ratio`` (grouped time / dense time) to bench/results/core.json.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import record, time_fn
from core.config import MoEConfig
from core.ffn import SwiGLU
from core.moe import MoEFeedForward, moe_reference_forward


def fwd_bwd(fn, x):  # noqa: ANN001
    def step() -> None:
        x.grad = None
        y = fn(x)
        y.float().square().mean().backward()

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--shared", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    cfg = MoEConfig(
        n_routed_experts=args.experts,
        top_k=args.top_k,
        n_shared_experts=args.shared,
        expert_hidden=args.expert_hidden,
    )
    moe = MoEFeedForward(args.d_model, cfg).to(dev, dtype)
    dense = SwiGLU(args.d_model, (args.top_k + args.shared) * args.expert_hidden).to(dev, dtype)
    x = torch.randn(1, args.tokens, args.d_model, device=dev, dtype=dtype, requires_grad=True)
    assert moe.uses_grouped_mm(x.view(-1, args.d_model)), (
        "grouped_mm not available for this setting"
    )

    compile_ = (lambda m: torch.compile(m)) if not args.no_compile else (lambda m: m)
    grouped_fn = compile_(moe)
    dense_fn = compile_(dense)

    def loop_fn(t: torch.Tensor) -> torch.Tensor:
        return moe_reference_forward(moe, t)

    # correctness on this very input before timing (bf16 tolerance)
    with torch.no_grad():
        ref = loop_fn(x)
        got = grouped_fn(x)
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 2e-2, f"grouped vs loop relative error {rel}"

    t_grouped = time_fn(fwd_bwd(grouped_fn, x), warmup=5, reps=args.reps)
    t_loop = time_fn(fwd_bwd(loop_fn, x), warmup=2, reps=max(5, args.reps // 4))
    t_dense = time_fn(fwd_bwd(dense_fn, x), warmup=5, reps=args.reps)
    active_flops = (
        3 * 2 * args.tokens * 3 * args.d_model * args.expert_hidden * (args.top_k + args.shared)
    )
    details = {
        "tokens": args.tokens,
        "d_model": args.d_model,
        "experts": args.experts,
        "top_k": args.top_k,
        "expert_hidden": args.expert_hidden,
        "shared": args.shared,
        "dtype": "bf16",
        "compiled": not args.no_compile,
        "grouped_ms": t_grouped["median_ms"],
        "loop_ms": t_loop["median_ms"],
        "dense_ms": t_dense["median_ms"],
        "grouped_tflops": active_flops / t_grouped["median_ms"] / 1e9,
        "dense_tflops": active_flops / t_dense["median_ms"] / 1e9,
        "grouped_vs_loop_rel_err": rel,
        "load_balance_max_over_mean": float(moe.last_load_balance),
    }
    suffix = "" if args.shared == 2 and args.tokens == 16384 else f"_s{args.shared}_t{args.tokens}"
    record(
        "core",
        "moe_grouped_vs_loop_speedup" + suffix,
        t_loop["median_ms"] / t_grouped["median_ms"],
        details,
    )
    record(
        "core",
        "moe_grouped_vs_dense_ratio" + suffix,
        t_grouped["median_ms"] / t_dense["median_ms"],
        details,
    )


if __name__ == "__main__":
    main()
