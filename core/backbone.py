"""The Keel transformer encoder: pre-norm blocks of [dynamic graph attention, MoE or dense FFN].

Tokens come from an adapter (``core.adapters``), which also supplies positions; the
backbone itself is permutation-equivariant. Block ``i``:

.. code-block:: text

    h = x + Dropout(DGA(Norm(x)))
    y = h + Dropout(FFN(Norm(h)))        FFN = MoEFeedForward if cfg.is_moe_layer(i) else SwiGLU

followed by a final norm. Init: every projection ~ N(0, init_std) except the residual
output projections (attention W_o, FFN/expert w2), which get init_std / sqrt(2 * n_layers)
so the residual stream's variance does not grow with depth (GPT-2 / Megatron).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from core.attention import DynamicGraphAttention
from core.config import BackboneConfig
from core.ffn import SwiGLU
from core.moe import MoEFeedForward
from core.norms import build_norm


@dataclass
class BackboneOutput:
    """What :meth:`Backbone.forward` returns.

    ``last_hidden`` [B, T, D] after the final norm. ``hidden_states``: the input embeddings
    then each block's output (n_layers + 1 tensors, before the final norm) when asked,
    else ``None``. ``gates``: per layer [B, H, T] when asked (``None`` for an ungated
    layer), else ``None``. ``load_balance``: [n_moe_layers] max/mean tokens per expert of
    this forward, per MoE layer (1.0 = perfect balance); ``None`` without MoE layers.
    """

    last_hidden: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None
    gates: list[torch.Tensor | None] | None = None
    load_balance: torch.Tensor | None = None


class Block(nn.Module):
    """One pre-norm block: attention then feed-forward, each on a residual branch."""

    def __init__(self, cfg: BackboneConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = DynamicGraphAttention(cfg.d_model, cfg.attention)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn: nn.Module = (
            MoEFeedForward(cfg.d_model, cfg.moe)
            if self.is_moe
            else SwiGLU(cfg.d_model, cfg.ffn_hidden)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        padding_mask_BT: torch.Tensor | None = None,
        return_gates: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a_BTD, g_BHT = self.attn(self.attn_norm(x_BTD), padding_mask_BT, return_gates)
        x_BTD = x_BTD + self.dropout(a_BTD)
        h_BTD = self.ffn_norm(x_BTD)
        f_BTD = self.ffn(h_BTD, padding_mask_BT) if self.is_moe else self.ffn(h_BTD)
        return x_BTD + self.dropout(f_BTD), g_BHT


class Backbone(nn.Module):
    """Stack of :class:`Block` plus a final norm; see the module docstring."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * max(self.cfg.n_layers, 1))
        for block in self.blocks:
            block.attn.reset_parameters(std, out_std)
            block.ffn.reset_parameters(std, out_std)
            block.attn_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()

    def forward(
        self,
        x_BTD: torch.Tensor,
        padding_mask_BT: torch.Tensor | None = None,
        *,
        return_hidden: bool = False,
        return_gates: bool = False,
    ) -> BackboneOutput:
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"Backbone expects tokens [B, T, {self.cfg.d_model}], got {tuple(x_BTD.shape)}"
            )
        if padding_mask_BT is not None and padding_mask_BT.shape != x_BTD.shape[:2]:
            raise ValueError(
                f"padding_mask_BT must be [B, T] = {tuple(x_BTD.shape[:2])},"
                f" got {tuple(padding_mask_BT.shape)}"
            )
        hidden = [x_BTD] if return_hidden else None
        gates: list[torch.Tensor | None] | None = [] if return_gates else None
        for block in self.blocks:
            x_BTD, g_BHT = block(x_BTD, padding_mask_BT, return_gates)
            if hidden is not None:
                hidden.append(x_BTD)
            if gates is not None:
                gates.append(g_BHT)
        moe = list(self.moe_layers())
        load_balance = torch.stack([m.last_load_balance for m in moe]) if moe else None
        return BackboneOutput(self.norm(x_BTD), hidden, gates, load_balance)

    # ------------------------------------------------------------------ MoE helpers
    def moe_layers(self) -> Iterator[MoEFeedForward]:
        """The MoE feed-forward modules, in depth order (for bias updates and logging)."""
        for block in self.blocks:
            if isinstance(block.ffn, MoEFeedForward):
                yield block.ffn

    # ------------------------------------------------------------------ accounting
    def count_params(self, total: bool = True) -> int:
        """All parameters (``total=True``) or only those used per token (see below)."""
        if not total:
            return self.count_active_params()
        return sum(p.numel() for p in self.parameters())

    def count_active_params(self) -> int:
        """Parameters a token touches: everything except the routed experts it skips.

        Per MoE layer only ``top_k`` of the ``n_routed_experts`` routed experts count (the
        shared experts and router always do).
        """
        inactive = 0
        for moe in self.moe_layers():
            inactive += (moe.n_experts - moe.top_k) * moe.expert_params()
        return self.count_params(total=True) - inactive

    def matmul_params_per_token(self) -> int:
        """Active weights used in matmuls per token (norm weights and biases excluded)."""
        n = 0
        for block in self.blocks:
            n += block.attn.qkv.weight.numel() + block.attn.out_proj.weight.numel()
            if block.attn.gate is not None:
                n += block.attn.gate.weight.numel()
            if isinstance(block.ffn, MoEFeedForward):
                moe = block.ffn
                n += moe.router.weight.numel() + moe.top_k * moe.expert_params()
                if moe.shared is not None:
                    n += sum(p.numel() for p in moe.shared.parameters())
            else:
                n += sum(p.numel() for p in block.ffn.parameters())
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) for MFU estimates.

        ``6 * N_active + 6 * L * D * (T + T_v)``: 6 FLOPs per active matmul weight (2
        forward, 4 backward: PaLM appendix B), plus attention's two activation matmuls
        per layer: scores q.k over T keys and the weighted sum of values over T_v keys,
        each 2*D FLOPs per key forward, times 3 for backward. T_v = T for dense attention,
        min(top_k, T) with top-k (the scores still cost T). Dense: ``6N + 12 L D T``.
        """
        T = seq_len
        top_k = self.cfg.attention.top_k
        t_v = T if top_k is None else min(top_k, T)
        attn = 6 * self.cfg.n_layers * self.cfg.d_model * (T + t_v)
        return float(6 * self.matmul_params_per_token() + attn)
