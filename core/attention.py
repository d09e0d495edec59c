r"""Dynamic graph attention (DGA): gated multi-head attention over a per-input sparse graph.

Math, for input ``x`` of shape [B, T, D], H heads of width d = D / H:

.. code-block:: text

    q, k, v     = x W_q, x W_k, x W_v                    split into heads: [B, H, T, d]
    (optional)  q, k = RMSNorm(q), RMSNorm(k)            per head ("qk_norm")
    s[b,h,i,j]  = q_i . k_j / sqrt(d)                    logits
    s[b,h,i,j]  = -inf  if key j is padding
    (top-k)     s[b,h,i,j]  = -inf  unless j is among the top_k keys of query i by s
    a[b,h,i,:]  = softmax_j(s[b,h,i,:])                  (dropout on a in training)
    o[b,h,i]    = sum_j a[b,h,i,j] v[b,h,j]
    g[b,h,i]    = sigmoid(x_i W_g + b_g)[h]              one gate per head per query
    out_i       = concat_h(g[b,h,i] * o[b,h,i]) W_o

The top-k step makes each query attend to its own ``k`` best keys, i.e. a sparse directed
graph built from the input itself (hence "dynamic graph"). The gate lets each head switch
itself off per token (attention sinks need no dummy token; see "Gated Attention for LLMs",
Qiu et al. 2025, head-wise variant). ``b_g`` starts at ``cfg.gate_bias_init`` (default 0,
gates start at 0.5, where the sigmoid is steepest so gates can open or close quickly; the
constant factor 0.5 is absorbed by W_o) and ``W_g`` at a small normal init.

Padding: a key marked True in ``padding_mask_BT`` is never attended. A sequence that is
*entirely* padding would leave its queries with no key, and softmax over all -inf is NaN;
for such rows the mask is lifted (they attend uniformly over their padding), so every
output is finite. Outputs at padded query positions are finite but meaningless.

Paths:

* ``top_k is None`` (or ``top_k >= T``, where top-k keeps every key): one call of
  ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels), gates applied to
  its per-head output afterwards. With gates off this is plain attention.
* top-k, ``topk_impl="mask"`` (``auto`` in eager mode and on CPU, while the
  [B, H, T, T] mask fits ``cfg.mask_budget``): a no-grad pass forms the logits and keeps each query's k largest as
  a boolean graph; fused SDPA then runs with that graph as its mask. No gather, tensor
  cores throughout; the per-layer cost over plain attention is one extra QK^T and a topk.
* top-k, ``topk_impl="flex"`` (what ``auto`` picks when compiled on CUDA without
  dropout): each query's k-th logit comes from one Triton kernel
  (:mod:`core.topk_threshold`) and is applied inside FlexAttention's fused kernel as a
  ``score_mod`` (see :func:`flex_topk_attention`): no logits or mask tensor in memory and
  no fallback to a slower kernel.
* top-k, ``topk_impl="gather"`` (long inputs): queries are processed in chunks of ``cfg.query_chunk_size``. For each chunk the
  logits [B, H, C, T] are formed, ``topk`` picks k per query, softmax runs over the k kept
  logits only, and the k value rows are gathered. Memory: the kept weights and indices
  are O(B*H*T*k); the logits of one chunk, O(B*H*C*T), bound the peak, so memory no longer
  grows as T^2 (the logits are not saved for backward: matmul saves q and k, topk saves
  only its indices). Compute is still O(T^2 d) for the logits plus O(T k d) for the values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.config import AttentionConfig
from core.norms import RMSNorm
from core.topk_threshold import keep_threshold


def _effective_key_padding(padding_mask_BT: torch.Tensor | None) -> torch.Tensor | None:
    """Key mask (True = do not attend) with fully-padded rows unmasked, so no row is empty."""
    if padding_mask_BT is None:
        return None
    pad_BT = padding_mask_BT.to(torch.bool)
    return pad_BT & ~pad_BT.all(dim=-1, keepdim=True)


def topk_attention(
    q_BHTd: torch.Tensor,
    k_BHSd: torch.Tensor,
    v_BHSd: torch.Tensor,
    top_k: int,
    key_pad_BS: torch.Tensor | None = None,
    query_chunk_size: int = 1024,
    dropout_p: float = 0.0,
    return_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention where each query keeps only its ``top_k`` keys by logit.

    Returns ``(out_BHTd, weights_BHTk, index_BHTk)``; the last two are ``None`` unless
    ``return_graph`` (they are the sparse graph: which keys each query attends and how much).
    ``key_pad_BS`` (True = padding) must leave at least one key per row (see
    :func:`_effective_key_padding`); if a row has fewer than ``top_k`` real keys, the extra
    kept slots are padding keys whose weight is exactly 0.
    """
    B, H, T, d = q_BHTd.shape
    S = k_BHSd.shape[2]
    k = min(top_k, S)
    scale = 1.0 / math.sqrt(d)
    v_flat_NSd = v_BHSd.reshape(B * H, S, d)
    row_N1 = torch.arange(B * H, device=q_BHTd.device).unsqueeze(1)
    outs, weights, indices = [], [], []
    for start in range(0, T, query_chunk_size):  # static trip count: T is a shape
        q_c = q_BHTd[:, :, start : start + query_chunk_size]
        C = q_c.shape[2]
        logits_BHCS = torch.matmul(q_c, k_BHSd.transpose(-2, -1)).float() * scale
        if key_pad_BS is not None:
            logits_BHCS = logits_BHCS.masked_fill(key_pad_BS[:, None, None, :], float("-inf"))
        kept_BHCk, idx_BHCk = logits_BHCS.topk(k, dim=-1)
        w_BHCk = torch.softmax(kept_BHCk, dim=-1)
        if dropout_p > 0.0:
            w_BHCk = F.dropout(w_BHCk, p=dropout_p, training=True)
        # Gather the k value rows per query through a flat index, so backward scatters into
        # [B*H, S, d] rather than materialising an expanded [B, H, C, S, d] gradient.
        v_sel_NCkd = v_flat_NSd[row_N1, idx_BHCk.reshape(B * H, C * k)].view(B * H, C, k, d)
        w_NCk = w_BHCk.reshape(B * H, C, k).to(v_sel_NCkd.dtype)
        out_NCd = torch.einsum("nck,nckd->ncd", w_NCk, v_sel_NCkd)
        outs.append(out_NCd.view(B, H, C, d))
        if return_graph:
            weights.append(w_BHCk)
            indices.append(idx_BHCk)
    out_BHTd = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    if not return_graph:
        return out_BHTd, None, None
    return out_BHTd, torch.cat(weights, dim=2), torch.cat(indices, dim=2)


