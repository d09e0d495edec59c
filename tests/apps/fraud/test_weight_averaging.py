"""Weight averaging (``head.weight_average``, ``training.AveragedWeights``) for the ULB
recipe (issue #3): the average follows the documented recurrence (EMA or uniform), leaves
the raw training trajectory untouched, is what validation sees, and is what best-epoch
selection keeps."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from apps.fraud.config import HeadConfig
from apps.fraud.errors import FraudConfigError
from apps.fraud.training import AveragedWeights, averaged_weights


class _Lin(L.LightningModule):
    """y = w x with plain SGD: every step is easy to replay by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.lin(x).squeeze(-1) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.lin.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _RecordRaw(L.Callback):
    """The raw weights after each optimizer step (listed after EmaWeights)."""

    def __init__(self) -> None:
        self.raw: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *_):
        self.raw.append(pl_module.lin.weight.detach().clone())


def _fit(callbacks: list[L.Callback], epochs: int = 2) -> _Lin:
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([1.0, 2.0, -1.0])
    ds = torch.utils.data.TensorDataset(x, y)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    model = _Lin()
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, dl, dl)
    return model


def _expected_ema(raw: list[torch.Tensor], w0: torch.Tensor, decay: float) -> list[torch.Tensor]:
    ema, out = w0.clone(), []
    for w in raw:
        ema = decay * ema + (1 - decay) * w
        out.append(ema.clone())
    return out


def test_ema_follows_recurrence_and_leaves_training_untouched():
    rec_plain = _RecordRaw()
    _fit([rec_plain])
    ema_cb, rec = AveragedWeights(0.9), _RecordRaw()
    model = _fit([ema_cb, rec])
    # the raw trajectory (what the optimizer sees) is the same with and without averaging
    assert len(rec.raw) == len(rec_plain.raw) == 8
    for a, b in zip(rec.raw, rec_plain.raw, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = _expected_ema(rec.raw, torch.tensor([[0.5, -1.0, 2.0]]), 0.9)
    # validation after epoch 1 (step 4) and epoch 2 (step 8) ran on the averaged weights
    assert len(model.seen_in_validation) == 8  # 4 validation batches per epoch
    torch.testing.assert_close(model.seen_in_validation[0], expected[3])
    torch.testing.assert_close(model.seen_in_validation[4], expected[7])
    # and the fitted model IS the average, which differs from the last raw weights
    torch.testing.assert_close(model.lin.weight.detach(), expected[-1])
    assert (model.lin.weight.detach() - rec.raw[-1]).abs().max() > 1e-3


def test_uniform_average_from_a_start_epoch():
    """``decay=None``: the plain mean of the weights after each step of epochs >= start;
    validation before the start sees the raw weights."""
    avg_cb, rec = AveragedWeights(None, start_epoch=1), _RecordRaw()
    model = _fit([avg_cb, rec], epochs=3)
    assert len(rec.raw) == 12
    torch.testing.assert_close(model.seen_in_validation[0], rec.raw[3])  # epoch 0: raw
    torch.testing.assert_close(model.seen_in_validation[4], torch.stack(rec.raw[4:8]).mean(0))
    torch.testing.assert_close(model.lin.weight.detach(), torch.stack(rec.raw[4:]).mean(0))


def test_weight_average_config_validation():
    with pytest.raises(FraudConfigError, match="weight_average"):
        HeadConfig(weight_average="swa")
    with pytest.raises(FraudConfigError, match="ema_decay"):
        HeadConfig(weight_average="ema", ema_decay=1.0)
    with pytest.raises(FraudConfigError, match="average_start_epoch"):
        HeadConfig(average_start_epoch=-1)
    with pytest.raises(ValueError, match="decay"):
        AveragedWeights(0.0)
    from apps.fraud.config import FraudConfig

    cfg = FraudConfig()
    assert averaged_weights(cfg) is None
    cfg.head.weight_average, cfg.head.ema_decay = "ema", 0.99
    assert averaged_weights(cfg).decay == 0.99
    cfg.head.weight_average, cfg.head.average_start_epoch = "uniform", 2
    cb = averaged_weights(cfg)
    assert cb.decay is None and cb.start_epoch == 2


@pytest.mark.slow
def test_fit_with_ema_keeps_best_averaged_weights(tmp_path):
    """With ``select_best`` the kept weights are the averaged weights of the best epoch:
    scoring the validation block again reproduces the recorded best validation AP."""
    from tests.apps.fraud.fraud_model_helpers import fit_two_epochs_keeps_best_val_ap, tiny_config

    cfg = tiny_config(tmp_path, select_best="val/ap", weight_average="ema", ema_decay=0.95)
    out = fit_two_epochs_keeps_best_val_ap(cfg)
    assert np.isfinite(out.evaluation.metrics["pr_auc"])
