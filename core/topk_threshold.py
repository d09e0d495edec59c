"""Per-query top-k threshold of attention logits: the k-th largest ``q . k / sqrt(d)``.

The DGA top-k graph keeps, for each query, the keys whose logit is at least that query's
k-th largest logit. Only the threshold [B, H, T] is needed to apply the graph inside a
fused attention kernel (FlexAttention ``score_mod``), so materialising the [B, H, T, S]
logits in memory and running ``torch.topk`` over them (what the readable path does) is
pure overhead: on an H200 at B=32, H=16, T=S=512 it was most of the top-k cost.

:func:`topk_threshold` is a ``torch.library`` custom op:

* CUDA (head width a power of two in [16, 256], S <= 1024): one Triton kernel per
  (query block, batch*head) computes the logit tile ``Q_blk K^T`` in float32 registers
  and finds each row's k-th largest by radix select on the float bits (int32 compare-and-
  count passes settling one bit, or two when S <= 512, each; ending early once every row
  of the block has split its top k from the rest; a bitonic ``tl.sort`` measured slower
  than ``torch.topk``). Nothing of size T x S touches memory.
* elsewhere (CPU, other shapes): float32 logits and ``torch.topk``, the reference.

Both score in float32 from the same (bf16 or fp32) q and k, as FlexAttention does, so the
kernel and the attention agree on which keys clear the threshold up to summation order;
callers subtract a tiny margin (:data:`TIE_MARGIN`) so the k-th key itself, whose score
the attention kernel may round a hair lower, is never lost.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Relative margin below the k-th logit that still counts as kept: ten times the float32
# summation-order differences between this kernel and the attention kernel (~1e-7), far
# below the typical gap between neighbouring order statistics of the logits (~1e-2 on an
# H200 check at T=512, k=64), so an extra key is kept only in a near-exact tie.
TIE_MARGIN = 1e-6

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU wheel
    _HAS_TRITON = False


def topk_threshold_reference(
    q_BHTd: Tensor, k_BHSd: Tensor, top_k: int, key_pad_BS: Tensor | None = None
) -> Tensor:
    """Readable reference: float32 logits, ``topk``, smallest kept value. [B, H, T] float32."""
    scale = 1.0 / math.sqrt(q_BHTd.shape[-1])
    logits_BHTS = torch.matmul(q_BHTd.float(), k_BHSd.float().transpose(-2, -1)) * scale
    if key_pad_BS is not None:
        logits_BHTS = logits_BHTS.masked_fill(key_pad_BS[:, None, None, :], float("-inf"))
    k = min(top_k, logits_BHTS.shape[-1])
    return logits_BHTS.topk(k, dim=-1, sorted=False).values.amin(dim=-1)


if _HAS_TRITON:

    @triton.jit
    def _threshold_kernel(
        Q,
        K,
        PAD,
        OUT,
        sqb,
        sqh,
        sqt,
        sqd,
        skb,
        skh,
        sks,
        skd,
        spb,
        sps,
        H,
        T,
        S,
        scale,
        TOPK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HEAD_D: tl.constexpr,
        HAS_PAD: tl.constexpr,
        IEEE: tl.constexpr,
        TWO_BITS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, HEAD_D)
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
            mask=offs_m[:, None] < T,
            other=0.0,
        )
        k = tl.load(
            K + b * skb + h * skh + offs_s[:, None] * sks + offs_d[None, :] * skd,
            mask=offs_s[:, None] < S,
            other=0.0,
        )
        # float32 inputs: full-precision products (Triton's default for fp32 is TF32, whose
        # rounded logits would pick a different k-th key than the attention kernel scores)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale  # bf16/fp16 products are exact in fp32
        invalid = offs_s >= S
        if HAS_PAD:
            pad = tl.load(PAD + b * spb + offs_s * sps, mask=offs_s < S, other=1)
            invalid = invalid | (pad != 0)
        s = tl.where(invalid[None, :], float("-inf"), s)
        # Radix select on integer keys whose signed int32 order is the float order (negative
        # floats get their magnitude bits flipped). The answer is built most significant bit
        # first on the unsigned image u = key ^ INT_MIN, carried in the signed domain (setting
        # bit b of u is ``ans ^ (1 << b)``), so everything stays 32-bit: int64 keys, used at
        # first, cost two instructions per compare.
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        ans = tl.full([BLOCK_M], -2147483648, dtype=tl.int32)
        # A row is done as soon as a candidate has exactly TOPK keys at or above it: any such
        # value separates the top k from the rest, and the k-th key is then the smallest key
        # >= it. Logits are continuous, so this happens once the candidate falls in the gap
        # below the k-th key (~16 of the 32 bits); the block stops when all its rows are done.
        # A tie across the k-th/(k+1)-th boundary never splits; such a row takes all the
        # passes, which end on the k-th key itself. Rows past T are done from the start.
        done = offs_m >= T
        n_open = tl.sum((~done).to(tl.int32), axis=0)
        if TWO_BITS:
            # Two bits per pass: the three candidates' counts (each <= 512 < 2^10) are packed
            # into one int32 and summed in one cross-thread reduction: 16 reductions instead
            # of 32 for three times the compares (H200, B=32, T=S=512: 0.97 vs 1.06 ms).
            bit = 30
            while (bit >= 0) & (n_open > 0):
                c1 = ans ^ (1 << bit)
                c2 = ans ^ (2 << bit)
                c3 = ans ^ (3 << bit)
                packed = (
                    (key >= c1[:, None]).to(tl.int32)
                    + ((key >= c2[:, None]).to(tl.int32) << 10)
                    + ((key >= c3[:, None]).to(tl.int32) << 20)
                )
                tot = tl.sum(packed, axis=1)
                n1 = tot & 1023
                n2 = (tot >> 10) & 1023
                n3 = tot >> 20
                # the largest candidate still keeping >= TOPK keys (counts fall as c grows)
                best = tl.where(n3 >= TOPK, c3, tl.where(n2 >= TOPK, c2, c1))
                n_best = tl.where(n3 >= TOPK, n3, tl.where(n2 >= TOPK, n2, n1))
                take = (n_best >= TOPK) & ~done
                ans = tl.where(take, best, ans)
                done = done | (take & (n_best == TOPK))
                n_open = tl.sum((~done).to(tl.int32), axis=0)
                bit -= 2
        else:
            bit = 31
            while (bit >= 0) & (n_open > 0):
                cand = ans ^ (1 << bit)
                cnt = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
                take = (cnt >= TOPK) & ~done
                ans = tl.where(take, cand, ans)
                done = done | (take & (cnt == TOPK))
                n_open = tl.sum((~done).to(tl.int32), axis=0)
                bit -= 1
        kth = tl.min(tl.where(key >= ans[:, None], key, 2147483647), axis=1)
        kbits = kth ^ ((kth >> 31) & 0x7FFFFFFF)
        thr = kbits.to(tl.float32, bitcast=True)
        tl.store(OUT + pid_bh * T + offs_m, thr, mask=offs_m < T)


def _triton_ok(q: Tensor, k: Tensor) -> bool:
    d, S = q.shape[-1], k.shape[-2]
    return (
        _HAS_TRITON
        and q.is_cuda
        and d in (16, 32, 64, 128, 256)
        and S <= 1024
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k.dtype == q.dtype
    )


@torch.library.custom_op("keel::topk_threshold", mutates_args=())
def topk_threshold(q_BHTd: Tensor, k_BHSd: Tensor, top_k: int, key_pad_BS: Tensor | None) -> Tensor:
    """Each query's k-th largest logit, [B, H, T] float32 (``-inf`` where fewer real keys).

    No gradient: top-k selection is piecewise constant in the logits.
    """
    if not _triton_ok(q_BHTd, k_BHSd):
        return topk_threshold_reference(q_BHTd, k_BHSd, top_k, key_pad_BS)
    return _threshold_triton(q_BHTd, k_BHSd, top_k, key_pad_BS)


def _threshold_triton(
    q_BHTd: Tensor,
    k_BHSd: Tensor,
    top_k: int,
    key_pad_BS: Tensor | None,
    two_bits: bool | None = None,
) -> Tensor:
    """Launch :func:`_threshold_kernel` (CUDA tensors, or CPU ones under TRITON_INTERPRET=1).

    ``two_bits`` (default: whenever S <= 512, where three counts fit one int32) picks the
    radix pass that settles two bits per reduction."""
    B, H, T, d = q_BHTd.shape
    S = k_BHSd.shape[2]
    k = min(top_k, S)
    out = torch.empty(B, H, T, device=q_BHTd.device, dtype=torch.float32)
    block_s = max(16, triton.next_power_of_2(S))
    block_m = 16 if block_s >= 512 else 32
    if two_bits and block_s > 512:
        raise ValueError(f"two-bit radix passes need S <= 512 (counts in 10 bits), got S={S}")
    pad = key_pad_BS if key_pad_BS is not None else out  # dummy pointer when HAS_PAD=False
    spb, sps = (pad.stride(0), pad.stride(1)) if key_pad_BS is not None else (0, 0)
    grid = (triton.cdiv(T, block_m), B * H)
    _threshold_kernel[grid](
        q_BHTd,
        k_BHSd,
        pad.view(torch.uint8) if key_pad_BS is not None else pad,
        out,
        *q_BHTd.stride(),
        *k_BHSd.stride(),
        spb,
        sps,
        H,
        T,
        S,
        1.0 / math.sqrt(d),
        TOPK=k,
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        HEAD_D=d,
        HAS_PAD=key_pad_BS is not None,
        IEEE=q_BHTd.dtype == torch.float32,
        TWO_BITS=block_s <= 512 if two_bits is None else two_bits,
        num_warps=4,
    )
    return out


@topk_threshold.register_fake
def _(q_BHTd: Tensor, k_BHSd: Tensor, top_k: int, key_pad_BS: Tensor | None) -> Tensor:
    return q_BHTd.new_empty(q_BHTd.shape[:-1], dtype=torch.float32)


def keep_threshold(
    q_BHTd: Tensor, k_BHSd: Tensor, top_k: int, key_pad_BS: Tensor | None = None
) -> Tensor:
    """The threshold a fused kernel compares float32 scores with: k-th logit minus a margin."""
    kth_BHT = topk_threshold(q_BHTd.detach(), k_BHSd.detach(), top_k, key_pad_BS)
    return kth_BHT - TIE_MARGIN * kth_BHT.abs()


__all__ = ["TIE_MARGIN", "keep_threshold", "topk_threshold", "topk_threshold_reference"]
