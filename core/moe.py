"""DeepSeekMoE-style sparse feed-forward with auxiliary-loss-free load balancing.

Per token ``x`` (width D), with E routed experts of width F, top-k routing and S shared
experts (DeepSeekMoE, Dai et al. 2024; routing and balancing as in DeepSeek-V3):

.. code-block:: text

    s      = sigmoid(x W_r^T)                 [E] affinity scores, computed in float32
    chosen = topk(s + b, k)                   b = expert_bias: only *selects* experts
    w_i    = route_scale * s_i / sum_{j in chosen} s_j      combine weights, unbiased
    y      = sum_{i in chosen} w_i * E_i(x) + Shared(x)
    E_i(x) = w2_i (silu(w1_i x) * w3_i x)     fine-grained SwiGLU expert
    Shared = one SwiGLU of width S * F        (S always-on experts fused into one)

No token is ever dropped (no capacity factor): every token gets exactly k routed experts.

Balance without an auxiliary loss: during training, forward adds each expert's token
count to the buffer ``tokens_per_expert``. Before each optimizer step the engine
all-reduces those counts over data-parallel ranks and calls
``update_expert_bias(counts_E)``: ``b += gamma * sign(mean(c) - c)``, then ``b -= mean(b)``
(so the bias stays zero-mean and cannot drift), and the counter is reset. Overloaded
experts become less likely to be chosen; the combine weights never see ``b``, so the
bias cannot change what the layer computes for a fixed selection. ``expert_bias`` and
``tokens_per_expert`` are persistent float32 buffers (checkpointed, never in the
optimizer; they stay float32 even when the module is cast to bf16, see ``_apply``).

Dispatch (``cfg.grouped=True``): the N*k (token, expert) assignments are sorted by expert
(``argsort``), per-expert counts come from a scatter-add (``torch.bincount`` would need a
host sync on CUDA to size its output) and their ``cumsum`` gives the group offsets, all
on device with no ``.item()``. Each projection is then ONE grouped matmul
(``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` on older torch) over the
sorted rows; results are un-permuted and summed over the k slots with the combine weights
(equivalent to a scatter-add into the tokens, but deterministic: no atomics).

Where grouped matmul cannot run (no such op, unsupported device or dtype, or sizes whose
row strides are not multiples of 16 bytes) the layer falls back to a dense vectorised
path: every expert runs on every token via one einsum per projection and the outputs are
combined with a [N, E] weight matrix that is zero outside the chosen experts. It is
exact and loop-free but costs E/k times the routed FLOPs and O(N*E*(2F+D)) memory; it
exists for odd sizes and CPU tests, not for speed. ``cfg.grouped=False`` runs
:func:`moe_reference_forward`, the readable per-expert loop (data-dependent, not for
``torch.compile``).

grouped_mm support seen (2026-11): CPU torch 2.13 runs ``F.grouped_mm`` (forward and
backward) for float32, bfloat16 and float16 when row strides are multiples of 16 bytes
(D and F multiples of 4 in fp32, of 8 in bf16/fp16); float64 is rejected. On the H200
box (torch 2.11+cu130) ``F.grouped_mm`` also exists and runs eagerly in fp32/bf16/fp16;
bf16 d=1024, F=512, E=16, k=2 over 16k tokens took 0.76 ms grouped vs 2.6 ms for the
dense fallback. Under ``torch.compile`` only bf16 traces (the meta kernel insists on it),
so fp32 compiled models take the dense fallback. Support is probed once per (device
type, dtype) and cached. Note: the output gradient must not be a stride-0 (expanded)
tensor; inside this layer it never is.

Activation checkpointing re-runs forward, which would count tokens twice; wrap only the
experts, not the router, or accept the (uniformly) doubled counts: only their sign
relative to the mean matters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.config import MoEConfig
from core.ffn import SwiGLU

GroupedMM = Callable[..., torch.Tensor]


def _find_grouped_mm() -> GroupedMM | None:
    fn = getattr(F, "grouped_mm", None)
    if fn is None:
        fn = getattr(torch, "_grouped_mm", None)
    return fn


GROUPED_MM: GroupedMM | None = _find_grouped_mm()
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_probe_cache: dict[tuple[str, torch.dtype], bool] = {}


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Run a tiny aligned grouped matmul (forward + backward) once to see if it is supported.

    The operands are fixed values, not random ones: the probe runs inside the first forward
    pass, and drawing from the global generator there shifted every later dropout mask, so
    the first model trained in a process differed from the same config trained again."""
    if GROUPED_MM is None:
        return False
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            a = torch.linspace(-1, 1, 8 * 16, device=device).reshape(8, 16).to(dtype)
            b = torch.linspace(1, -1, 2 * 16 * 16, device=device).reshape(2, 16, 16).to(dtype)
            a.requires_grad_(True)
            b.requires_grad_(True)
            offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
            out = GROUPED_MM(a, b.transpose(-2, -1), offs=offs)
            out.backward(torch.ones_like(out))
        return bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether grouped matmul runs for this device/dtype with matrices of these widths.

    Static rules first (dtype, 16-byte row strides); the (device type, dtype) probe runs
    eagerly once and is cached. Under ``torch.compile`` only bf16 qualifies (the op's
    meta kernel, which tracing uses, rejects other dtypes even where eager runs them), and
    an unprobed device is assumed supported.
    """
    if GROUPED_MM is None or dtype not in _GROUPED_MM_DTYPES:
        return False
    itemsize = dtype.itemsize
    if any((d * itemsize) % 16 for d in dims):
        return False
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False  # the op's meta kernel (used for tracing) accepts bf16 only
    key = (device.type, dtype)
    if key not in _probe_cache:
        if torch.compiler.is_compiling():
            return True
        _probe_cache[key] = _probe_grouped_mm(device, dtype)
    return _probe_cache[key]


class _PermuteTokens(torch.autograd.Function):
    """``x_ND[token_M]`` (each token copied to its k expert slots, sorted by expert).

    Autograd's backward for an index with repeated rows is a scatter-add (atomics, slow in
    bf16). Here the inverse permutation is known, so the backward is a gather of each
    token's k slot gradients and a sum over k: no atomics, deterministic.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, token_M: torch.Tensor, inv_M: torch.Tensor, k: int):  # noqa: ANN001, ANN205
        ctx.save_for_backward(inv_M)
        ctx.k = k
        return x_ND[token_M]

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # noqa: ANN001, ANN205
        (inv_M,) = ctx.saved_tensors
        N = inv_M.numel() // ctx.k
        grad_ND = grad_MD[inv_M].view(N, ctx.k, -1).sum(dim=1)
        return grad_ND, None, None, None


