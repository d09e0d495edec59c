"""Exponential moving average of the weights during training (``weight_ema`` in the config).

On C-MAPSS the validation RMSE jumps from epoch to epoch (a few thousand noisy windows of ~80
engines per epoch), and the best epoch is picked from those jumps. Validating, and keeping,
the running average of the weights instead of the last step's weights smooths that noise out
at the cost of one extra copy of a small model.

Each training step: ``ema = decay * ema + (1 - decay) * w`` over the floating-point entries
of the state dict. Validation runs with the EMA weights loaded (so the best-epoch callback
records and later restores EMA weights); the raw weights are put back before the next step.
After training the module holds the EMA weights.
"""

from __future__ import annotations

from typing import Any

import lightning
import torch

from apps.maintenance.errors import MaintenanceDataError


class WeightEMA(lightning.Callback):
    """See module docstring. Must come *after* the best-epoch callback in the callback list,
    so that callback's ``on_validation_end`` still sees the EMA weights."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise MaintenanceDataError(f"weight_ema={decay}: expected 0 < decay < 1 or null")
        self.decay = float(decay)
        self.ema: dict[str, torch.Tensor] | None = None
        self._raw: dict[str, torch.Tensor] | None = None

    def _float_items(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._swap_back(pl_module)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        cur = self._float_items(pl_module)
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in cur.items()}
            return
        for k, v in cur.items():
            self.ema[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.ema is None or self._raw is not None:
            return
        cur = self._float_items(pl_module)
        self._raw = {k: v.detach().clone() for k, v in cur.items()}
        for k, v in cur.items():
            v.copy_(self.ema[k])

    @torch.no_grad()
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """The trained model is the EMA (the best-epoch callback may then restore its pick)."""
        self._raw = None
        if self.ema is not None:
            for k, v in self._float_items(pl_module).items():
                v.copy_(self.ema[k])

    def _swap_back(self, pl_module: Any) -> None:
        if self._raw is None:
            return
        for k, v in self._float_items(pl_module).items():
            v.copy_(self._raw[k])
        self._raw = None
