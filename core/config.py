"""Configuration dataclasses for the Keel backbone.

Every model in Keel is described by a :class:`BackboneConfig` (plus an app's own head
config). The config is plain data: it round-trips through ``to_dict``/``from_dict`` and
YAML so a run's model can be rebuilt from the MLflow artifact alone, without pickles.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class AttentionConfig:
    """Dynamic graph attention (DGA) settings.

    ``gated``: per-head, per-query sigmoid gates computed from the input scale each
    head's output. ``top_k``: each query keeps only its top-k keys (a sparse graph
    built per input); ``None`` keeps all keys. With ``top_k`` off the layer runs on
    ``F.scaled_dot_product_attention`` (gates, if on, scale its output per head and query).
    ``gate_bias_init``: initial gate bias; 0 starts every gate at sigmoid(0) = 0.5, where
    the sigmoid's slope is largest. ``query_chunk_size``: the top-k path processes this
    many queries at a time, bounding its peak logits memory to B * H * chunk * T.
    """

    n_heads: int = 4
    gated: bool = True
    top_k: int | None = None
    dropout: float = 0.0
    qk_norm: bool = False
    gate_bias_init: float = 0.0
    query_chunk_size: int = 1024
    # "mask": select the top-k keys with a no-grad pass over the logits, then run fused SDPA
    # with that boolean graph as its mask (tensor cores, no gather; O(B*H*T^2) bits of mask).
    # "gather": chunked top-k + gather of the k value rows (O(B*H*T*k) memory; long inputs).
    # "flex": the same threshold inside FlexAttention's fused kernel (CUDA; no dropout; opt-in).
    # "auto": "flex" when compiled on CUDA without dropout; else "mask" while the mask
    # fits ``mask_budget``, else "gather".
    topk_impl: str = "auto"
    mask_budget: int = 1 << 30

    def __post_init__(self) -> None:
        if self.n_heads < 1:
            raise ValueError(f"attention.n_heads must be >= 1, got {self.n_heads}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"attention.top_k must be None or >= 1, got {self.top_k}")
        if self.topk_impl not in ("auto", "flex", "mask", "gather"):
            raise ValueError(
                f"attention.topk_impl must be auto, flex, mask or gather, got {self.topk_impl!r}"
            )
        if self.query_chunk_size < 1:
            raise ValueError(
                f"attention.query_chunk_size must be >= 1, got {self.query_chunk_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"attention.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class MoEConfig:
    """DeepSeekMoE-style sparse feed-forward settings.

    ``n_routed_experts`` fine-grained experts of width ``expert_hidden``; each token runs
    ``top_k`` of them plus ``n_shared_experts`` always-on experts. Load balance is kept
    without an auxiliary loss: a per-expert bias, moved by ``bias_update_rate`` (gamma)
    before each optimizer step, only affects which experts are chosen.
    """

    n_routed_experts: int = 8
    top_k: int = 2
    n_shared_experts: int = 1
    expert_hidden: int = 128
    bias_update_rate: float = 1e-3
    route_scale: float = 1.0
    grouped: bool = True  # grouped-matmul dispatch; False runs the readable loop reference

    def __post_init__(self) -> None:
        if self.n_routed_experts < 1 or self.expert_hidden < 1 or self.n_shared_experts < 0:
            raise ValueError(
                "moe needs n_routed_experts >= 1, expert_hidden >= 1 and n_shared_experts >= 0;"
                f" got {self.n_routed_experts}, {self.expert_hidden}, {self.n_shared_experts}"
            )


@dataclass
class BackboneConfig:
    """The transformer encoder: pre-norm blocks of [DGA, MoE or dense FFN]."""

    d_model: int = 128
    n_layers: int = 4
    ffn_hidden: int = 512
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    n_dense_layers: int = 1  # the first layers use a dense FFN, as DeepSeekMoE does
    dropout: float = 0.0
    norm_eps: float = 1e-6
    norm: str = "rmsnorm"  # or "layernorm"
    init_std: float = 0.02  # residual output projections use init_std / sqrt(2 * n_layers)

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.d_model % self.attention.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by attention.n_heads={self.attention.n_heads}"
            )
        if self.moe is not None and not 0 < self.moe.top_k <= self.moe.n_routed_experts:
            raise ValueError(
                f"moe.top_k={self.moe.top_k} must be in 1..n_routed_experts={self.moe.n_routed_experts}"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe is not None and layer_idx >= self.n_dense_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown BackboneConfig keys: {sorted(unknown)}")
        return cls(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:  # atomic: a reader never sees a half-written config
            path = Path(path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> BackboneConfig:
        """Load from a YAML file path or from YAML text (text is anything with a newline)."""
        if isinstance(text_or_path, Path) or "\n" not in str(text_or_path):
            text = Path(text_or_path).read_text()
        else:
            text = str(text_or_path)
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"BackboneConfig YAML must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)


def small_backbone(
    d_model: int = 64, n_layers: int = 2, top_k: int | None = None, dropout: float = 0.0
) -> BackboneConfig:
    """The apps' default small model: gated DGA (4 heads), MoE of 4 experts top-2 + 1 shared.

    FFN and expert widths scale with ``d_model`` (2x and 1x); the first layer is dense.
    """
    return BackboneConfig(
        d_model=d_model,
        n_layers=n_layers,
        ffn_hidden=2 * d_model,
        attention=AttentionConfig(n_heads=4, gated=True, top_k=top_k),
        moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=d_model),
        n_dense_layers=1,
        dropout=dropout,
    )