@torch.no_grad()
def topk_graph_mask(
    q_BHTd: torch.Tensor,
    k_BHSd: torch.Tensor,
    top_k: int,
    key_pad_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-input sparse graph as a boolean mask [B, H, T, S]: True = query keeps key.

    Selection needs no gradient (top-k is piecewise constant in the logits), so the logits
    are formed once without autograd; the attention itself then runs in fused SDPA with
    this mask, whose gradient w.r.t. q and k flows through the kept logits exactly as in
    the gather formulation. Keys tied with a query's k-th logit are all kept (measure-zero
    for float32 logits; possible in bf16). Padding keys are never kept unless a row has
    fewer than ``top_k`` real keys (then they enter with logit -inf, i.e. weight 0).
    """
    scale = 1.0 / math.sqrt(q_BHTd.shape[-1])
    logits_BHTS = torch.matmul(q_BHTd, k_BHSd.transpose(-2, -1)) * scale
    if key_pad_BS is not None:
        logits_BHTS = logits_BHTS.masked_fill(key_pad_BS[:, None, None, :], float("-inf"))
    k = min(top_k, logits_BHTS.shape[-1])
    # unsorted top-k is enough: only the smallest kept logit (the threshold) is needed
    kth_BHT1 = logits_BHTS.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    keep_BHTS = logits_BHTS >= kth_BHT1
    if key_pad_BS is not None:
        keep_BHTS = keep_BHTS & ~key_pad_BS[:, None, None, :]
    return keep_BHTS


def flex_topk_attention(
    q_BHTd: torch.Tensor,
    k_BHSd: torch.Tensor,
    v_BHSd: torch.Tensor,
    top_k: int,
    key_pad_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k graph attention as a FlexAttention ``score_mod``: no [B, H, T, S] mask at all.

    A no-grad pass finds each query's k-th largest logit (the threshold, [B, H, T]; see
    :mod:`core.topk_threshold`); the fused flash-style kernel then drops every score below
    its query's threshold. Under ``torch.compile`` on CUDA this keeps the whole attention
    in one kernel per direction. The threshold is scored in float32, as the kernel scores,
    less a relative margin of 1e-5, so the k-th key survives float32 summation-order
    differences (keys tied with it within that margin are kept too). No dropout.
    """
    from torch.nn.attention.flex_attention import flex_attention

    # Each query's k-th largest float32 logit, minus a tie margin (core.topk_threshold):
    # one Triton kernel on CUDA, never materialising the [B, H, T, S] logits.
    kth_BHT = keep_threshold(q_BHTd, k_BHSd, top_k, key_pad_BS)
    pad_BS = key_pad_BS

    def score_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex signature
        keep = score >= kth_BHT[b, h, q_idx]
        if pad_BS is not None:
            keep = keep & ~pad_BS[b, kv_idx]
        return torch.where(keep, score, -float("inf"))

    return flex_attention(q_BHTd, k_BHSd, v_BHSd, score_mod=score_mod)


