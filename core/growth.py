r"""Function-preserving growth of a :class:`~core.backbone.Backbone` (progressive training).

Each operator returns a NEW backbone (its config is ``new.cfg``) whose outputs equal the old
one's before any training, so training continues from the same loss instead of restarting.
What is exact, and why:

* :func:`grow_depth` inserts pre-norm blocks whose residual branches add exactly 0: the
  attention output projection and every FFN / expert / shared-expert ``w2`` are zero. The
  rest of the new block is randomly initialised, so the zero projections get non-zero
  gradients at once and the block starts learning after the first step.
* :func:`grow_width`:

  - FFN hidden / expert hidden: new hidden units get random ``w1``/``w3`` rows and zero ``w2``
    columns (they add 0). Net2Net's duplication with halved output weights is exact too, but
    the two copies then receive identical gradients forever (no noise, no symmetry breaking),
    so the extra width would never be used; zero output columns break the symmetry.
  - ``d_model`` (RMSNorm only; this is also how heads are added, since ``head_dim = d_model /
    n_heads`` is kept and ``n_heads`` grows with ``d_model``): the residual stream is padded
    with zero channels and stays zero-padded: every residual output projection (attention
    ``W_o``, FFN/expert ``w2``) has zero rows for the new channels, and new heads have zero
    ``W_o`` columns. RMSNorm over ``[x, 0]`` sees ``mean' = (D/D') mean(x^2)``; with
    ``eps' = eps * D/D'`` and ``weight' = weight * sqrt(D/D')``::

        x * rsqrt((D/D') (mean + eps)) * weight * sqrt(D/D') = x * rsqrt(mean + eps) * weight

    exactly (the config's ``norm_eps`` is rescaled). Every linear that reads a normalised
    vector sees 0 on the new channels, so its new input columns may be random (they are,
    so they learn). LayerNorm cannot be padded this way (the mean of ``[x, 0]`` is not the
    mean of ``x``), so ``d_model`` growth raises for ``norm="layernorm"``. The caller must feed
    zero-padded tokens (:func:`pad_tokens`); ``last_hidden[..., :D]`` then equals the old
    output and ``last_hidden[..., D:]`` is 0. A task module's adapter and head are the task's
    business: :func:`apply_growth` calls its ``grow_d_model(old_d, new_d)`` hook.

* :func:`upcycle_to_moe` (sparse upcycling, Komatsuzaki et al. 2023): ``init="copy"`` makes
  every routed expert a copy of the dense FFN with ``w2 / route_scale``; Keel's combine
  weights are normalised to sum to ``route_scale`` over the chosen k, so any routing gives
  exactly the dense output, and the experts diverge as different tokens train them.
  ``init="shared"`` (needed when ``expert_hidden != ffn_hidden``) puts the dense FFN in the
  shared expert (width ``n_shared * expert_hidden >= ffn_hidden``; extra units get zero
  ``w2``) and gives the routed experts zero ``w2``. Either way shared experts that do not
  carry the dense FFN start with zero ``w2``. The router keeps the backbone's small normal
  init (sigmoid scores near 0.5: near-uniform routing at first).
* :func:`split_experts` halves each routed expert's hidden units into two experts (SwiGLU is
  a sum over hidden units, so the halves' outputs add up to the whole). Routing: E and
  top_k double, both halves get the same router row and bias, so they always tie and are
  chosen together (exact unless two *different* experts tie at the k-th score); the
  combine weight each half receives is half the original, which ``route_scale * 2``
  restores. Shared experts keep their width: ``n_shared_experts`` doubles.

:class:`GrowthSchedule` + :class:`GrowthCallback` apply operators at given optimizer steps in
a Lightning run. Parameters that survive unchanged (same name mapping and shape) keep their
AdamW state; new or reshaped parameters start with fresh state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning
import torch
from torch import Tensor, nn

from core.backbone import Backbone
from core.config import MoEConfig
from core.configio import YamlConfig
from core.ffn import SwiGLU
from core.moe import MoEFeedForward
from core.optim import split_decay_parameters

log = logging.getLogger(__name__)


# ============================================================================ helpers


def _like(new: Backbone, old: nn.Module) -> Backbone:
    """Move ``new`` to ``old``'s device and floating dtype (MoE buffers stay float32)."""
    p = next(old.parameters())
    return new.to(device=p.device, dtype=p.dtype)


