"""The Triton top-k threshold kernel against the float32 ``torch.topk`` reference.

    python -m bench.check_threshold_kernel                       # on a CUDA GPU
    TRITON_INTERPRET=1 PYTHONPATH=<triton> python -m bench.check_threshold_kernel  # on a CPU

The second form runs the kernel in Triton's interpreter (numpy), so the kernel's logic can
be checked on a machine without a GPU: install the ``triton`` wheel into a separate folder
(``pip install --no-deps --target /tmp/tritonpkg triton``) rather than into the CPU venv.
The interpreter has no bfloat16, so it checks float16 and float32 inputs; a GPU adds bf16.

Cases: one and two radix bits per pass, exact ties across the k-th/(k+1)-th boundary (every
key duplicated, odd and even k), key padding (a row with fewer real keys than k), a last
query block that is only partly filled, k = 1, and S = 1000 (one-bit path only).
"""

from __future__ import annotations

import os

import torch

from core.topk_threshold import _threshold_triton, topk_threshold_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(
    B: int,
    H: int,
    T: int,
    S: int,
    d: int,
    k: int,
    dtype: torch.dtype,
    pad: bool = False,
    ties: bool = False,
    two_bits: bool | None = None,
) -> float:
    """Largest relative difference from the reference; raises when it exceeds 1e-5."""
    gen = torch.Generator().manual_seed(B * 1000 + T + S + k)
    q = torch.randn(B, H, T, d, generator=gen).to(DEVICE, dtype)
    keys = torch.randn(B, H, S, d, generator=gen).to(DEVICE, dtype)
    if ties:  # every odd key equals the even key before it: exact logit ties
        keys[:, :, 1::2] = keys[:, :, 0::2][:, :, : keys[:, :, 1::2].shape[2]]
    key_pad = None
    if pad:
        key_pad = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        key_pad[0, S // 2 :] = True
        key_pad[-1, 3:] = True  # fewer real keys than k: the threshold is -inf
    out = _threshold_triton(q, keys, k, key_pad, two_bits)
    ref = topk_threshold_reference(q, keys, k, key_pad)
    both_inf = torch.isinf(ref) & (out == ref)
    rel = ((out - ref).abs() / ref.abs().clamp_min(1e-6)).masked_fill(both_inf, 0.0)
    err = float(rel.max())
    name = f"B{B} H{H} T{T} S{S} d{d} k{k} {str(dtype)[6:]} pad={pad} ties={ties} two={two_bits}"
    print(f"{name}: max relative difference {err:.2e}", flush=True)
    if not err < 1e-5:
        raise AssertionError(f"{name}: kernel differs from the reference by {err:.2e}")
    return err


def main() -> None:
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 and triton on PYTHONPATH")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    for two_bits in (False, True):
        for dtype in dtypes:
            check(1, 2, 20, 64, 16, 8, dtype, two_bits=two_bits)
            check(2, 1, 33, 100, 16, 7, dtype, pad=True, two_bits=two_bits)
            check(1, 2, 16, 64, 16, 9, dtype, ties=True, two_bits=two_bits)
            check(1, 2, 16, 64, 16, 1, dtype, ties=True, two_bits=two_bits)
            check(1, 1, 32, 512, 64, 64, dtype, two_bits=two_bits)
            check(1, 1, 32, 512, 64, 65, dtype, ties=True, two_bits=two_bits)
            check(2, 1, 17, 40, 16, 1, dtype, pad=True, two_bits=two_bits)
    check(1, 1, 16, 1000, 16, 300, torch.float32)
    print("threshold kernel agrees with the reference", flush=True)


if __name__ == "__main__":
    main()
