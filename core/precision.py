"""Numeric precision support: FP8 training (torchao on Hopper/Ada, emulated elsewhere).

Two FP8 paths share one layer filter (:class:`Float8LinearFilter`) and one callback
(:class:`Float8Training`):

* ``"torchao"``: :func:`torchao.float8.convert_to_float8_training` swaps the chosen
  ``nn.Linear`` layers for ``Float8Linear``, whose GEMMs run on FP8 tensor cores
  (``torch._scaled_mm``). Needs CUDA compute capability >= 8.9 (Ada, Hopper) and torchao,
  which is imported lazily so CPU installs never need it. The trainer then runs in
  Lightning's ``bf16-true`` precision: torchao casts activations and weights to FP8 per
  GEMM itself, so an autocast context would only add casts, and everything outside the
  converted GEMMs (norms, attention, routing) runs in bf16 as torchao's recipes assume.
  ``torch.compile`` is recommended: it fuses the amax reductions and casts that dynamic
  scaling adds; uncompiled, FP8 is usually slower than bf16.
* ``"emulated"``: :class:`EmulatedFloat8Linear` reproduces torchao's *tensorwise dynamic*
  recipe numerically on any device: input and weight are scaled by ``fp8_max / amax`` and
  cast to ``float8_e4m3fn``, the output gradient to ``float8_e5m2`` in backward, and each
  GEMM multiplies the FP8 values with fp32 accumulation before unscaling, which is what
  ``torch._scaled_mm`` computes. It is slower than bf16 and exists to test FP8 numerics
  (loss curves, layer SQNR) on machines without FP8 hardware. It is only used when asked
  for by name; a missing GPU never silently degrades ``fp8`` into it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Fp8Backend = Literal["torchao", "emulated"]
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_AMAX_EPS = 1e-12  # torchao's floor on amax, so an all-zero tensor gets a finite scale


class PrecisionUnavailableError(ValueError):
    """The requested precision cannot run on this machine (hardware or package missing)."""


# ----------------------------------------------------------------------------- layer filter


@dataclass(frozen=True)
class Float8LinearFilter:
    """Chooses the ``nn.Linear`` layers worth running in FP8; a torchao ``module_filter_fn``.

    A layer is converted only when both ``in_features`` and ``out_features`` are multiples
    of ``multiple_of`` (16: the FP8 GEMM kernels of cuBLASLt need 16-aligned dims) and
    ``min(in_features, out_features) >= min_features``. Why a size floor: dynamic scaling
    adds, per GEMM, an amax reduction and a cast of the input, the weight and (in backward)
    the output gradient. Those passes are memory-bound and their cost does not shrink with
    the GEMM's inner size, while the FP8 tensor-core gain (at most 2x) grows with it, so a
    small layer gets slower, besides losing precision. Measured on an H200 (torchao 0.17,
    both sides ``torch.compile``d, fwd+bwd, 16384 tokens), FP8 over bf16: Linear(1024, 1024)
    0.65x, (1024, 4096) 0.57x, (4096, 1024) 0.89x, (2048, 2048) 1.00x, (2048, 8192) 1.21x,
    (4096, 4096) 1.26x; hence the default floor of 2048. Small projections such as a router
    (``out_features = n_experts``) or per-head gates therefore stay in high precision.
    ``exclude`` drops layers whose fully-qualified name contains any of the given
    substrings (e.g. an output head).
    """

    min_features: int = 2048
    multiple_of: int = 16
    exclude: tuple[str, ...] = ()

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(pattern in fqn for pattern in self.exclude):
            return False
        n_in, n_out = module.in_features, module.out_features
        if n_in % self.multiple_of or n_out % self.multiple_of:
            return False
        return min(n_in, n_out) >= self.min_features


# ----------------------------------------------------------------------------- emulation


def tensorwise_scale(x: Tensor, float8_dtype: torch.dtype) -> Tensor:
    """Per-tensor dynamic scale ``fp8_max / amax`` as an fp32 scalar (torchao's rule)."""
    amax = x.detach().abs().amax().to(torch.float64)
    return (torch.finfo(float8_dtype).max / torch.clamp(amax, min=_AMAX_EPS)).to(torch.float32)


def to_float8(x: Tensor, float8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale, saturate and cast ``x`` to FP8; returns ``(bits, scale)`` with ``x ~ bits / scale``."""
    scale = tensorwise_scale(x, float8_dtype)
    fp8_max = torch.finfo(float8_dtype).max
    bits = (x.to(torch.float32) * scale).clamp(-fp8_max, fp8_max).to(float8_dtype)
    return bits, scale


def fake_quantize_float8(x: Tensor, float8_dtype: torch.dtype = E4M3) -> Tensor:
    """Round-trip ``x`` through FP8 with tensorwise dynamic scaling; returns ``x.dtype``."""
    bits, scale = to_float8(x, float8_dtype)
    return (bits.to(torch.float32) / scale).to(x.dtype)


def _scaled_matmul(a_bits: Tensor, a_scale: Tensor, b_bits: Tensor, b_scale: Tensor) -> Tensor:
    """``(a_bits @ b_bits) / (a_scale * b_scale)`` in fp32, as ``torch._scaled_mm`` does.

    Products of two FP8 values are exact in fp32 and the sum accumulates in fp32, so the
    only rounding left is the final cast to the output dtype done by the caller.
    """
    return (a_bits.to(torch.float32) @ b_bits.to(torch.float32)) / (a_scale * b_scale)


class _EmulatedFloat8Matmul(torch.autograd.Function):
    """``x_MK @ w_NK.T`` with FP8 operands: e4m3 forward, e5m2 output gradient in backward.

    Saves the high-precision operands and re-casts them in backward; with tensorwise
    scaling the re-cast is bit-identical to the forward one (torchao does the same).
    """

    @staticmethod
    def forward(ctx: Any, x_MK: Tensor, w_NK: Tensor, out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x_MK, w_NK)
        ctx.out_dtype = out_dtype
        x_bits, x_scale = to_float8(x_MK, E4M3)
        w_bits, w_scale = to_float8(w_NK, E4M3)
        return _scaled_matmul(x_bits, x_scale, w_bits.t(), w_scale).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_MN: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_MK, w_NK = ctx.saved_tensors
        g_bits, g_scale = to_float8(grad_MN, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w_bits, w_scale = to_float8(w_NK, E4M3)
            grad_x = _scaled_matmul(g_bits, g_scale, w_bits, w_scale).to(x_MK.dtype)
        if ctx.needs_input_grad[1]:
            x_bits, x_scale = to_float8(x_MK, E4M3)
            grad_w = _scaled_matmul(g_bits.t(), g_scale, x_bits, x_scale).to(w_NK.dtype)
        return grad_x, grad_w, None


def emulated_float8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Functional form of :class:`EmulatedFloat8Linear`.

    Under autocast the output takes the autocast dtype, as torchao's ``Float8Linear`` does;
    the bias is added in high precision after the FP8 GEMM, again as torchao does.
    """
    device_type = x.device.type
    out_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    )
    x_MK = x.reshape(-1, x.shape[-1])
    with torch.autocast(device_type, enabled=False):
        out_MN = _EmulatedFloat8Matmul.apply(x_MK, weight, out_dtype)
        out = out_MN.reshape(*x.shape[:-1], weight.shape[0])
        if bias is not None:
            out = out + bias.to(out_dtype)
    return out


class EmulatedFloat8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs follow torchao's tensorwise FP8 recipe, emulated.

    Parameters and ``state_dict`` keys are those of ``nn.Linear``, so checkpoints load
    into an unconverted model and vice versa. Checked against torchao 0.17's
    ``Float8Linear`` on an H200 (Gaussian data, bf16): emulated vs torchao SQNR 53-59 dB on
    the output and 64 dB on both gradients, while each is 28.7 dB (output) and 24.6 dB
    (gradients) from plain bf16; the residual gap is torchao's fast-accumulation forward GEMM.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> EmulatedFloat8Linear:
        """Wrap ``linear``'s own parameters (no copy), keeping optimizer references valid."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return emulated_float8_linear(x, self.weight, self.bias)


def _swap_linears(
    model: nn.Module,
    module_filter_fn: Callable[[nn.Module, str], bool] | None,
    make: Callable[[nn.Linear], nn.Module],
    prefix: str = "",
) -> list[str]:
    converted = []
    for name, child in list(model.named_children()):
        fqn = f"{prefix}.{name}" if prefix else name
        if type(child) is nn.Linear and (module_filter_fn is None or module_filter_fn(child, fqn)):
            setattr(model, name, make(child))
            converted.append(fqn)
        else:
            converted += _swap_linears(child, module_filter_fn, make, fqn)
    return converted


def convert_to_emulated_float8(
    model: nn.Module, module_filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> nn.Module:
    """Swap the ``nn.Linear`` layers that pass ``module_filter_fn(module, fqn)`` in place.

    Mirrors ``torchao.float8.convert_to_float8_training``'s signature; returns ``model``.
    """
    if isinstance(model, nn.Linear) and type(model) is nn.Linear:
        raise ValueError(
            "convert_to_emulated_float8 converts the children of a module; wrap the Linear"
        )
    _swap_linears(model, module_filter_fn, EmulatedFloat8Linear.from_linear)
    return model


def float8_layer_names(model: nn.Module) -> list[str]:
    """Fully-qualified names of the layers that run their GEMMs in FP8 (either path)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, EmulatedFloat8Linear) or type(module).__name__ == "Float8Linear"
    ]


