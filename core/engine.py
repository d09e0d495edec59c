"""The training engine: ``TaskModule`` (base of every app model), ``TrainerConfig`` and
``build_trainer``, plus ``fit`` / ``predict`` conveniences.

An app model is backbone + adapter + head + loss. ``TaskModule`` owns the backbone, the
optimizer (AdamW, warmup + cosine), the logging of loss and MoE load balance and the
hooks through which the trainer applies FP8 conversion, ``torch.compile`` and FSDP2
sharding, always in that order (torchtitan's): a layer must be FP8 before it is
compiled, and compiled before it is wrapped by FSDP2.

``build_trainer`` turns a small plain-data :class:`TrainerConfig` into a
``lightning.Trainer``; it is the only place that knows precision and strategy names, so an
app's config stays a dataclass that round-trips through YAML.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from core.backbone import Backbone, BackboneOutput
from core.callbacks import AveragedWeights, CompileBlocks, ExpertBiasUpdate, max_over_mean
from core.config import BackboneConfig
from core.growth import GrowthCallback, GrowthSchedule
from core.optim import OptimConfig, build_adamw, build_warmup_cosine
from core.precision import (
    Float8LinearFilter,
    Float8Training,
    Fp8Backend,
    convert_to_float8,
    float8_layer_names,
    resolve_fp8_backend,
)

log = logging.getLogger(__name__)

PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "fp8", "fp8-emulated")
STRATEGIES = ("auto", "ddp", "fsdp2")
# Lightning precisions that ModelParallelStrategy (our fsdp2) accepts.
_FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def seed_everything(seed: int, workers: bool = True) -> int:
    """Seed python, numpy and torch (and dataloader workers); call before building a model."""
    return lightning.seed_everything(seed, workers=workers, verbose=False)


def member_seed(seed: int, k: int) -> int:
    """Seed of seed-ensemble member ``k`` of a run seeded ``seed``: member 0 uses the run's
    seed (an ensemble of one is the single-model recipe, bit for bit), the others seeds far
    from every run's seed (104,729 apart), so runs of seeds 0, 1, 2 ... share no member."""
    return seed if k == 0 else seed + 104_729 * k


# ============================================================================ TaskModule


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively, so hparams stay YAML-friendly."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return _plain(to_dict() if callable(to_dict) else dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce_backbone_config(value: BackboneConfig | Mapping[str, Any]) -> BackboneConfig:
    if isinstance(value, BackboneConfig):
        return value
    if isinstance(value, Mapping):
        return BackboneConfig.from_dict(dict(value))
    raise TypeError(f"backbone must be a BackboneConfig or a dict, got {type(value).__name__}")


