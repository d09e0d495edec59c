"""Optimizer and learning-rate schedule: AdamW with decoupled decay, warmup then cosine.

Weight decay pulls weights toward zero; that is a useful prior for projection matrices
but wrong for gains and offsets (norm weights, biases), whose neutral value is not zero,
and for embeddings / learned position and CLS tokens, which are lookup tables where decay
only shrinks rarely seen rows. Those parameters go into a group without decay, as in
GPT-2/litgpt/timm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

# Leaf parameter names that are embeddings or learned tokens (no decay).
NO_DECAY_NAME_HINTS = ("embed", "cls_token", "pos_", "position", "mask_token", "register_token")


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay to ``min_lr_ratio * lr``.

    ``max_steps`` is the length of the cosine (optimizer steps); ``None`` takes
    ``trainer.estimated_stepping_batches`` (epochs x batches / accumulation), so the
    schedule ends where training ends. Gradient clipping is the trainer's job
    (``TrainerConfig.gradient_clip_val``).
    """

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int | None = None
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # YAML/JSON give lists
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(
                f"OptimConfig needs lr >= 0, weight_decay >= 0, eps > 0; got lr={self.lr},"
                f" weight_decay={self.weight_decay}, eps={self.eps}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"OptimConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown OptimConfig keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def coerce(cls, value: OptimConfig | Mapping[str, Any] | None) -> OptimConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"expected OptimConfig or a dict, got {type(value).__name__}")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` (the first step already moves), then a
    half cosine from 1 to ``min_ratio`` reached at ``total_steps``, flat afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def split_decay_parameters(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of trainable parameters ``(with_decay, without_decay)``.

    Without decay: every parameter of fewer than 2 dims (biases, norm gains), all parameters
    of norm layers and ``nn.Embedding``, and parameters whose own name looks like an
    embedding or learned token (:data:`NO_DECAY_NAME_HINTS`). Shared parameters count once.
    """
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{leaf}" if module_name else leaf
            skip = (
                param.ndim < 2
                or isinstance(module, nn.Embedding)
                or _is_norm(module)
                or any(hint in leaf.lower() for hint in NO_DECAY_NAME_HINTS)
            )
            (no_decay if skip else decay).append(name)
    return decay, no_decay


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over two groups, decay and no decay (see :func:`split_decay_parameters`)."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay_parameters(model)
    groups: list[dict[str, Any]] = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_warmup_cosine(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` stepping :func:`warmup_cosine_factor` once per optimizer step."""
    fn = partial(
        warmup_cosine_factor,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        min_ratio=cfg.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def trainable_parameter_count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)