# ----------------------------------------------------------------------------- torchao path


def fp8_unavailable_reasons(accelerator: str = "auto") -> list[str]:
    """Why real FP8 training (torchao) cannot run here; empty when it can."""
    reasons = []
    if accelerator not in ("auto", "gpu", "cuda"):
        reasons.append(f"accelerator={accelerator!r} (FP8 tensor cores need accelerator 'cuda')")
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    else:
        cap = torch.cuda.get_device_capability()
        if cap < FP8_MIN_COMPUTE_CAPABILITY:
            need = ".".join(map(str, FP8_MIN_COMPUTE_CAPABILITY))
            reasons.append(
                f"GPU {torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]} < {need}"
                " (FP8 tensor cores start with Ada/Hopper)"
            )
    if importlib.util.find_spec("torchao") is None:
        reasons.append("torchao is not installed (pip install 'keel[gpu]', i.e. torchao>=0.12)")
    return reasons


def resolve_fp8_backend(accelerator: str = "auto", emulated: bool = False) -> Fp8Backend:
    """``"emulated"`` when asked for by name, else ``"torchao"`` if it can run, else raise.

    Never falls back silently: a run configured for FP8 on a machine without FP8 support
    fails with :class:`PrecisionUnavailableError` naming every missing piece.
    """
    if emulated:
        return "emulated"
    reasons = fp8_unavailable_reasons(accelerator)
    if reasons:
        raise PrecisionUnavailableError(
            "precision='fp8' needs a CUDA GPU of compute capability >= 8.9 and torchao, but here: "
            + "; ".join(reasons)
            + ". Use precision='bf16-mixed', or precision='fp8-emulated' (TrainerConfig.fp8_emulated=True)"
            " to emulate FP8 numerics slowly for testing."
        )
    return "torchao"