class TaskModule(lightning.LightningModule):
    """Base of every app model: ``self.backbone`` + the subclass's adapter, head and loss.

    Subclasses implement

    * ``tokens(batch) -> (tokens_BTD, padding_mask_BT | None)`` (the adapter; True = padding),
    * ``head_forward(out: BackboneOutput, batch) -> preds``,
    * ``loss(preds, batch) -> scalar Tensor``,
    * optionally ``val_metrics(preds, batch) -> dict[str, Tensor | float]`` (logged as
      ``val/<name>``, averaged over the epoch weighted by batch size; metrics that do not
      decompose over batches, such as AUROC, belong in ``on_validation_epoch_end``) and
      ``predict_step`` (default: ``self(batch)``).

    The constructor takes the backbone and optimizer configs as dataclasses or plain
    dicts and saves them as plain-dict hyperparameters (``backbone_config``,
    ``optim_config``) together with the subclass's own ``**hparams`` (dataclasses are
    turned into dicts). When the subclass's ``__init__`` uses those same parameter names,
    ``load_from_checkpoint`` rebuilds the module from the checkpoint alone::

        class Clf(TaskModule):
            def __init__(self, backbone_config, optim_config=None, n_classes=2):
                super().__init__(backbone_config, optim_config, n_classes=n_classes)
                ...

    Set the class attributes ``return_hidden`` / ``return_gates`` to True when the head
    needs all hidden states or the attention gates.
    """

    return_hidden: bool = False
    return_gates: bool = False

    def __init__(
        self,
        backbone_config: BackboneConfig | Mapping[str, Any],
        optim_config: OptimConfig | Mapping[str, Any] | None = None,
        **hparams: Any,
    ) -> None:
        super().__init__()
        self.backbone_config = _coerce_backbone_config(backbone_config)
        self.optim_config = OptimConfig.coerce(optim_config)
        self.save_hyperparameters(
            {
                "backbone_config": self.backbone_config.to_dict(),
                "optim_config": self.optim_config.to_dict(),
                **_plain(hparams),
            }
        )
        self.backbone = Backbone(self.backbone_config)
        self._blocks_compiled = False

    @property
    def optim_config_dict(self) -> dict[str, Any]:
        """The optimizer config as plain data (for predictors that save their own config)."""
        return self.optim_config.to_dict()

    # ------------------------------------------------------------------ subclass API
    def tokens(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError(f"{type(self).__name__} must implement tokens(batch)")

    def head_forward(self, out: BackboneOutput, batch: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement head_forward(out, batch)")

    def loss(self, preds: Any, batch: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(preds, batch)")

    def val_metrics(self, preds: Any, batch: Any) -> Mapping[str, Tensor | float] | None:
        return None

    # ------------------------------------------------------------------ forward
    def encode(self, batch: Any) -> tuple[BackboneOutput, int]:
        """Adapter + backbone; returns the backbone output and the batch size."""
        tokens_BTD, padding_mask_BT = self.tokens(batch)
        out = self.backbone(
            tokens_BTD,
            padding_mask_BT=padding_mask_BT,
            return_hidden=self.return_hidden,
            return_gates=self.return_gates,
        )
        return out, int(tokens_BTD.shape[0])

    def forward(self, batch: Any) -> Any:
        out, _ = self.encode(batch)
        return self.head_forward(out, batch)

    def _shared_step(self, batch: Any) -> tuple[Any, Tensor, int]:
        out, batch_size = self.encode(batch)
        preds = self.head_forward(out, batch)
        return preds, self.loss(preds, batch), batch_size

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        preds, loss, batch_size = self._shared_step(batch)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        self._log_moe_balance("moe", batch_size, per_layer=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self(batch)

    def _eval_step(self, stage: str, batch: Any) -> Tensor:
        preds, loss, batch_size = self._shared_step(batch)
        kw = {"on_step": False, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        self.log(f"{stage}/loss", loss, prog_bar=True, **kw)
        metrics = self.val_metrics(preds, batch)
        if metrics:
            self.log_dict({f"{stage}/{name}": value for name, value in metrics.items()}, **kw)
        self._log_moe_balance(f"{stage}/moe", batch_size, per_layer=False)
        return loss

    def _log_moe_balance(self, prefix: str, batch_size: int, per_layer: bool) -> None:
        """Log each MoE layer's ``last_load_balance`` (max/mean tokens per expert) and the mean.

        The values stay tensors so logging adds no host sync per step. Training values are
        per rank (as ``train/loss``: an all-reduce per step is not worth it); evaluation
        values are averaged over ranks at epoch end.
        """
        values = []
        for layer in self.backbone.moe_layers():
            value = getattr(layer, "last_load_balance", None)
            if value is not None:
                values.append(torch.as_tensor(value).detach().float())
        if not values:
            return
        training = prefix == "moe"
        kw = {
            "on_step": training,
            "on_epoch": True,
            "batch_size": batch_size,
            "sync_dist": not training,
        }
        if per_layer:
            for j, value in enumerate(values):
                self.log(f"{prefix}/layer{j}/load_balance_max_over_mean", value, **kw)
        self.log(f"{prefix}/load_balance_max_over_mean", torch.stack(values).mean(), **kw)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on norms, biases, embeddings) + per-step warmup/cosine schedule."""
        cfg = self.optim_config
        optimizer = build_adamw(self, cfg)
        total = cfg.max_steps
        if total is None:
            estimated = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError(
                    "OptimConfig.max_steps is None and the trainer's length is unbounded; set"
                    " TrainerConfig.max_epochs/max_steps or OptimConfig.max_steps"
                )
            total = int(estimated)
        scheduler = build_warmup_cosine(optimizer, cfg, max(1, total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": "step",
                "frequency": 1,
                "name": "lr",
            },
        }

    # ------------------------------------------------------------------ precision / compile / sharding
    def transformer_blocks(self) -> list[nn.Module]:
        """The backbone's repeated blocks: the unit of compilation and FSDP2 sharding."""
        for attr in ("blocks", "layers"):
            blocks = getattr(self.backbone, attr, None)
            if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                return list(blocks)
        raise AttributeError(f"{type(self.backbone).__name__} has no `blocks` ModuleList")

    def convert_to_float8(
        self,
        backend: Fp8Backend,
        module_filter_fn: Any = None,
        enable_fsdp_float8_all_gather: bool = False,
    ) -> list[str]:
        """Convert the backbone's eligible linears to FP8 (idempotent); returns their names.

        Only the backbone: adapters and heads are small and sit where precision matters
        most (first and last layer), as in torchtitan, which keeps the output layer in bf16.
        """
        done = float8_layer_names(self.backbone)
        if done:
            return done
        return convert_to_float8(
            self.backbone, backend, module_filter_fn, enable_fsdp_float8_all_gather
        )

    def compile_blocks(
        self, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = None
    ) -> None:
        """``torch.compile`` every transformer block in place (idempotent)."""
        if self._blocks_compiled:
            return
        for block in self.transformer_blocks():
            block.compile(mode=mode, backend=backend, dynamic=dynamic)
        self._blocks_compiled = True

    def configure_model(self) -> None:
        """Under the fsdp2 strategy: :func:`fully_shard_task` with Lightning's device mesh.

        Called by Lightning with the device mesh set (``ModelParallelStrategy``); a no-op
        for every other strategy.
        """
        if self._device_mesh is None:
            return
        bf16 = self._trainer is not None and self.trainer.precision == "bf16-mixed"
        fully_shard_task(self, self._device_mesh, bf16_gather=bf16)


def fully_shard_task(module: nn.Module, mesh: Any, bf16_gather: bool = False) -> None:
    """FSDP2 for a task module: ``fully_shard`` each transformer block, then each direct child.

    Blocks are sharded one by one so that only one block's parameters are gathered at a
    time; afterwards each direct child that holds parameters (backbone with its embeddings
    and final norm, adapter, head) becomes its own FSDP unit, so every parameter is sharded
    and its gradient reduced. ``mesh``: Lightning's 2-D mesh (its ``data_parallel`` axis is
    used) or a 1-D mesh.

    ``bf16_gather`` (the engine sets it under ``bf16-mixed``): the shards stay float32 (the
    optimizer's master weights) but are gathered in bfloat16 and gradients reduced in
    float32 (FSDP2's ``MixedPrecisionPolicy``, torchtitan's default): autocast would cast the
    weights to bf16 for every matmul anyway, and gathering fp32 moves twice the bytes.
    """
    from torch.distributed.fsdp import (
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if isinstance(getattr(module, "backbone", None), FSDPModule):
        return  # already sharded (a second fit with the same module)
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"fsdp2 shards submodules; move parameters {own} of {type(module).__name__} into a submodule"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    kw: dict[str, Any] = {"mesh": dp_mesh}
    if bf16_gather:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    blocks = module.transformer_blocks() if hasattr(module, "transformer_blocks") else []
    for block in blocks:
        fully_shard(block, **kw)
    # Submodules called through a method other than forward (``fsdp_forward_methods``, e.g.
    # PatchEmbed1d.forward_with_mask) become their own units with that method hooked, or
    # the call would see the unsharded-parameter hooks never run.
    for sub in list(module.modules()):
        methods = getattr(sub, "fsdp_forward_methods", ())
        if sub is not module and methods and not isinstance(sub, FSDPModule):
            fully_shard(sub, **kw)
            for name in methods:
                register_fsdp_forward_method(sub, name)
    for child in module.children():
        if any(True for _ in child.parameters()) and not isinstance(child, FSDPModule):
            fully_shard(child, **kw)


# ============================================================================ trainer


@dataclass
class TrainerConfig:
    """Everything ``build_trainer`` needs; plain data (YAML round-trip via to_dict/from_dict).

    precision: ``32`` | ``bf16-mixed`` | ``16-mixed`` | ``fp8`` (| ``bf16-true``,
    ``fp8-emulated``). ``fp8`` uses torchao on a CUDA GPU of compute capability >= 8.9 and
    raises :class:`core.precision.PrecisionUnavailableError` elsewhere, unless
    ``fp8_emulated`` (or ``fp8-emulated``) asks for the CPU-capable emulation. FP8 runs in
    Lightning's ``bf16-true`` (bf16 weights and optimizer state); ``fp8_min_features`` and
    ``fp8_exclude`` configure :class:`core.precision.Float8LinearFilter`.
    ``16-mixed`` on CPU runs as ``bf16-mixed`` (see :func:`resolve_precision`).
    strategy: ``auto`` | ``ddp`` | ``fsdp2``. ``monitor=None`` checkpoints only ``last``;
    ``early_stopping_patience=None`` disables early stopping. ``seed=None`` skips seeding.
    ``growth``: a :class:`core.growth.GrowthSchedule` (train small, grow at given optimizer
    steps, continue; YAML ``growth: {steps: [{at_step, operator, kwargs}]}`` or a bare list
    of steps); ``build_trainer`` then adds a :class:`core.growth.GrowthCallback`. Growth
    needs single-process training (strategy ``auto``) and is checked here, before a run starts.
    ``ema_decay``: ship the exponential moving average of the trainable weights
    (:class:`core.callbacks.AveragedWeights`; validation inside ``fit`` sees the average);
    ``None`` ships the last weights. Not with fsdp2 or a growth schedule.
    """

    max_epochs: int | None = 10
    max_steps: int = -1
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32"
    fp8_emulated: bool = False
    fp8_min_features: int = 2048
    fp8_exclude: tuple[str, ...] = ()
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int | None = 1
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 50
    default_root_dir: str | None = None
    enable_progress_bar: bool = True
    progress_refresh_rate: int = 1
    enable_model_summary: bool = True
    enable_checkpointing: bool = True
    monitor: str | None = "val/loss"
    monitor_mode: str = "min"
    save_top_k: int = 1
    save_last: bool = True
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    seed: int | None = 0
    deterministic: bool = False
    expert_bias_update: bool = True
    ddp_find_unused_parameters: bool = False
    growth: GrowthSchedule | None = None
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        self.precision = str(self.precision)
        if self.ema_decay is not None:
            self.ema_decay = float(self.ema_decay)
            if not 0.0 < self.ema_decay < 1.0:
                raise ValueError(
                    f"TrainerConfig.ema_decay={self.ema_decay}: expected 0 < ema_decay < 1"
                    " (or null for no averaging)"
                )
            if self.strategy == "fsdp2":
                raise ValueError(
                    "TrainerConfig.ema_decay is not wired for strategy='fsdp2' (the averages"
                    " would have to be sharded like the parameters); use 'auto' or 'ddp'"
                )
            if self.growth is not None and GrowthSchedule.coerce(self.growth).steps:
                raise ValueError(
                    "TrainerConfig.ema_decay and a growth schedule do not combine: growth"
                    " changes the parameters the averages follow"
                )
        if self.growth is not None:
            self.growth = GrowthSchedule.coerce(self.growth)
            if self.strategy != "auto" and self.growth.steps:
                raise ValueError(
                    f"TrainerConfig.growth needs strategy='auto' (single process); got"
                    f" strategy={self.strategy!r}: a grown model would have to be re-wrapped"
                    " by DDP/FSDP2"
                )
        self.fp8_exclude = tuple(self.fp8_exclude)
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TrainerConfig.precision={self.precision!r}; expected one of {PRECISIONS}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"TrainerConfig.strategy={self.strategy!r}; expected one of {STRATEGIES}"
            )
        if self.monitor_mode not in ("min", "max"):
            raise ValueError(
                f"TrainerConfig.monitor_mode={self.monitor_mode!r}; expected 'min' or 'max'"
            )
        if self.accumulate_grad_batches < 1:
            raise ValueError(
                f"TrainerConfig.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}"
            )
        if self.early_stopping_patience is not None and self.monitor is None:
            raise ValueError(
                "TrainerConfig.early_stopping_patience needs a monitor metric (monitor=None)"
            )

    @classmethod
    def quiet(cls, max_epochs: int, **overrides: Any) -> TrainerConfig:
        """fp32, no checkpoints, progress bar, model summary or sanity validation: the
        defaults of small app and test runs whose results go to MLflow instead."""
        settings: dict[str, Any] = {
            "max_epochs": max_epochs,
            "precision": "32",
            "monitor": None,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        }
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainerConfig keys: {sorted(unknown)}")
        return cls(**data)


def resolve_accelerator(accelerator: str) -> str:
    """``auto``/``gpu`` -> the concrete accelerator Lightning would pick (cuda, mps or cpu)."""
    if accelerator in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        if accelerator == "gpu":
            raise ValueError("accelerator='gpu' but no CUDA or MPS device is available")
        return "cpu"
    return accelerator


def resolve_precision(
    precision: str, accelerator: str, fp8_emulated: bool = False
) -> tuple[str, Fp8Backend | None]:
    """Map a Keel precision name to ``(lightning_precision, fp8_backend | None)``.

    * ``32`` -> ``32-true``.
    * ``fp8`` / ``fp8-emulated`` -> ``bf16-true`` plus an FP8 backend (see
      :func:`core.precision.resolve_fp8_backend`; raises when FP8 cannot run). Not
      ``bf16-mixed``: torchao's ``Float8Linear`` fails under autocast in evaluation
      (``aten.to.dtype`` on its float8 tensor inside ``torch.mm``; seen with torchao 0.17 on
      an H200), and torchao's recipes assume bf16 modules rather than autocast.
    * ``16-mixed`` on CPU -> ``bf16-mixed``, logged as a warning. Lightning 2.6 does the
      same (``_check_and_init_precision``: "AMP with fp16 is not supported on CPU. Using
      precision='bf16-mixed' instead."), i.e. ``torch.autocast('cpu', dtype=torch.bfloat16)``
      with no ``GradScaler``; we make the switch here so the run's config and logs name what
      actually ran. On CUDA, ``16-mixed`` is float16 autocast with a ``GradScaler``.
    """
    accelerator = resolve_accelerator(accelerator)
    if precision in ("fp8", "fp8-emulated"):
        backend = resolve_fp8_backend(
            accelerator, emulated=fp8_emulated or precision == "fp8-emulated"
        )
        return "bf16-true", backend
    if precision in ("32", "32-true"):
        return "32-true", None
    if precision == "16-mixed" and accelerator == "cpu":
        log.warning(
            "precision='16-mixed' on CPU: Lightning has no float16 AMP on CPU and runs 'bf16-mixed'"
            " instead, i.e. torch.autocast('cpu', dtype=torch.bfloat16) with no GradScaler (bf16"
            " keeps float32's exponent range, so no loss scaling is needed); Keel selects"
            " 'bf16-mixed' explicitly."
        )
        return "bf16-mixed", None
    return precision, None


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure data parallelism: a 1-D FSDP2 mesh over all ranks.

    Lightning's default puts every GPU of a node on the tensor-parallel axis; Keel's models
    use no tensor parallelism, so ``data_parallel_size`` is all processes and
    ``tensor_parallel_size`` is 1. ``TaskModule.configure_model`` applies ``fully_shard``.
    """

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        super().setup_environment()


def build_strategy(
    cfg: TrainerConfig, lightning_precision: str
) -> str | lightning.pytorch.strategies.Strategy:
    if cfg.strategy == "auto":
        return "auto"
    if cfg.strategy == "ddp":
        # broadcast_buffers=False: DDP would otherwise copy rank 0's buffers over every
        # rank's at each forward, wiping the per-rank MoE token counts accumulated over
        # micro-batches; expert biases stay equal because ExpertBiasUpdate all-reduces the
        # counts and every rank applies the same update.
        return DDPStrategy(
            broadcast_buffers=False, find_unused_parameters=cfg.ddp_find_unused_parameters
        )
    if lightning_precision not in _FSDP2_PRECISIONS:
        raise ValueError(
            f"strategy='fsdp2' (Lightning ModelParallelStrategy) supports precisions"
            f" {_FSDP2_PRECISIONS}; got {cfg.precision!r} (-> {lightning_precision!r})"
        )
    return FSDP2Strategy(save_distributed_checkpoint=True)


def build_callbacks(
    cfg: TrainerConfig, fp8_backend: Fp8Backend | None, has_logger: bool
) -> list[Callback]:
    """The engine's callbacks, in the order they must run at ``setup``: FP8, then compile."""
    callbacks: list[Callback] = []
    if fp8_backend is not None:
        fp8_filter = Float8LinearFilter(min_features=cfg.fp8_min_features, exclude=cfg.fp8_exclude)
        callbacks.append(
            Float8Training(
                fp8_backend,
                fp8_filter,
                enable_fsdp_float8_all_gather=(
                    fp8_backend == "torchao" and cfg.strategy == "fsdp2"
                ),
            )
        )
    if cfg.compile:
        callbacks.append(CompileBlocks(mode=cfg.compile_mode, backend=cfg.compile_backend))
    if cfg.growth is not None and cfg.growth.steps:
        # before ExpertBiasUpdate, whose step hook then sees the grown MoE layers
        callbacks.append(GrowthCallback(cfg.growth))
    if cfg.expert_bias_update:
        callbacks.append(ExpertBiasUpdate())
    if cfg.ema_decay is not None:
        callbacks.append(AveragedWeights(cfg.ema_decay))
    if cfg.enable_checkpointing:
        callbacks.append(
            ModelCheckpoint(
                monitor=cfg.monitor,
                mode=cfg.monitor_mode,
                save_top_k=cfg.save_top_k if cfg.monitor is not None else 0,
                save_last=cfg.save_last,
                filename="epoch{epoch:03d}-step{step}",
                auto_insert_metric_name=False,
            )
        )
    if cfg.early_stopping_patience is not None:
        callbacks.append(
            EarlyStopping(
                monitor=cfg.monitor,
                mode=cfg.monitor_mode,
                patience=cfg.early_stopping_patience,
                min_delta=cfg.early_stopping_min_delta,
            )
        )
    if cfg.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate))
    if has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def build_trainer(
    cfg: TrainerConfig,
    extra_callbacks: Iterable[Callback] = (),
    logger: Any = None,
) -> lightning.Trainer:
    """A ``lightning.Trainer`` for ``cfg``; seeds first when ``cfg.seed`` is set.

    ``logger=None`` (or ``False``) means no logger (metrics still reach ``trainer.callback_metrics`` and
    callbacks); pass e.g. an ``MLFlowLogger``. Raises ``PrecisionUnavailableError`` for FP8
    on a machine that cannot run it and ``ValueError`` for inconsistent settings.
    """
    if cfg.seed is not None:
        seed_everything(cfg.seed, workers=True)
    accelerator = resolve_accelerator(cfg.accelerator)
    precision, fp8_backend = resolve_precision(cfg.precision, accelerator, cfg.fp8_emulated)
    if fp8_backend == "torchao" and not cfg.compile:
        log.info(
            "precision fp8 (torchao) without compile=True: casts stay unfused, often slower than bf16"
        )
    strategy = build_strategy(cfg, precision)
    if logger is False:
        logger = None
    callbacks = build_callbacks(cfg, fp8_backend, has_logger=bool(logger))
    callbacks.extend(extra_callbacks)
    optional = {
        k: v
        for k, v in {
            "val_check_interval": cfg.val_check_interval,
            "limit_train_batches": cfg.limit_train_batches,
            "limit_val_batches": cfg.limit_val_batches,
        }.items()
        if v is not None
    }
    return lightning.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=precision,
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        gradient_clip_val=cfg.gradient_clip_val,
        gradient_clip_algorithm="norm",
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        check_val_every_n_epoch=cfg.check_val_every_n_epoch,
        num_sanity_val_steps=cfg.num_sanity_val_steps,
        log_every_n_steps=cfg.log_every_n_steps,
        default_root_dir=cfg.default_root_dir,
        enable_progress_bar=cfg.enable_progress_bar,
        enable_model_summary=cfg.enable_model_summary,
        enable_checkpointing=cfg.enable_checkpointing,
        deterministic=cfg.deterministic,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        **optional,
    )


# ============================================================================ conveniences


def fit(
    module: lightning.LightningModule,
    datamodule: lightning.LightningDataModule,
    trainer_cfg: TrainerConfig,
    logger: Any = None,
    extra_callbacks: Iterable[Callback] = (),
    ckpt_path: str | None = None,
) -> lightning.Trainer:
    """``build_trainer(trainer_cfg, ...)`` then ``trainer.fit(module, datamodule)``; returns the trainer."""
    trainer = build_trainer(trainer_cfg, extra_callbacks=extra_callbacks, logger=logger)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def concat_predictions(outputs: Sequence[Any]) -> Any:
    """Concatenate per-batch predictions along dim 0 (tensors, or dicts/tuples of tensors)."""
    if not outputs:
        raise ValueError("no predictions to concatenate (empty dataloader?)")
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat([o.detach().cpu() for o in outputs], dim=0)
    if isinstance(first, Mapping):
        return {k: concat_predictions([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_predictions([o[i] for o in outputs]) for i in range(len(first)))
    raise TypeError(f"cannot concatenate predictions of type {type(first).__name__}")


def predict(
    module: lightning.LightningModule,
    data: Any,
    trainer_cfg: TrainerConfig | None = None,
    trainer: lightning.Trainer | None = None,
) -> Any:
    """Run ``predict_step`` over ``data`` (a DataLoader or a LightningDataModule) and return
    the concatenated predictions, on CPU.

    Without ``trainer`` one is built from ``trainer_cfg`` (default: a plain ``TrainerConfig``)
    on one device, without logger, checkpoints, progress bar or seeding, so the returned
    rows are all rows, in order. Pass the training run's ``TrainerConfig`` when it used a
    ``*-true`` or FP8 precision: the weights are then bf16 and the inputs must be cast to
    match, which only the same precision plugin does.
    """
    if trainer is None:
        base = trainer_cfg or TrainerConfig()
        cfg = dataclasses.replace(
            base,
            devices=1,
            num_nodes=1,
            strategy="auto",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            early_stopping_patience=None,
            seed=None,
        )
        trainer = build_trainer(cfg)
    if isinstance(data, lightning.LightningDataModule):
        outputs = trainer.predict(module, datamodule=data, return_predictions=True)
    else:
        outputs = trainer.predict(module, dataloaders=data, return_predictions=True)
    return concat_predictions(outputs)


__all__ = [
    "FSDP2Strategy",
    "OptimConfig",
    "PRECISIONS",
    "STRATEGIES",
    "TaskModule",
    "TrainerConfig",
    "build_callbacks",
    "build_strategy",
    "build_trainer",
    "concat_predictions",
    "fit",
    "max_over_mean",
    "predict",
    "resolve_accelerator",
    "resolve_precision",
    "seed_everything",
]