class DynamicGraphAttention(nn.Module):
    """Gated multi-head self-attention with optional per-query top-k key selection.

    ``forward(x_BTD, padding_mask_BT=None, return_gates=False) -> (out_BTD, gates_BHT | None)``;
    the gates are ``None`` when ``cfg.gated`` is off or ``return_gates`` is False.
    """

    def __init__(self, d_model: int, cfg: AttentionConfig) -> None:
        super().__init__()
        if d_model % cfg.n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={cfg.n_heads}")
        self.d_model = d_model
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.head_dim = d_model // cfg.n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, cfg.n_heads, bias=True) if cfg.gated else None
        self.q_norm = RMSNorm(self.head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if cfg.qk_norm else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) projections; ``out_std`` for W_o (the backbone scales it by depth)."""
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=std if out_std is None else out_std)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=std)
            nn.init.constant_(self.gate.bias, self.cfg.gate_bias_init)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def _project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTd, k_BHTd, v_BHTd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q_BHTd, k_BHTd = self.q_norm(q_BHTd), self.k_norm(k_BHTd)
        return q_BHTd, k_BHTd, v_BHTd

    def gates(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """``sigmoid(x W_g + b_g)`` as [B, H, T], or ``None`` when ungated."""
        if self.gate is None:
            return None
        return torch.sigmoid(self.gate(x_BTD)).transpose(1, 2)

    def _uses_topk(self, seq_len: int) -> bool:
        return self.cfg.top_k is not None and self.cfg.top_k < seq_len

    def _topk_impl(
        self, batch: int, seq_len: int, device: torch.device | None = None, dropout_p: float = 0.0
    ) -> str:
        """``auto``: flex when compiled on CUDA without dropout; else mask while the
        [B, H, T, T] mask fits the budget, else gather.

        FlexAttention is only fused under ``torch.compile`` (eagerly it materialises the
        scores and has no CPU backward), so eager and CPU runs keep the mask/gather paths.
        On an H200 (B=32, T=512, 16 heads, k=64) the compiled flex path took 3.5 ms per
        layer forward+backward against 6.0 ms for mask (``bench.attention_bench``).
        """
        if self.cfg.topk_impl != "auto":
            return self.cfg.topk_impl
        if (
            device is not None
            and device.type == "cuda"
            and dropout_p == 0.0
            and torch.compiler.is_compiling()
        ):
            return "flex"
        fits = batch * self.n_heads * seq_len * seq_len <= self.cfg.mask_budget
        return "mask" if fits else "gather"

    def forward(
        self,
        x_BTD: torch.Tensor,
        padding_mask_BT: torch.Tensor | None = None,
        return_gates: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x_BTD.shape
        q_BHTd, k_BHTd, v_BHTd = self._project(x_BTD)
        key_pad_BT = _effective_key_padding(padding_mask_BT)
        dropout_p = self.cfg.dropout if self.training else 0.0
        impl = self._topk_impl(B, T, x_BTD.device, dropout_p) if self._uses_topk(T) else None
        if impl == "flex":
            o_BHTd = flex_topk_attention(q_BHTd, k_BHTd, v_BHTd, self.cfg.top_k, key_pad_BT)
        elif impl == "mask":
            keep_BHTS = topk_graph_mask(q_BHTd, k_BHTd, self.cfg.top_k, key_pad_BT)
            o_BHTd = F.scaled_dot_product_attention(
                q_BHTd, k_BHTd, v_BHTd, attn_mask=keep_BHTS, dropout_p=dropout_p
            )
        elif impl == "gather":
            o_BHTd, _, _ = topk_attention(
                q_BHTd,
                k_BHTd,
                v_BHTd,
                self.cfg.top_k,
                key_pad_BT,
                self.cfg.query_chunk_size,
                dropout_p,
            )
            o_BHTd = o_BHTd.to(v_BHTd.dtype)
        else:
            # SDPA's boolean mask means "may attend", the opposite of our padding mask.
            attn_mask = None if key_pad_BT is None else ~key_pad_BT[:, None, None, :]
            o_BHTd = F.scaled_dot_product_attention(
                q_BHTd, k_BHTd, v_BHTd, attn_mask=attn_mask, dropout_p=dropout_p
            )
        g_BHT = self.gates(x_BTD)
        if g_BHT is not None:
            o_BHTd = o_BHTd * g_BHT.unsqueeze(-1).to(o_BHTd.dtype)
        out_BTD = self.out_proj(o_BHTd.transpose(1, 2).reshape(B, T, D))
        return out_BTD, (g_BHT if return_gates else None)

    @torch.no_grad()
    def attention_graph(
        self, x_BTD: torch.Tensor, padding_mask_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Debug/inspection hook: the dense attention weights [B, H, T, T] this layer uses.

        Runs the same kernel as ``forward`` (top-k path when it applies) and scatters the
        kept weights into a dense matrix, so zeros mark the keys a query does not attend.
        Dropout is not applied. Memory O(B*H*T^2): for inspection, not for training.
        """
        B, T, _ = x_BTD.shape
        q_BHTd, k_BHTd, v_BHTd = self._project(x_BTD)
        key_pad_BT = _effective_key_padding(padding_mask_BT)
        if self._uses_topk(T):
            _, w_BHTk, idx_BHTk = topk_attention(
                q_BHTd,
                k_BHTd,
                v_BHTd,
                self.cfg.top_k,
                key_pad_BT,
                self.cfg.query_chunk_size,
                return_graph=True,
            )
            dense = torch.zeros(B, self.n_heads, T, T, device=x_BTD.device, dtype=torch.float32)
            return dense.scatter_(-1, idx_BHTk, w_BHTk)
        logits = torch.matmul(q_BHTd, k_BHTd.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
        if key_pad_BT is not None:
            logits = logits.masked_fill(key_pad_BT[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)


def attention_reference(
    module: DynamicGraphAttention,
    x_BTD: torch.Tensor,
    padding_mask_BT: torch.Tensor | None = None,
    tie_margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable einsum version of :class:`DynamicGraphAttention` (no dropout), for tests.

    Builds all T x T logits, masks padding and (for top-k) every key whose logit is below
    the query's k-th largest, then a dense softmax. Returns ``(out_BTD, weights_BHTT)``.
    ``tie_margin``: keep keys down to ``kth - tie_margin * |kth|``, the flex path's rule
    (:data:`core.topk_threshold.TIE_MARGIN`), for exact comparisons with it.
    """
    B, T, D = x_BTD.shape
    H, d = module.n_heads, module.head_dim
    w_q, w_k, w_v = module.qkv.weight.view(3, H, d, D).unbind(0)
    q = torch.einsum("btD,hdD->bhtd", x_BTD, w_q)
    k = torch.einsum("btD,hdD->bhtd", x_BTD, w_k)
    v = torch.einsum("btD,hdD->bhtd", x_BTD, w_v)
    if module.q_norm is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    pad = _effective_key_padding(padding_mask_BT)
    if pad is not None:
        logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
    top_k = module.cfg.top_k
    if top_k is not None and top_k < T:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth - tie_margin * kth.abs(), float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    o = torch.einsum("bhij,bhjd->bhid", weights, v)
    if module.gate is not None:
        g = torch.sigmoid(
            torch.einsum("btD,hD->bht", x_BTD, module.gate.weight) + module.gate.bias[:, None]
        )
        o = o * g.unsqueeze(-1)
    out = torch.einsum("bhtd,Ehd->btE", o, module.out_proj.weight.view(D, H, d))
    return out, weights
