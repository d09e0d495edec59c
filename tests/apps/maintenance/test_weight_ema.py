"""Weight EMA: validation sees the hand-computed running average of the raw weights, training
continues from the raw weights, the fitted module ends with the EMA, and bad decays are refused."""

from __future__ import annotations

import lightning
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from apps.maintenance.config import MaintenanceConfig
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.weight_ema import WeightEMA


class _Linear(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.step_weights: list[torch.Tensor] = []  # the weights each training step ran with

    def training_step(self, batch, idx):
        self.step_weights.append(self.lin.weight.detach().clone())
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)

    def validation_step(self, batch, idx):
        x, y = batch
        self.log("val", torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recorder(lightning.Callback):
    """Raw weights after every step (runs before the EMA's update) and in validation."""

    def __init__(self) -> None:
        self.raw, self.in_val = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        self.raw.append(module.lin.weight.detach().clone())

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.in_val.append(module.lin.weight.detach().clone())


def test_validation_sees_the_ema_and_training_resumes_from_raw_weights():
    torch.manual_seed(0)
    x = torch.randn(12, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(12)
    dl = DataLoader(TensorDataset(x, y), batch_size=4)  # 3 steps per epoch
    rec, ema = _Recorder(), WeightEMA(0.5)
    module = _Linear()
    trainer = lightning.Trainer(
        max_epochs=2,
        callbacks=[rec, ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(module, dl, dl)
    raw = [w.numpy() for w in rec.raw]
    assert len(raw) == 6
    expected, running = [], raw[0]  # the EMA starts at the first step's weights
    for w in raw[1:]:
        running = 0.5 * running + 0.5 * w
        expected.append(running)
    # validation after epoch 1 (step 3) and epoch 2 (step 6) ran on the EMA
    np.testing.assert_allclose(rec.in_val[0].numpy(), expected[1], rtol=1e-6)
    np.testing.assert_allclose(rec.in_val[1].numpy(), expected[4], rtol=1e-6)
    assert not np.allclose(expected[1], raw[2])  # the EMA differs from the raw weights
    # the first step of epoch 2 started from the raw weights of step 3, not the EMA
    np.testing.assert_allclose(module.step_weights[3].numpy(), raw[2], rtol=1e-6)
    # the fitted module holds the final EMA
    np.testing.assert_allclose(module.lin.weight.detach().numpy(), expected[4], rtol=1e-6)


def test_bad_decay_is_refused():
    with pytest.raises(MaintenanceDataError, match="weight_ema"):
        WeightEMA(1.0)
    with pytest.raises(MaintenanceDataError, match="weight_ema"):
        MaintenanceConfig(weight_ema=0.0)
    assert MaintenanceConfig().weight_ema is None  # off unless configured