def _set_map(new: Backbone, mapping: dict[str, str]) -> Backbone:
    """Record ``new param name -> old param name`` for params copied verbatim (same shape)."""
    new.grown_from = mapping  # plain attribute: read by the callback to carry AdamW state
    return new


def _copy_module(
    dst: nn.Module, src: nn.Module, prefix_dst: str, prefix_src: str
) -> dict[str, str]:
    """Load ``src``'s state into ``dst`` (same architecture); return the param name mapping."""
    dst.load_state_dict(src.state_dict())
    return {f"{prefix_dst}{name}": f"{prefix_src}{name}" for name, _ in dst.named_parameters()}


def pad_tokens(x_BTD: Tensor, new_d_model: int) -> Tensor:
    """Zero-pad tokens to ``new_d_model`` channels: the input a d_model-grown backbone expects."""
    extra = new_d_model - x_BTD.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad {x_BTD.shape[-1]} channels down to {new_d_model}")
    return torch.nn.functional.pad(x_BTD, (0, extra))


def _zero_residual_outputs(block: nn.Module) -> None:
    """Zero attention W_o and every FFN/expert/shared w2: the block's branches add 0."""
    block.attn.out_proj.weight.zero_()
    ffn = block.ffn
    if isinstance(ffn, MoEFeedForward):
        ffn.w2_EDF.zero_()
        if ffn.shared is not None:
            ffn.shared.w2.weight.zero_()
    else:
        ffn.w2.weight.zero_()


# ============================================================================ depth


@torch.no_grad()
def grow_depth(backbone: Backbone, new_layers_at: int | Sequence[int]) -> Backbone:
    """Insert identity blocks before old block indices ``new_layers_at`` (``n_layers`` = at the end).

    Repeating an index inserts several blocks there. A new block is dense when inserted
    inside (or before) the dense prefix (index < ``n_dense_layers``) or when the backbone has
    no MoE, else MoE; ``n_dense_layers`` grows accordingly, so the Keel layout (dense blocks
    first) holds.
    """
    cfg = backbone.cfg
    L = cfg.n_layers
    at = [new_layers_at] if isinstance(new_layers_at, int) else list(new_layers_at)
    if not at or any(not 0 <= p <= L for p in at):
        raise ValueError(f"new_layers_at must be indices in 0..{L} (n_layers), got {at}")
    # order of the new stack: ("new", dense?) or ("old", i)
    layout: list[tuple[str, int]] = []
    for i in range(L + 1):
        for p in at:
            if p == i:
                layout.append(("new", int(cfg.moe is None or p < cfg.n_dense_layers)))
        if i < L:
            layout.append(("old", i))
    dense = [
        (kind == "new" and flag == 1) or (kind == "old" and not cfg.is_moe_layer(flag))
        for kind, flag in layout
    ]
    if all(dense):  # no MoE block: only "all dense" matters
        n_dense = (
            max(cfg.n_dense_layers, len(layout)) if cfg.moe is not None else cfg.n_dense_layers
        )
    else:
        n_dense = dense.index(False)
        if any(dense[n_dense:]):
            raise AssertionError("internal: dense blocks after the first MoE block")
    new_cfg = dataclasses.replace(cfg, n_layers=len(layout), n_dense_layers=n_dense)
    new = _like(Backbone(new_cfg), backbone)
    mapping = _copy_module(new.norm, backbone.norm, "norm.", "norm.")
    for j, (kind, i) in enumerate(layout):
        if kind == "old":
            mapping |= _copy_module(
                new.blocks[j], backbone.blocks[i], f"blocks.{j}.", f"blocks.{i}."
            )
        else:
            _zero_residual_outputs(new.blocks[j])
    return _set_map(new, mapping)


# ============================================================================ width


def _embed(new: Tensor, old: Tensor) -> bool:
    """Copy ``old`` into the leading slice of ``new`` (every dim); True when shapes are equal."""
    new[tuple(slice(0, n) for n in old.shape)] = old
    return new.shape == old.shape


