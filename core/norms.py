"""Normalisation layers shared by the backbone and attention.

RMSNorm computes its statistics in float32 and casts back: under bf16 autocast the
mean of squares over a few hundred channels loses too many bits otherwise (litgpt and
torchtitan do the same). ``torch.compile`` fuses the casts away.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_f * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose statistics are taken in fp32 and cast back (same reason)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(
            x.dtype
        )


NORMS = ("rmsnorm", "layernorm")


def build_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """Return an ``RMSNorm`` or ``LayerNorm`` of width ``dim`` (``kind`` in :data:`NORMS`)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
