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


class AveragedWeights(lightning.pytorch.Callback):
    """One model whose weights are an average of the training trajectory (Polyak / SWA).

    Why: with small batches or few positives the weights after any one optimizer step carry
    a lot of step-to-step noise (on the ULB fraud validation block the raw weights swung
    between AP 0.51 and 0.89 from epoch to epoch while their average stayed at 0.896-0.898,
    issue #3); an average over the last steps is a steadier point. Kinds:

    * ``decay`` a float: exponential moving average with that constant decay per optimizer
      step, started from the weights at the start of epoch ``start_epoch`` (the initial
      weights for 0). No warm-up: with decay 0.998 and ~60 steps per epoch the start keeps
      weight ``0.998 ** steps``, a shrinkage towards the small initial weights that measured
      better on ULB validation than the warm-up form (which tracks the last ~n/9 steps and
      inherits their noise);
    * ``decay=None``: the uniform mean of the weights after every optimizer step of epoch
      ``start_epoch`` and later (stochastic weight averaging over steps).

    One update per optimizer step (``trainer.global_step``), so gradient accumulation does
    not count a step once per micro-batch. The averages are float32 whatever the
    parameters' dtype (a bf16 average would round a ``1 - decay`` step away). Validation
    runs on the averaged weights, and they stay loaded until the next training batch, so
    callbacks at ``on_validation_end`` (best-epoch selection, checkpoints) see and keep the
    averaged weights: list a best-epoch callback AFTER this one. Training resumes on the
    raw weights (the optimizer's trajectory is unchanged), and the averaged weights are the
    model when fitting ends. Before the average starts, validation sees the raw weights.
    Only trainable parameters are averaged: buffers (MoE routing biases, integer category
    offsets) belong to the live model, frozen parameters (a distillation teacher) never
    move. A resumed run starts a new average.
    """

    def __init__(self, decay: float | None = None, start_epoch: int = 0) -> None:
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1) or None, got {decay}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.decay, self.start_epoch = decay, start_epoch
        self.n_updates = 0
        self._last_step = 0
        self._avg: dict[str, Tensor] | None = None
        self._raw: dict[str, Tensor] | None = None  # live weights while the average is loaded

    @staticmethod
    def _params(pl_module: nn.Module) -> dict[str, Tensor]:
        return {k: p for k, p in pl_module.named_parameters() if p.requires_grad}

    def _average_of_now(self, pl_module: nn.Module) -> dict[str, Tensor]:
        return {
            k: p.detach().to(torch.float32, copy=True) for k, p in self._params(pl_module).items()
        }

    def on_fit_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self.n_updates, self._last_step, self._avg, self._raw = 0, trainer.global_step, None, None

    def on_train_epoch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._load_raw(pl_module)
        started = trainer.current_epoch >= self.start_epoch
        if started and self.decay is not None and self._avg is None:
            self._avg = self._average_of_now(pl_module)

    @torch.no_grad()
    def _load_raw(self, pl_module: nn.Module) -> None:
        if self._raw is not None:
            for k, p in self._params(pl_module).items():
                p.copy_(self._raw[k])
            self._raw = None

    def on_train_batch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *_: Any
    ) -> None:
        self._load_raw(pl_module)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *_: Any
    ) -> None:
        if trainer.current_epoch < self.start_epoch or trainer.global_step <= self._last_step:
            return  # not started, or a micro-batch of gradient accumulation
        self._last_step = trainer.global_step
        self.n_updates += 1
        if self._avg is None:  # uniform mean: the first term
            self._avg = self._average_of_now(pl_module)
            return
        weight = 1.0 - self.decay if self.decay is not None else 1.0 / self.n_updates
        # one fused multi-tensor lerp per step (this runs after every optimizer step), not a
        # Python loop of per-parameter kernels; the dicts share named_parameters' order
        current = [p.detach().to(torch.float32) for p in self._params(pl_module).values()]
        torch._foreach_lerp_(list(self._avg.values()), current, weight)

    @torch.no_grad()
    def _load_average(self, pl_module: nn.Module) -> None:
        if self._raw is None and self._avg is not None:
            params = self._params(pl_module)
            self._raw = {k: p.detach().clone() for k, p in params.items()}
            for k, p in params.items():
                p.copy_(self._avg[k])

    def on_validation_epoch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        if not trainer.sanity_checking:
            self._load_average(pl_module)

    def on_validation_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        if trainer.sanity_checking:
            self._load_raw(pl_module)

    def on_fit_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._load_average(pl_module)
        self._raw = None