class _UnpermuteSlots(torch.autograd.Function):
    """``y_MD[inv_M]`` (expert outputs back to token-major slot order); a permutation, so
    its backward is the gather by the forward permutation, not a scatter."""

    @staticmethod
    def forward(ctx, y_MD: torch.Tensor, inv_M: torch.Tensor, order_M: torch.Tensor):  # noqa: ANN001, ANN205
        ctx.save_for_backward(order_M)
        return y_MD[inv_M]

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # noqa: ANN001, ANN205
        (order_M,) = ctx.saved_tensors
        return grad_MD[order_M], None, None


class MoEFeedForward(nn.Module):
    """Sparse MoE FFN: E routed SwiGLU experts (top-k, sigmoid router) + shared experts.

    ``forward(x_BTD, padding_mask_BT=None) -> y_BTD``. Padding tokens are computed (static
    shapes) but not counted in ``tokens_per_expert`` / ``last_load_balance``.
    """

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        if not 0 < cfg.top_k <= cfg.n_routed_experts:
            raise ValueError(
                f"moe.top_k={cfg.top_k} must be in 1..n_routed_experts={cfg.n_routed_experts}"
            )
        self.d_model = d_model
        self.cfg = cfg
        E, Fh = cfg.n_routed_experts, cfg.expert_hidden
        self.n_experts, self.top_k, self.expert_hidden = E, cfg.top_k, Fh
        self.router = nn.Linear(d_model, E, bias=False)
        self.w1_EFD = nn.Parameter(torch.empty(E, Fh, d_model))
        self.w3_EFD = nn.Parameter(torch.empty(E, Fh, d_model))
        self.w2_EDF = nn.Parameter(torch.empty(E, d_model, Fh))
        self.shared = SwiGLU(d_model, cfg.n_shared_experts * Fh) if cfg.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32), persistent=True)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(E, dtype=torch.float32), persistent=True
        )
        self.register_buffer(
            "last_load_balance", torch.ones((), dtype=torch.float32), persistent=False
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w1_EFD, std=std)
        nn.init.normal_(self.w3_EFD, std=std)
        nn.init.normal_(self.w2_EDF, std=std if out_std is None else out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.tokens_per_expert.zero_()
            self.last_load_balance.fill_(1.0)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module signature
        """Keep the balancing buffers float32 through ``.to(bf16)`` / ``.half()`` casts.

        A bf16 ``expert_bias`` could not resolve gamma=1e-3 steps and a bf16 counter is
        exact only up to 256 tokens.
        """
        super()._apply(fn, recurse)
        for name in ("expert_bias", "tokens_per_expert", "last_load_balance"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    # ------------------------------------------------------------------ routing
    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(scores_NE, expert_idx_NK, combine_NK)``, all routing math in float32."""
        with torch.autocast(x_ND.device.type, enabled=False):
            scores_NE = torch.sigmoid(F.linear(x_ND.float(), self.router.weight.float()))
        _, idx_NK = torch.topk(scores_NE + self.expert_bias.float(), self.top_k, dim=-1)
        chosen_NK = scores_NE.gather(1, idx_NK)
        combine_NK = chosen_NK / chosen_NK.sum(-1, keepdim=True) * self.cfg.route_scale
        return scores_NE, idx_NK, combine_NK

    @torch.no_grad()
    def _record_load(self, idx_NK: torch.Tensor, valid_N: torch.Tensor | None) -> None:
        ones_NK = torch.ones(idx_NK.shape, device=idx_NK.device, dtype=torch.float32)
        if valid_N is not None:
            ones_NK = ones_NK * valid_N.unsqueeze(1).float()
        counts_E = torch.zeros(
            self.n_experts, device=idx_NK.device, dtype=torch.float32
        ).scatter_add_(0, idx_NK.reshape(-1), ones_NK.reshape(-1))
        if self.training:
            self.tokens_per_expert.add_(counts_E)
        self.last_load_balance.copy_(counts_E.max() / counts_E.mean().clamp_min(1e-6))

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor | None = None) -> torch.Tensor:
        """``bias += gamma * sign(mean(c) - c)``; re-centre the bias; reset the counter.

        ``counts_E``: token counts per expert, already all-reduced over data-parallel ranks
        by the caller; default: this module's own ``tokens_per_expert``. Returns the step
        applied (before centring). With no counted tokens (all zero) the bias is unchanged.
        """
        counts = self.tokens_per_expert if counts_E is None else counts_E
        counts = counts.to(device=self.expert_bias.device, dtype=torch.float32)
        delta_E = self.cfg.bias_update_rate * torch.sign(counts.mean() - counts)
        self.expert_bias.add_(delta_E)
        self.expert_bias.sub_(self.expert_bias.mean())
        self.tokens_per_expert.zero_()
        return delta_E

    # ------------------------------------------------------------------ experts
    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether the grouped-matmul kernel (vs the dense fallback) serves this input."""
        return grouped_mm_supported(
            x.device, self._compute_dtype(x), self.d_model, self.expert_hidden
        )

    def _routed_grouped(
        self, x_ND: torch.Tensor, idx_NK: torch.Tensor, combine_NK: torch.Tensor
    ) -> torch.Tensor:
        N, D = x_ND.shape
        K, E = self.top_k, self.n_experts
        dt = self._compute_dtype(x_ND)
        flat_e_M = idx_NK.reshape(-1)  # M = N * K assignments
        order_M = torch.argsort(flat_e_M, stable=True)
        token_M = order_M // K
        counts_E = torch.zeros(E, device=x_ND.device, dtype=torch.int32).scatter_add_(
            0, flat_e_M, torch.ones_like(flat_e_M, dtype=torch.int32)
        )
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        inv_M = torch.empty_like(order_M).scatter_(
            0, order_M, torch.arange(order_M.numel(), device=order_M.device)
        )
        x_MD = _PermuteTokens.apply(x_ND.to(dt), token_M, inv_M, K)
        # w1 and w3 run as ONE grouped matmul of width 2F: twice the work per launch and
        # one read of x_MD instead of two, which matters at fine-grained expert widths.
        w13 = torch.cat([self.w1_EFD, self.w3_EFD], dim=1).to(dt).transpose(-2, -1)  # [E, D, 2F]
        w2 = self.w2_EDF.to(dt).transpose(-2, -1)  # [E, F, D] column-major view
        h1_MF, h3_MF = GROUPED_MM(x_MD, w13, offs=offs_E).split(self.expert_hidden, dim=-1)
        y_MD = GROUPED_MM(F.silu(h1_MF) * h3_MF, w2, offs=offs_E)
        # Un-permute (inverse of the sort) and weight-sum the k slots of each token; bmm
        # accumulates in fp32 and rounds once, without an fp32 copy of the [N, K, D] outputs.
        y_NKD = _UnpermuteSlots.apply(y_MD, inv_M, order_M).view(N, K, D)
        return torch.bmm(combine_NK.unsqueeze(1).to(y_NKD.dtype), y_NKD).squeeze(1)

    def _routed_dense(
        self, x_ND: torch.Tensor, idx_NK: torch.Tensor, combine_NK: torch.Tensor
    ) -> torch.Tensor:
        """Loop-free fallback: all experts on all tokens, zero weight outside the chosen k."""
        dt = self._compute_dtype(x_ND)
        x = x_ND.to(dt)
        h_NEF = F.silu(torch.einsum("nd,efd->nef", x, self.w1_EFD.to(dt))) * torch.einsum(
            "nd,efd->nef", x, self.w3_EFD.to(dt)
        )
        y_NED = torch.einsum("nef,edf->ned", h_NEF, self.w2_EDF.to(dt))
        weight_NE = torch.zeros(
            x_ND.shape[0], self.n_experts, device=x_ND.device, dtype=combine_NK.dtype
        ).scatter(1, idx_NK, combine_NK)
        return torch.einsum("ne,ned->nd", weight_NE, y_NED.float())

    def forward(
        self, x_BTD: torch.Tensor, padding_mask_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.cfg.grouped:
            return moe_reference_forward(self, x_BTD, padding_mask_BT)
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        _, idx_NK, combine_NK = self.route(x_ND)
        valid_N = None if padding_mask_BT is None else ~padding_mask_BT.reshape(B * T)
        self._record_load(idx_NK, valid_N)
        if self.uses_grouped_mm(x_ND):
            routed_ND = self._routed_grouped(x_ND, idx_NK, combine_NK)
        else:
            routed_ND = self._routed_dense(x_ND, idx_NK, combine_NK)
        out_ND = routed_ND.to(self._compute_dtype(x_ND))
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        return out_ND.view(B, T, D)

    # ------------------------------------------------------------------ accounting
    def expert_params(self) -> int:
        """Parameters of one routed expert (3 * D * F)."""
        return 3 * self.d_model * self.expert_hidden

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_model={self.d_model}, experts={c.n_routed_experts}, top_k={c.top_k}, "
            f"shared={c.n_shared_experts}, expert_hidden={c.expert_hidden}"
        )


def moe_reference_forward(
    module: MoEFeedForward, x_BTD: torch.Tensor, padding_mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """Readable per-expert loop over the same parameters; the ground truth for tests.

    Same routing, load recording and dtype handling as the grouped path; experts run one at
    a time on the tokens that chose them (``torch.where``: data-dependent shapes).
    """
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    _, idx_NK, combine_NK = module.route(x_ND)
    valid_N = None if padding_mask_BT is None else ~padding_mask_BT.reshape(B * T)
    module._record_load(idx_NK, valid_N)
    dt = module._compute_dtype(x_ND)
    x = x_ND.to(dt)
    routed_ND = torch.zeros(B * T, D, device=x.device, dtype=torch.float32)
    for e in range(module.n_experts):
        token_idx, slot = torch.where(idx_NK == e)
        x_e = x[token_idx]
        w1, w3, w2 = module.w1_EFD[e].to(dt), module.w3_EFD[e].to(dt), module.w2_EDF[e].to(dt)
        y_e = F.linear(F.silu(F.linear(x_e, w1)) * F.linear(x_e, w3), w2)
        weight = combine_NK[token_idx, slot].unsqueeze(1)
        routed_ND = routed_ND.index_add(0, token_idx, weight * y_e.float())
    out_ND = routed_ND.to(dt)
    if module.shared is not None:
        out_ND = out_ND + module.shared(x_ND)
    return out_ND.view(B, T, D)


def expert_param_fraction(cfg: MoEConfig) -> float:
    """Fraction of routed-expert parameters active per token (k / E)."""
    return cfg.top_k / cfg.n_routed_experts


__all__ = [
    "GROUPED_MM",
    "MoEFeedForward",
    "expert_param_fraction",
    "grouped_mm_supported",
    "moe_reference_forward",
]
