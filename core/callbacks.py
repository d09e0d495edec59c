"""Lightning callbacks of the engine: MoE expert-bias updates and block compilation.

``ExpertBiasUpdate`` implements the auxiliary-loss-free load balancing of DeepSeek-V3:
each MoE layer counts the tokens routed to each expert (``tokens_per_expert``), and
before every optimizer step the per-expert routing bias moves toward balance. Doing it
in ``on_before_optimizer_step`` (not per forward) means that

* with gradient accumulation the counts of *all* micro-batches of the step are used, and
  the bias is constant while one step's gradients are being accumulated;
* under data parallelism the counts are summed over ranks first, so every rank applies
  the same update and the biases stay identical without being broadcast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

log = logging.getLogger(__name__)


def moe_layers_of(pl_module: nn.Module) -> list[nn.Module]:
    """The MoE feed-forward layers of ``pl_module.backbone`` (empty when there are none)."""
    backbone = getattr(pl_module, "backbone", None)
    if backbone is None or not hasattr(backbone, "moe_layers"):
        return []
    return list(backbone.moe_layers())


def data_parallel_group(pl_module: nn.Module) -> Any | None:
    """The process group over which tokens differ: the device mesh's data-parallel dim.

    Tensor-parallel ranks see the same tokens, so summing over them would count each token
    several times; without a mesh (DDP, single device) the default group is used.
    """
    mesh = getattr(pl_module, "_device_mesh", None)
    if mesh is not None and mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"].get_group()
    return None


def max_over_mean(counts_E: Tensor) -> float:
    """Load balance ``max(counts) / mean(counts)``: 1.0 is perfect, ``E`` is one expert only."""
    counts_E = counts_E.float()
    mean = counts_E.mean()
    return float(counts_E.max() / mean) if mean > 0 else float("nan")


@torch.no_grad()
def sync_and_update_expert_biases(
    layers: Sequence[nn.Module], group: Any | None = None
) -> list[Tensor]:
    """Sum each layer's ``tokens_per_expert`` over ranks, update its bias, reset its counts.

    All layers' counts travel in one all-reduce (SUM over ``group``, the default group when
    ``None``) when ``torch.distributed`` is initialised. Returns the summed counts per layer
    (float32, on the counts' device), i.e. exactly what each ``update_expert_bias`` received.
    """
    if not layers:
        return []
    local = [layer.tokens_per_expert.detach().to(torch.float32).flatten() for layer in layers]
    sizes = [c.numel() for c in local]
    flat = torch.cat(local)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    summed = list(flat.split(sizes))
    for layer, counts_E in zip(layers, summed, strict=True):
        layer.update_expert_bias(counts_E)
        layer.tokens_per_expert.zero_()
    return summed


class ExpertBiasUpdate(lightning.pytorch.Callback):
    """Moves MoE routing biases toward balance once per optimizer step (see module doc).

    Logs, per optimizer step, ``moe/step_load_balance_max_over_mean`` (mean over MoE
    layers) and ``moe/layer{j}/step_load_balance_max_over_mean`` for the j-th MoE layer,
    computed from the counts of all micro-batches and all data-parallel ranks.
    ``n_updates`` and ``last_counts`` record what the last update used.

    ``MoEFeedForward`` counts tokens only in training mode, so validation inside ``fit``
    leaves the counts alone; counts made before training starts are cleared.
    """

    def __init__(self, log_balance: bool = True) -> None:
        self.log_balance = log_balance
        self.n_updates = 0
        self.last_counts: list[Tensor] = []

    @staticmethod
    def _reset_counts(pl_module: nn.Module) -> None:
        for layer in moe_layers_of(pl_module):
            layer.tokens_per_expert.zero_()

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._reset_counts(pl_module)
        frozen = [layer for layer in moe_layers_of(pl_module) if not layer.training]
        if frozen:
            # Lightning keeps a module's train/eval mode at fit start; an MoE layer in eval
            # mode counts no tokens, so its bias would silently never move.
            log.warning(
                "%d MoE layer(s) are in eval mode at the start of training: they record no"
                " token counts and their expert biases will not be updated (call module.train()"
                " before fit)",
                len(frozen),
            )

    def on_before_optimizer_step(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        layers = moe_layers_of(pl_module)
        if not layers:
            return
        summed = sync_and_update_expert_biases(layers, group=data_parallel_group(pl_module))
        self.n_updates += 1
        self.last_counts = [c.detach().cpu() for c in summed]
        if self.log_balance:
            balances = [max_over_mean(c) for c in self.last_counts]
            for j, value in enumerate(balances):
                pl_module.log(f"moe/layer{j}/step_load_balance_max_over_mean", value, on_step=True)
            pl_module.log(
                "moe/step_load_balance_max_over_mean",
                sum(balances) / len(balances),
                on_step=True,
                prog_bar=False,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"n_updates": self.n_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_updates = int(state_dict.get("n_updates", 0))


class CompileBlocks(lightning.pytorch.Callback):
    """``torch.compile`` each transformer block at ``setup`` (before FSDP2 sharding).

    Compiling block by block (``nn.Module.compile``, in place, so parameter names and
    ``state_dict`` keys are unchanged) keeps compile time bounded by one block's graph,
    lets FSDP2 hooks sit between blocks, and is the torchtitan order: FP8 conversion,
    then compile, then sharding. The module must define ``compile_blocks(**kwargs)``
    (``core.engine.TaskModule`` does).
    """

    def __init__(
        self, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = None
    ) -> None:
        self.mode = mode
        self.backend = backend
        self.dynamic = dynamic

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        compile_blocks = getattr(pl_module, "compile_blocks", None)
        if not callable(compile_blocks):
            raise TypeError(
                f"TrainerConfig.compile=True needs a module with compile_blocks(); "
                f"{type(pl_module).__name__} has none (subclass core.engine.TaskModule)"
            )
        compile_blocks(mode=self.mode, backend=self.backend, dynamic=self.dynamic)


class EMAWeights(lightning.pytorch.Callback):
    """Exponential moving average (Polyak averaging) of the trainable parameters.

    After every optimizer step ``ema = decay * ema + (1 - decay) * param``; validation
    inside ``fit`` runs on the averaged weights (so ``monitor`` / early stopping judge the
    model that ships), and when training ends the averages are copied into the module.
    Why: small-batch training (the medical detector's 16 crops per step) ends wherever the
    last noisy steps left it; the average over the last ~``1 / (1 - decay)`` steps is a
    flatter, steadier point, and costs one fused ``lerp`` per step.

    Not Lightning's ``EMAWeightAveraging``: that one averages every buffer too and copies
    the float result back into integer buffers (the adapters' category offsets would be
    truncated), and keeps the average in the parameters' dtype, where bf16 rounds a
    ``(1 - decay)`` step away. Here only floating, trainable parameters are averaged, in
    float32; buffers (MoE routing biases, constants) and frozen parameters (a distillation
    teacher) keep their current values. Checkpoints written during training hold the raw
    weights and, in this callback's state, the averages (so a resumed run continues them).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMAWeights decay={decay}: expected 0 < decay < 1")
        self.decay = float(decay)
        self.n_updates = 0
        self._params: list[Tensor] = []
        self._shadow: list[Tensor] = []
        self._resumed: list[Tensor] | None = None
        self._raw: list[Tensor] | None = None  # the raw weights while validation uses averages

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        # here, not at setup: FP8 conversion, compile and the move to the device are done
        self._params = [
            p for p in pl_module.parameters() if p.requires_grad and p.is_floating_point()
        ]
        if self._resumed is not None:
            if [s.shape for s in self._resumed] != [p.shape for p in self._params]:
                raise ValueError(
                    "EMAWeights: the checkpoint's averages do not match the module's trainable"
                    " parameters (a different model or growth since the checkpoint)"
                )
            self._shadow = [
                s.to(p.device, torch.float32)
                for s, p in zip(self._resumed, self._params, strict=True)
            ]
        else:
            self._shadow = [p.detach().to(torch.float32, copy=True) for p in self._params]

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # global_step counts optimizer steps: with gradient accumulation, one update per step
        if trainer.global_step <= self.n_updates:
            return
        current = [p.detach().to(torch.float32) for p in self._params]
        torch._foreach_lerp_(self._shadow, current, 1.0 - self.decay)
        self.n_updates = trainer.global_step

    @torch.no_grad()
    def _load_averages(self) -> None:
        # the raw weights are kept apart rather than swapped through the averages: with
        # bf16 parameters a swap would round the float32 averages at every validation
        self._raw = [p.detach().clone() for p in self._params]
        for p, s in zip(self._params, self._shadow, strict=True):
            p.copy_(s)

    @torch.no_grad()
    def _restore_raw(self) -> None:
        for p, r in zip(self._params, self._raw, strict=True):
            p.copy_(r)
        self._raw = None

    def on_validation_epoch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        if self._shadow and trainer.state.fn == TrainerFn.FITTING:
            self._load_averages()

    def on_validation_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        if self._raw is not None:
            self._restore_raw()

    @torch.no_grad()
    def on_train_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        for p, s in zip(self._params, self._shadow, strict=True):
            p.copy_(s)
        self._raw = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "n_updates": self.n_updates,
            "shadow": [s.detach().cpu() for s in self._shadow],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_updates = int(state_dict.get("n_updates", 0))
        self._resumed = list(state_dict.get("shadow", [])) or None