@torch.no_grad()
def _widen_swiglu(new: SwiGLU, old: SwiGLU) -> None:
    """Old units in the leading slice; new hidden units and new output channels add 0."""
    _embed(new.w1.weight, old.w1.weight)
    _embed(new.w3.weight, old.w3.weight)
    new.w2.weight.zero_()
    _embed(new.w2.weight, old.w2.weight)


@torch.no_grad()
def _widen_moe(new: MoEFeedForward, old: MoEFeedForward) -> None:
    _embed(new.router.weight, old.router.weight)
    new.expert_bias.copy_(old.expert_bias)
    new.tokens_per_expert.copy_(old.tokens_per_expert)
    _embed(new.w1_EFD, old.w1_EFD)
    _embed(new.w3_EFD, old.w3_EFD)
    new.w2_EDF.zero_()
    _embed(new.w2_EDF, old.w2_EDF)
    if old.shared is not None:
        _widen_swiglu(new.shared, old.shared)


@torch.no_grad()
def grow_width(
    backbone: Backbone,
    new_d_model: int | None = None,
    new_ffn_hidden: int | None = None,
    new_expert_hidden: int | None = None,
    new_n_heads: int | None = None,
) -> Backbone:
    """Widen the dense FFN hidden, the expert hidden and/or ``d_model`` (heads), exactly.

    ``new_n_heads`` is a shorthand for ``new_d_model = new_n_heads * head_dim`` (head width is
    kept). See the module docstring for the construction; ``d_model`` growth needs
    ``norm="rmsnorm"`` and zero-padded inputs (:func:`pad_tokens`).
    """
    cfg = backbone.cfg
    D, H = cfg.d_model, cfg.attention.n_heads
    hd = D // H
    if new_n_heads is not None:
        if new_d_model is not None and new_d_model != new_n_heads * hd:
            raise ValueError(
                f"new_n_heads={new_n_heads} with head_dim={hd} means d_model={new_n_heads * hd},"
                f" not new_d_model={new_d_model}"
            )
        new_d_model = new_n_heads * hd
    D2 = new_d_model or D
    F2 = new_ffn_hidden or cfg.ffn_hidden
    if D2 < D or F2 < cfg.ffn_hidden:
        raise ValueError(
            f"grow_width only grows: d_model {D}->{D2}, ffn_hidden {cfg.ffn_hidden}->{F2}"
        )
    if D2 % hd:
        raise ValueError(
            f"new d_model={D2} must be a multiple of head_dim={hd} (heads keep their width)"
        )
    if D2 != D and cfg.norm != "rmsnorm":
        raise ValueError(
            f"d_model growth is exact only with norm='rmsnorm' (got {cfg.norm!r}): a zero-padded"
            " channel shifts LayerNorm's mean"
        )
    moe = cfg.moe
    if new_expert_hidden is not None:
        if moe is None:
            raise ValueError("new_expert_hidden given but the backbone has no MoE layers")
        if new_expert_hidden < moe.expert_hidden:
            raise ValueError(
                f"grow_width only grows: expert_hidden {moe.expert_hidden}->{new_expert_hidden}"
            )
        moe = dataclasses.replace(moe, expert_hidden=new_expert_hidden)
    new_cfg = dataclasses.replace(
        cfg,
        d_model=D2,
        ffn_hidden=F2,
        moe=moe,
        attention=dataclasses.replace(cfg.attention, n_heads=D2 // hd),
        norm_eps=cfg.norm_eps * D / D2,
    )
    new = _like(Backbone(new_cfg), backbone)
    scale = math.sqrt(D / D2)
    mapping: dict[str, str] = {}

    def norm(dst: nn.Module, src: nn.Module, name: str) -> None:
        if D2 == D:
            mapping.update(_copy_module(dst, src, f"{name}.", f"{name}."))
            return
        dst.weight.fill_(scale)  # RMSNorm (checked above): weight' = weight * sqrt(D / D')
        _embed(dst.weight, src.weight * scale)

    norm(new.norm, backbone.norm, "norm")
    for i, (nb, ob) in enumerate(zip(new.blocks, backbone.blocks, strict=True)):
        p = f"blocks.{i}."
        norm(nb.attn_norm, ob.attn_norm, p + "attn_norm")
        norm(nb.ffn_norm, ob.ffn_norm, p + "ffn_norm")
        na, oa = nb.attn, ob.attn
        H2 = na.n_heads
        na.qkv.weight.view(3, H2, hd, D2)[:, :H, :, :D] = oa.qkv.weight.view(3, H, hd, D)
        na.out_proj.weight.zero_()
        _embed(na.out_proj.weight, oa.out_proj.weight)
        if oa.gate is not None:
            _embed(na.gate.weight, oa.gate.weight)
            _embed(na.gate.bias, oa.gate.bias)
        for qk in ("q_norm", "k_norm"):
            if getattr(oa, qk) is not None:
                getattr(na, qk).load_state_dict(getattr(oa, qk).state_dict())
                mapping[f"{p}attn.{qk}.weight"] = f"{p}attn.{qk}.weight"
        if D2 == D:
            mapping[f"{p}attn.qkv.weight"] = f"{p}attn.qkv.weight"
            mapping[f"{p}attn.out_proj.weight"] = f"{p}attn.out_proj.weight"
            if oa.gate is not None:
                mapping[f"{p}attn.gate.weight"] = f"{p}attn.gate.weight"
                mapping[f"{p}attn.gate.bias"] = f"{p}attn.gate.bias"
        if isinstance(ob.ffn, MoEFeedForward):
            _widen_moe(nb.ffn, ob.ffn)
        else:
            _widen_swiglu(nb.ffn, ob.ffn)
        for name, param in nb.ffn.named_parameters():
            if param.shape == ob.ffn.get_parameter(name).shape:
                mapping[f"{p}ffn.{name}"] = f"{p}ffn.{name}"
    return _set_map(new, mapping)


# ============================================================================ MoE


@torch.no_grad()
def upcycle_to_moe(
    backbone: Backbone,
    moe_cfg: MoEConfig | Mapping[str, Any] | None = None,
    n_dense_layers: int = 0,
    init: str = "auto",
) -> Backbone:
    """Turn the dense FFN layers at index >= ``n_dense_layers`` into MoE layers, exactly.

    ``moe_cfg``: the MoE settings (required when the backbone has no MoE yet; when it has,
    they must match the existing ones or be ``None``). ``init``: ``copy`` (routed experts =
    copies of the dense FFN; needs ``expert_hidden == ffn_hidden``), ``shared`` (shared expert
    = the dense FFN; needs ``n_shared_experts * expert_hidden >= ffn_hidden``) or ``auto``
    (copy when the widths match, else shared). See the module docstring.
    """
    cfg = backbone.cfg
    if isinstance(moe_cfg, Mapping):
        moe_cfg = MoEConfig(**moe_cfg)
    if cfg.moe is not None:
        if moe_cfg is not None and moe_cfg != cfg.moe:
            raise ValueError(
                "the backbone already has MoE layers; upcycled layers share its MoEConfig"
                f" ({cfg.moe}), got a different one ({moe_cfg})"
            )
        moe_cfg = cfg.moe
    if moe_cfg is None:
        raise ValueError("upcycle_to_moe needs moe_cfg for a backbone without MoE layers")
    old_dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    if not 0 <= n_dense_layers <= len(old_dense):
        raise ValueError(
            f"n_dense_layers={n_dense_layers} must be in 0..{len(old_dense)} (the dense layers)"
        )
    if init == "auto":
        init = "copy" if moe_cfg.expert_hidden == cfg.ffn_hidden else "shared"
    if init == "copy" and moe_cfg.expert_hidden != cfg.ffn_hidden:
        raise ValueError(
            f"init='copy' needs expert_hidden == ffn_hidden ({moe_cfg.expert_hidden} != {cfg.ffn_hidden})"
        )
    if init == "shared" and moe_cfg.n_shared_experts * moe_cfg.expert_hidden < cfg.ffn_hidden:
        raise ValueError(
            "init='shared' needs n_shared_experts * expert_hidden >= ffn_hidden"
            f" ({moe_cfg.n_shared_experts} * {moe_cfg.expert_hidden} < {cfg.ffn_hidden})"
        )
    if init not in ("copy", "shared"):
        raise ValueError(f"init must be 'auto', 'copy' or 'shared', got {init!r}")
    new_cfg = dataclasses.replace(cfg, moe=moe_cfg, n_dense_layers=n_dense_layers)
    new = _like(Backbone(new_cfg), backbone)
    mapping = _copy_module(new.norm, backbone.norm, "norm.", "norm.")
    for i, (nb, ob) in enumerate(zip(new.blocks, backbone.blocks, strict=True)):
        p = f"blocks.{i}."
        if nb.is_moe == ob.is_moe:
            mapping |= _copy_module(nb, ob, p, p)
            continue
        for sub in ("attn_norm", "attn", "ffn_norm"):
            mapping |= _copy_module(getattr(nb, sub), getattr(ob, sub), f"{p}{sub}.", f"{p}{sub}.")
        moe, dense = nb.ffn, ob.ffn
        if moe.shared is not None:
            moe.shared.w2.weight.zero_()
        if init == "copy":
            moe.w1_EFD.copy_(dense.w1.weight.expand_as(moe.w1_EFD))
            moe.w3_EFD.copy_(dense.w3.weight.expand_as(moe.w3_EFD))
            moe.w2_EDF.copy_((dense.w2.weight / moe_cfg.route_scale).expand_as(moe.w2_EDF))
        else:
            _widen_swiglu(moe.shared, dense)
            moe.w2_EDF.zero_()
    return _set_map(new, mapping)


@torch.no_grad()
def split_experts(moe_layer: MoEFeedForward) -> MoEFeedForward:
    """Split every routed expert into two of half width; outputs unchanged (see module doc).

    Returns a new module with ``n_routed_experts * 2``, ``top_k * 2``, ``expert_hidden / 2``,
    ``n_shared_experts * 2`` (same shared width) and ``route_scale * 2``.
    """
    c = moe_layer.cfg
    if c.expert_hidden % 2:
        raise ValueError(f"split_experts needs an even expert_hidden, got {c.expert_hidden}")
    new_cfg = split_moe_config(c)
    new = MoEFeedForward(moe_layer.d_model, new_cfg)
    p = next(moe_layer.parameters())
    new = new.to(device=p.device, dtype=p.dtype)
    E, Fh, D = moe_layer.w1_EFD.shape
    half = Fh // 2
    new.router.weight.copy_(moe_layer.router.weight.repeat_interleave(2, dim=0))
    new.expert_bias.copy_(moe_layer.expert_bias.repeat_interleave(2))
    new.tokens_per_expert.copy_(moe_layer.tokens_per_expert.repeat_interleave(2))
    new.w1_EFD.copy_(moe_layer.w1_EFD.reshape(2 * E, half, D))
    new.w3_EFD.copy_(moe_layer.w3_EFD.reshape(2 * E, half, D))
    w2_E2DH = moe_layer.w2_EDF.view(E, D, 2, half).permute(0, 2, 1, 3)
    new.w2_EDF.copy_(w2_E2DH.reshape(2 * E, D, half))
    if moe_layer.shared is not None:
        new.shared.load_state_dict(moe_layer.shared.state_dict())
    return new


def split_moe_config(c: MoEConfig) -> MoEConfig:
    """The :class:`MoEConfig` after :func:`split_experts`."""
    return dataclasses.replace(
        c,
        n_routed_experts=2 * c.n_routed_experts,
        top_k=2 * c.top_k,
        expert_hidden=c.expert_hidden // 2,
        n_shared_experts=2 * c.n_shared_experts,
        route_scale=2 * c.route_scale,
    )


@torch.no_grad()
def split_all_experts(backbone: Backbone) -> Backbone:
    """:func:`split_experts` on every MoE layer (they share one config)."""
    cfg = backbone.cfg
    if cfg.moe is None:
        raise ValueError("split_all_experts: the backbone has no MoE layers")
    new = _like(Backbone(dataclasses.replace(cfg, moe=split_moe_config(cfg.moe))), backbone)
    mapping = _copy_module(new.norm, backbone.norm, "norm.", "norm.")
    for i, (nb, ob) in enumerate(zip(new.blocks, backbone.blocks, strict=True)):
        p = f"blocks.{i}."
        if not ob.is_moe:
            mapping |= _copy_module(nb, ob, p, p)
            continue
        for sub in ("attn_norm", "attn", "ffn_norm"):
            mapping |= _copy_module(getattr(nb, sub), getattr(ob, sub), f"{p}{sub}.", f"{p}{sub}.")
        nb.ffn.load_state_dict(split_experts(ob.ffn).state_dict())
        if ob.ffn.shared is not None:
            for name, _ in nb.ffn.shared.named_parameters():
                mapping[f"{p}ffn.shared.{name}"] = f"{p}ffn.shared.{name}"
    return _set_map(new, mapping)


# ============================================================================ schedule + callback

OPERATORS: dict[str, Callable[..., Backbone]] = {
    "grow_depth": grow_depth,
    "grow_width": grow_width,
    "upcycle_to_moe": upcycle_to_moe,
    "split_experts": split_all_experts,
}


@dataclass
class GrowthStep(YamlConfig):
    """Apply ``OPERATORS[operator](backbone, **kwargs)`` before optimizer step ``at_step``."""

    at_step: int
    operator: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(
                f"growth operator must be one of {sorted(OPERATORS)}, got {self.operator!r}"
            )
        if self.at_step < 0:
            raise ValueError(f"growth at_step must be >= 0, got {self.at_step}")


@dataclass
class GrowthSchedule(YamlConfig):
    """Growth steps of a run, applied in ``at_step`` order (YAML: a list of mappings)."""

    steps: list[GrowthStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.steps = sorted(
            (s if isinstance(s, GrowthStep) else GrowthStep(**s) for s in self.steps),
            key=lambda s: s.at_step,
        )

    @classmethod
    def coerce(cls, value: GrowthSchedule | Mapping[str, Any] | Sequence[Any]) -> GrowthSchedule:
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls(steps=list(value.get("steps", [])))
        return cls(steps=list(value))


def _task_of(module: nn.Module) -> nn.Module:
    """The module that owns ``backbone``: a distillation wrapper's student, else itself."""
    return getattr(module, "student", module)


@torch.no_grad()
def apply_growth(module: nn.Module, operator: str, **kwargs: Any) -> Backbone:
    """Replace ``module.backbone`` (a TaskModule, or a wrapper's ``student``) by its grown copy.

    Updates ``backbone_config`` and the ``backbone_config`` hyperparameter (so a checkpoint
    rebuilds the grown shape). When ``d_model`` changes, the task's
    ``grow_d_model(old_d, new_d)`` hook must widen its adapter and head (zero-padding the
    tokens it emits, zero input columns in its head) or a ``ValueError`` is raised before
    anything changes. Returns the old backbone (whose ``grown_from`` the caller may use).
    """
    if operator not in OPERATORS:
        raise ValueError(f"growth operator must be one of {sorted(OPERATORS)}, got {operator!r}")
    task = _task_of(module)
    old = task.backbone
    new = OPERATORS[operator](old, **kwargs)
    if new.cfg.d_model != old.cfg.d_model:
        hook = getattr(task, "grow_d_model", None)
        if not callable(hook):
            raise ValueError(
                f"{type(task).__name__} must define grow_d_model(old_d, new_d) to widen its"
                " adapter and head before d_model can grow"
            )
        hook(old.cfg.d_model, new.cfg.d_model)
    new.train(old.training)
    task.backbone = new
    task.backbone_config = new.cfg
    hparams = getattr(task, "hparams", None)
    if hparams is not None and "backbone_config" in hparams:
        hparams["backbone_config"] = new.cfg.to_dict()
    return old


def _prefix_of(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return f"{name}." if name else ""
    raise ValueError("backbone not found inside the module")


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    old_params: Mapping[str, nn.Parameter],
    carry: Mapping[str, str],
) -> None:
    """Point ``optimizer``'s param groups at ``module``'s current parameters, in place.

    In place (same optimizer object, same groups and hyperparameters) so the LR scheduler
    and Lightning's optimizer wrappers stay valid. ``old_params``: name -> parameter before
    growth; ``carry``: new name -> old name for parameters copied verbatim. A parameter
    keeps its state if it is the same object, takes the mapped old parameter's state (and
    group) if carried, and otherwise starts fresh in the group its decay class selects
    (groups named ``decay`` / ``no_decay`` as :func:`core.optim.build_adamw` makes them;
    the first group when unnamed).
    """
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    by_name = {g.get("name"): gi for gi, g in enumerate(optimizer.param_groups)}
    decay, _ = split_decay_parameters(module)
    decay = set(decay)
    new_lists: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    new_state: defaultdict[Tensor, Any] = defaultdict(dict)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        src = p if id(p) in group_of else None
        if src is None and name in carry and carry[name] in old_params:
            cand = old_params[carry[name]]
            if cand.shape == p.shape and id(cand) in group_of:
                src = cand
        if src is not None:
            gi = group_of[id(src)]
            if src in optimizer.state:
                new_state[p] = optimizer.state[src]
        else:
            gi = by_name.get("decay" if name in decay else "no_decay", 0)
        new_lists[gi].append(p)
    for group, params in zip(optimizer.param_groups, new_lists, strict=True):
        group["params"] = params
    optimizer.state = new_state


class GrowthCallback(lightning.pytorch.Callback):
    """Applies a :class:`GrowthSchedule` during ``fit`` (single process).

    At the first training batch of optimizer step ``at_step`` (an accumulation boundary),
    the backbone is replaced by its grown copy on the same device and dtype and the
    optimizer is rebuilt in place (:func:`rebuild_optimizer`). Under DDP/FSDP2 the wrapped
    module would have to be re-wrapped, which this callback does not do: it raises.
    ``history`` records ``(global_step, operator, params_before, params_after)``. Resuming
    from a checkpoint: build the module from the checkpoint's ``backbone_config``
    hyperparameter (the grown shape); the callback's state restores which steps ran.
    Blocks compiled with ``TrainerConfig.compile`` are replaced by uncompiled ones.
    """

    def __init__(self, schedule: GrowthSchedule | Mapping[str, Any] | Sequence[Any]) -> None:
        self.schedule = GrowthSchedule.coerce(schedule)
        self.n_applied = 0
        self.history: list[tuple[int, str, int, int]] = []

    def on_train_batch_start(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        steps = self.schedule.steps
        if self.n_applied >= len(steps) or batch_idx % trainer.accumulate_grad_batches:
            return
        while self.n_applied < len(steps) and trainer.global_step >= steps[self.n_applied].at_step:
            self._apply(trainer, pl_module, steps[self.n_applied])
            self.n_applied += 1

    def _apply(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, step: GrowthStep
    ) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("GrowthCallback supports single-process training only")
        before = sum(p.numel() for p in pl_module.parameters())
        old_params = dict(pl_module.named_parameters())
        task = _task_of(pl_module)
        prefix = _prefix_of(pl_module, task.backbone)
        old = apply_growth(pl_module, step.operator, **step.kwargs)
        del old
        new = task.backbone
        carry = {prefix + k: prefix + v for k, v in getattr(new, "grown_from", {}).items()}
        for opt in trainer.optimizers:
            rebuild_optimizer(opt, pl_module, old_params, carry)
        after = sum(p.numel() for p in pl_module.parameters())
        self.history.append((trainer.global_step, step.operator, before, after))
        log.info(
            "growth %s at step %d: %d -> %d parameters",
            step.operator,
            trainer.global_step,
            before,
            after,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"n_applied": self.n_applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_applied = int(state_dict.get("n_applied", 0))


__all__ = [
    "GrowthCallback",
    "GrowthSchedule",
    "GrowthStep",
    "OPERATORS",
    "apply_growth",
    "grow_depth",
    "grow_width",
    "pad_tokens",
    "rebuild_optimizer",
    "split_all_experts",
    "split_experts",
    "split_moe_config",
    "upcycle_to_moe",
]