def convert_to_torchao_float8(
    model: nn.Module,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    enable_fsdp_float8_all_gather: bool = False,
) -> nn.Module:
    """``torchao.float8.convert_to_float8_training`` with the tensorwise dynamic recipe."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:  # pragma: no cover - depends on the install
        raise PrecisionUnavailableError(f"torchao float8 training is unavailable: {err}") from err
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=enable_fsdp_float8_all_gather)
    return convert_to_float8_training(model, module_filter_fn=module_filter_fn, config=config)


def convert_to_float8(
    model: nn.Module,
    backend: Fp8Backend,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    enable_fsdp_float8_all_gather: bool = False,
) -> list[str]:
    """Convert ``model``'s eligible linears with ``backend``; returns the converted names."""
    if backend == "torchao":
        convert_to_torchao_float8(model, module_filter_fn, enable_fsdp_float8_all_gather)
    elif backend == "emulated":
        convert_to_emulated_float8(model, module_filter_fn)
    else:
        raise ValueError(f"unknown fp8 backend {backend!r}; expected 'torchao' or 'emulated'")
    return float8_layer_names(model)


class Float8Training(lightning.pytorch.Callback):
    """Converts the module's linears to FP8 at ``setup``, before ``configure_model``.

    ``setup`` runs before ``configure_model`` (where compile and FSDP2 sharding happen) and
    before the strategy builds the optimizer, which is the order torchao requires:
    convert, then compile, then shard. A module that defines
    ``convert_to_float8(backend, module_filter_fn, ...)`` (``core.engine.TaskModule`` does:
    it converts only its backbone) is asked to convert itself; otherwise the whole module
    is converted.
    """

    def __init__(
        self,
        backend: Fp8Backend,
        module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
        enable_fsdp_float8_all_gather: bool = False,
    ) -> None:
        self.backend = backend
        self.module_filter_fn = module_filter_fn or Float8LinearFilter()
        self.enable_fsdp_float8_all_gather = enable_fsdp_float8_all_gather
        self.converted: list[str] = []

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        own = getattr(pl_module, "convert_to_float8", None)
        if callable(own):
            self.converted = own(
                self.backend, self.module_filter_fn, self.enable_fsdp_float8_all_gather
            )
        else:
            self.converted = convert_to_float8(
                pl_module, self.backend, self.module_filter_fn, self.enable_fsdp_float8_all_gather
            )
        if not self.converted:
            log.warning(
                "precision fp8 (%s): no linear layer passed the filter %s, so nothing runs in FP8",
                self.backend,
                self.module_filter_fn,
            )
        else:
            log.info("fp8 (%s): %d linear layers converted", self.backend, len(self.converted))

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Under FSDP2 with float8 all-gather: the scales of all FP8 weights in one
        all-reduce after the step (torchao's ``precompute_float8_dynamic_scale_for_fsdp``, as
        torchtitan does). Without it each weight computes its own amax inside FSDP2's
        all-gather hook: a small collective and several DTensor dispatches per weight, per
        gather, forward and backward (on one H200 FP8 + compile under FSDP2 ran at 0.46x of
        unsharded without it, 0.75x with it). The scales come from the weights the next
        gather sends, so the numerics are unchanged; after a step skipped by accumulation
        they are recomputed from unchanged weights (one fused norm and one all-reduce)."""
        if self._fsdp_float8_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(pl_module)

    def _forget_precomputed_scales(self, pl_module: lightning.LightningModule) -> None:
        """Back to per-gather scales: torchao keeps a precomputed scale until the next
        precompute, and weights may change outside the training step (a callback that
        swaps in averaged or best weights), so evaluation never uses a stale scale."""
        if not self._fsdp_float8_gather:
            return
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

        for param in pl_module.parameters():
            local = getattr(param, "_local_tensor", None)
            if isinstance(local, WeightWithDynamicFloat8CastTensor):
                local._precomputed_scale = None

    @property
    def _fsdp_float8_gather(self) -> bool:
        return self.backend == "torchao" and self.enable_fsdp_float8_all_gather

    def on_validation_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._forget_precomputed_scales(pl_module)

    def on_test_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._forget_precomputed_scales(pl_module)

    def on_predict_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._forget_precomputed_scales(pl_module)

    def on_train_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._forget_precomputed_scales(pl_module)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||ref|| / ||ref - approx||)`` in dB."""
    ref = reference.detach().to(torch.float64)
    err = ref - approx.detach().to(torch.float64)
    return float(20 * torch.log10(ref.norm() / err.norm().clamp_min(1e-300)))


__all__ = [
    "E4M3",
    "E5M2",
    "EmulatedFloat8Linear",
    "Float8LinearFilter",
    "Float8Training",
    "Fp8Backend",
    "PrecisionUnavailableError",
    "convert_to_emulated_float8",
    "convert_to_float8",
    "convert_to_torchao_float8",
    "emulated_float8_linear",
    "fake_quantize_float8",
    "float8_layer_names",
    "fp8_unavailable_reasons",
    "resolve_fp8_backend",
    "sqnr_db",
    "tensorwise_scale",
    "to_float8",
]
