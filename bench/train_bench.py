"""Backbone training throughput (MFU) and FP8-vs-bf16 training, on one GPU.

    python -m bench.train_bench mfu   # d=1024, 12 layers, seq 512: dense vs MoE+DGA
    python -m bench.train_bench fp8   # d=2048, FFN 8192: bf16 vs FP8 (torchao), memory vs fp32
    python -m bench.train_bench ddp2  # 1 vs 2 GPUs: DDP and FSDP2 throughput, memory, losses
    python -m bench.train_bench fsdp2-1gpu  # FSDP2 via the engine vs unsharded, one GPU

The task is a token-level language-model-style objective on synthetic token ids
(embedding -> backbone -> vocabulary head, cross-entropy against a fixed random
"teacher" mapping of the input), so loss curves are meaningful and comparable.

MFU = model FLOPs per second / 989 TFLOP/s (H200 dense bf16 datasheet peak). Model
FLOPs per token = 6 * active matmul parameters (head included, embeddings excluded)
+ 12 * n_layers * d_model * seq_len (attention scores and values, forward + backward);
for MoE layers only the k routed and the shared experts count (active parameters);
the DGA top-k still computes all T x T logits, which is what is counted.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import H200_BF16_PEAK_FLOPS, record, sync
from core.backbone import Backbone
from core.config import AttentionConfig, BackboneConfig, MoEConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class LMBench(nn.Module):
    def __init__(self, cfg: BackboneConfig, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.backbone = Backbone(cfg)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.embed(ids_BT)).last_hidden)


def active_matmul_params(model: LMBench) -> int:
    """Matmul parameters a token touches: dense weights + k/E of routed experts + head."""
    total = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith("embed"):
            continue
        if name.endswith(("w1_EFD", "w3_EFD", "w2_EDF")):
            E = p.shape[0]
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            total += p.numel() * mod.top_k // E
        else:
            total += p.numel()
    return total


def model_flops_per_token(model: LMBench, cfg: BackboneConfig, seq: int) -> float:
    return 6 * active_matmul_params(model) + 12 * cfg.n_layers * cfg.d_model * seq


def make_batch(
    vocab: int, batch: int, seq: int, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    # learnable target: a fixed function of the current and previous token
    prev = torch.roll(ids, 1, dims=1)
    target = (ids * 31 + prev * 17) % vocab
    return ids, target


@dataclass
class RunResult:
    step_ms: float
    tokens_per_s: float
    losses: list[float]
    peak_mem_gb: float


def train_run(
    model: nn.Module,
    steps: int,
    warmup: int,
    batch: int,
    seq: int,
    vocab: int,
    autocast_dtype: torch.dtype | None,
    compile_: bool,
    lr: float = 3e-4,
    seed: int = 0,
    profile: bool = False,
) -> RunResult:
    dev = next(model.parameters()).device.type
    cuda = dev == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), fused=cuda)
    fn = torch.compile(model) if compile_ else model
    gen = torch.Generator(device=dev).manual_seed(seed)
    losses, times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        ids, target = make_batch(vocab, batch, seq, dev, gen)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = fn(ids)
            loss = nn.functional.cross_entropy(logits.float().view(-1, vocab), target.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step >= warmup:
            sync()  # whole optimizer steps are timed: per-step sync costs <1% at these sizes
            times.append((time.perf_counter() - t0) * 1e3)
    sync()
    if profile and cuda:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                ids, target = make_batch(vocab, batch, seq, dev, gen)
                with torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = nn.functional.cross_entropy(
                        fn(ids).float().view(-1, vocab), target.view(-1)
                    )
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=18, max_name_column_width=70
            )
        )
    times.sort()
    step_ms = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return RunResult(step_ms, batch * seq / (step_ms / 1e3), [float(v) for v in losses], peak)


def cmd_mfu(args: argparse.Namespace) -> None:
    d, L, seq, vocab = (1024, 12, 512, 8192) if not args.tiny else (64, 2, 64, 256)
    variants = {
        "mfu_dense": BackboneConfig(
            d_model=d,
            n_layers=L,
            ffn_hidden=4096,
            attention=AttentionConfig(n_heads=16, gated=False, top_k=None),
            moe=None,
        ),
        "mfu_moe_dga": BackboneConfig(
            d_model=d,
            n_layers=L,
            ffn_hidden=4096,
            attention=AttentionConfig(
                n_heads=16, gated=True, top_k=args.top_k, topk_impl=args.topk_impl
            ),
            moe=MoEConfig(n_routed_experts=64, top_k=6, n_shared_experts=2, expert_hidden=512),
            n_dense_layers=1,
        ),
    }
    dense_attn = AttentionConfig(n_heads=16, gated=False, top_k=None)
    moe_cfg = MoEConfig(n_routed_experts=64, top_k=6, n_shared_experts=2, expert_hidden=512)
    # Coarser routing: 16 experts of width 1024, k=3, one shared expert (the same 4,096
    # active FFN width), so each grouped GEMM gets ~3,072 rows per expert instead of ~1,536.
    coarse = MoEConfig(n_routed_experts=16, top_k=3, n_shared_experts=1, expert_hidden=1024)
    variants["mfu_moe_dga_coarse"] = BackboneConfig(
        d_model=d,
        n_layers=L,
        ffn_hidden=4096,
        attention=AttentionConfig(
            n_heads=16, gated=True, top_k=args.top_k, topk_impl=args.topk_impl
        ),
        moe=coarse,
        n_dense_layers=1,
    )
    # Diagnostics: one component at a time, to see where MoE+DGA loses against dense.
    variants["mfu_diag_moe_only"] = BackboneConfig(
        d_model=d, n_layers=L, ffn_hidden=4096, attention=dense_attn, moe=moe_cfg, n_dense_layers=1
    )
    variants["mfu_diag_dga_gated_only"] = BackboneConfig(
        d_model=d,
        n_layers=L,
        ffn_hidden=4096,
        attention=AttentionConfig(n_heads=16, gated=True),
        moe=None,
    )
    variants["mfu_diag_dga_topk_only"] = BackboneConfig(
        d_model=d,
        n_layers=L,
        ffn_hidden=4096,
        attention=AttentionConfig(
            n_heads=16, gated=True, top_k=args.top_k, topk_impl=args.topk_impl
        ),
        moe=None,
    )
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants}
    for key, cfg in variants.items():
        torch.manual_seed(0)
        model = LMBench(cfg, vocab).to(DEVICE)
        fpt = model_flops_per_token(model, cfg, seq)
        res = train_run(
            model,
            args.steps,
            args.warmup,
            args.batch,
            seq,
            vocab,
            torch.bfloat16,
            not args.no_compile,
            profile=args.profile,
        )
        mfu = fpt * res.tokens_per_s / H200_BF16_PEAK_FLOPS
        record(
            "core",
            key,
            mfu,
            {
                "d_model": d,
                "n_layers": L,
                "seq_len": seq,
                "batch": args.batch,
                "vocab": vocab,
                "precision": "bf16-mixed (autocast, fp32 master weights)",
                "compiled": not args.no_compile,
                "attention": vars(cfg.attention),
                "moe": vars(cfg.moe) if cfg.moe else None,
                "flops_per_token": fpt,
                "active_matmul_params": active_matmul_params(model),
                "step_ms": res.step_ms,
                "tokens_per_s": res.tokens_per_s,
                "peak_mem_gb": res.peak_mem_gb,
                "peak_flops": H200_BF16_PEAK_FLOPS,
                "loss_first": res.losses[0],
                "loss_last": res.losses[-1],
            },
        )
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def cmd_fp8(args: argparse.Namespace) -> None:
    from core.precision import Float8LinearFilter, convert_to_float8

    vocab, seq = 8192, args.seq
    results = {}
    for d, ffn in [tuple(map(int, w.split(":"))) for w in args.widths]:
        cfg = BackboneConfig(
            d_model=d,
            n_layers=args.layers,
            ffn_hidden=ffn,
            attention=AttentionConfig(n_heads=max(1, d // 128), gated=False, top_k=None),
            moe=None,
        )
        runs = {}
        # Below the filter's size floor the default converts nothing (FP8 == bf16); we then
        # force FP8 on every 16-aligned linear to show what it would cost there.
        default_converts = min(d, ffn) >= args.min_features
        modes = ["bf16", "fp8"] + (["fp32"] if d == 2048 else [])
        for mode in modes:
            torch.manual_seed(0)
            model = LMBench(cfg, vocab).to(DEVICE)
            n_fp8 = 0
            if mode in ("bf16", "fp8"):
                model = model.to(torch.bfloat16)  # bf16-true, as the FP8 recipe runs
            if mode == "fp8":
                floor = args.min_features if default_converts else 16
                flt = Float8LinearFilter(min_features=floor, exclude=("head",))
                n_fp8 = len(convert_to_float8(model, "torchao", flt))
            # fp32 is only the memory reference: fewer steps
            steps = args.steps if mode != "fp32" else 5
            res = train_run(
                model, steps, args.warmup, args.batch, seq, vocab, None, True, lr=args.lr
            )
            runs[mode] = res
            print(
                f"d={d} ffn={ffn} {mode}: {res.step_ms:.1f} ms/step {res.tokens_per_s:,.0f} tok/s "
                f"peak {res.peak_mem_gb:.2f} GB fp8 layers {n_fp8} loss {res.losses[0]:.3f}->{res.losses[-1]:.3f}",
                flush=True,
            )
            del model
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        speed = runs["fp8"].tokens_per_s / runs["bf16"].tokens_per_s
        tail = max(5, args.steps // 5)
        lb = sum(runs["bf16"].losses[-tail:]) / tail
        lf = sum(runs["fp8"].losses[-tail:]) / tail
        results[(d, ffn)] = speed
        details = {
            "d_model": d,
            "ffn_hidden": ffn,
            "n_layers": args.layers,
            "seq_len": seq,
            "batch": args.batch,
            "steps": args.steps,
            "bf16_tokens_per_s": runs["bf16"].tokens_per_s,
            "fp8_tokens_per_s": runs["fp8"].tokens_per_s,
            "bf16_final_loss_mean": lb,
            "fp8_final_loss_mean": lf,
            "final_loss_rel_diff": abs(lf - lb) / lb,
            "bf16_loss_curve": runs["bf16"].losses[:: max(1, len(runs["bf16"].losses) // 20)],
            "fp8_loss_curve": runs["fp8"].losses[:: max(1, len(runs["fp8"].losses) // 20)],
            "fp8_recipe": "torchao tensorwise dynamic, bf16-true, compiled",
            "filter_min_features": args.min_features,
        }
        key = "fp8_vs_bf16_speedup" if d == 2048 else f"fp8_vs_bf16_speedup_d{d}"
        record("core", key, speed, details)
        if "fp32" in runs:
            saving = (
                1
                - max(runs["bf16"].peak_mem_gb, runs["fp8"].peak_mem_gb) / runs["fp32"].peak_mem_gb
            )
            record(
                "core",
                "mem_saving_vs_fp32",
                saving,
                {
                    "fp32_peak_gb": runs["fp32"].peak_mem_gb,
                    "bf16_peak_gb": runs["bf16"].peak_mem_gb,
                    "fp8_peak_gb": runs["fp8"].peak_mem_gb,
                    "d_model": d,
                    "ffn_hidden": ffn,
                    "definition": "1 - max(bf16-true, fp8) peak / fp32 peak, same model/batch, AdamW",
                },
            )


def cmd_check_flex(args: argparse.Namespace) -> None:
    """GPU parity of the flex top-k path: float32 vs the reference, bf16 vs the mask path."""
    from bench.attention_bench import parity

    torch.manual_seed(0)
    x = torch.randn(8, 512, 1024, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    res = parity(x, top_k=64)
    print(res)
    assert res["flex_fp32_vs_reference_rel_err"] < 1e-4, "flex top-k disagrees with the reference"


def cmd_ddp2(args: argparse.Namespace) -> None:
    """1 vs 2 GPUs, DDP and FSDP2: implemented in :func:`bench.scale_bench.cmd_ddp2`."""
    from bench.scale_bench import cmd_ddp2 as run

    run(args)


def cmd_fsdp2_one_gpu(args: argparse.Namespace) -> None:
    """FSDP2 vs unsharded on one device: implemented in :func:`bench.scale_bench.cmd_fsdp2_one_gpu`."""
    from bench.scale_bench import cmd_fsdp2_one_gpu as run

    run(args)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mfu")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--warmup", type=int, default=5)
    m.add_argument("--top-k", type=int, default=64)
    m.add_argument("--topk-impl", default="auto", choices=["auto", "mask", "flex", "gather"])
    m.add_argument("--no-compile", action="store_true")
    m.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes")
    m.add_argument("--variants", nargs="*", default=None, help="subset of variant keys to run")
    m.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of each variant"
    )
    sub.add_parser("check-flex")
    f = sub.add_parser("fp8")
    f.add_argument("--widths", nargs="*", default=["2048:8192", "1024:4096", "512:2048"])
    f.add_argument("--layers", type=int, default=4)
    f.add_argument("--seq", type=int, default=1024)
    f.add_argument("--batch", type=int, default=16)
    f.add_argument("--steps", type=int, default=60)
    f.add_argument("--warmup", type=int, default=5)
    f.add_argument("--lr", type=float, default=3e-4)
    f.add_argument("--min-features", type=int, default=1024)
    dd = sub.add_parser("ddp2", help="1 vs 2 GPUs: DDP / FSDP2 throughput, memory, losses")
    dd.add_argument("--d-model", type=int, default=1024)
    dd.add_argument("--layers", type=int, default=8)
    dd.add_argument("--seq", type=int, default=512)
    dd.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    dd.add_argument("--large-batch", type=int, default=64, help="second weak-scaling batch")
    dd.add_argument("--steps", type=int, default=60, help="steps of the loss-curve runs")
    dd.add_argument("--warmup", type=int, default=5)
    dd.add_argument("--tiny", action="store_true", help="CPU gloo smoke check")
    dd.add_argument(
        "--fp8-compile", action="store_true", help="also FSDP2 + FP8 (torchao) + compile"
    )
    dd.add_argument(
        "--engine-only",
        action="store_true",
        help="only the engine (Lightning FSDP2) runs, plus its weak scaling at --large-batch",
    )
    one = sub.add_parser("fsdp2-1gpu", help="FSDP2 (+FP8, compile) vs unsharded on one GPU")
    one.add_argument("--d-model", type=int, default=1024)
    one.add_argument("--layers", type=int, default=8)
    one.add_argument("--seq", type=int, default=512)
    one.add_argument("--batch", type=int, default=16, help="half the sequences per step")
    one.add_argument("--steps", type=int, default=60)
    one.add_argument("--warmup", type=int, default=5)
    one.add_argument("--fp8-compile", action="store_true")
    one.add_argument(
        "--separate", action="store_true", help="also bf16 + compile and FP8 without compile"
    )
    one.add_argument("--tiny", action="store_true", help="CPU smoke check")
    args = p.parse_args()
    t0 = time.time()
    cmds = {
        "mfu": cmd_mfu,
        "fp8": cmd_fp8,
        "check-flex": cmd_check_flex,
        "ddp2": cmd_ddp2,
        "fsdp2-1gpu": cmd_fsdp2_one_gpu,
    }
    cmds[args.cmd](args)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
