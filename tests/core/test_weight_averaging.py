"""``core.callbacks.AveragedWeights`` (``TrainerConfig.ema_decay``; the fraud app's
``head.weight_average``) with the real Lightning Trainer: the average follows the documented
recurrence (EMA per optimizer step, or the uniform mean from a start epoch), validation
inside ``fit`` sees it while the raw training trajectory is untouched, the fitted model is
the average, and only trainable parameters are averaged, in float32."""

from __future__ import annotations

import lightning
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from core.callbacks import AveragedWeights
from core.engine import TrainerConfig, build_trainer
from core.growth import GrowthSchedule
from tests.core.test_engine import TinyData, TinySeqTask, new_task, quiet_cfg, tiny_backbone


class RawTrajectory(lightning.pytorch.Callback):
    """The raw trainable parameters at the start and after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []
        self._last = 0

    @staticmethod
    def _snap(pl_module: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_train_start(self, trainer, pl_module) -> None:
        self.steps = [self._snap(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.steps.append(self._snap(pl_module))


def reference_ema(steps: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    ema = [p.clone() for p in steps[0]]
    for params in steps[1:]:
        ema = [decay * e + (1 - decay) * p for e, p in zip(ema, params, strict=True)]
    return ema


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_shipped_weights_are_the_average_of_the_raw_trajectory(tmp_path, accumulate):
    decay = 0.8
    task, rec = new_task(0), RawTrajectory()
    cfg = quiet_cfg(
        tmp_path,
        max_epochs=2,
        ema_decay=decay,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=False,
        monitor=None,
        limit_val_batches=0,
    )
    build_trainer(cfg, extra_callbacks=[rec], logger=False).fit(task, datamodule=TinyData())
    n_steps = 2 * 256 // 32 // accumulate
    assert len(rec.steps) == n_steps + 1  # one average update per optimizer step
    want = reference_ema(rec.steps, decay)
    got = trainable(task)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # and the average is not the last raw point (the test would pass trivially otherwise)
    assert max((g - r).abs().max().item() for g, r in zip(got, rec.steps[-1], strict=True)) > 1e-3


class FixedOrderData(TinyData):
    """Training order from its own generator: a validation loop draws from the global RNG
    (each DataLoader iterator takes a base seed), which would otherwise reshuffle training."""

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)


class ValSnapshot(TinySeqTask):
    """Records its head weight when a validation epoch starts (after the callbacks' hooks)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: list[tuple[int, torch.Tensor]] = []

    def on_validation_epoch_start(self) -> None:
        self.seen.append((self.trainer.global_step, self.head.weight.detach().clone()))


def test_validation_sees_the_average_and_training_continues_from_raw(tmp_path):
    decay = 0.7
    torch.manual_seed(0)
    with_val, rec = ValSnapshot(tiny_backbone()), RawTrajectory()
    no_val = ValSnapshot(tiny_backbone())
    no_val.load_state_dict(with_val.state_dict())
    base = dict(max_epochs=3, ema_decay=decay, enable_checkpointing=False, monitor=None)
    build_trainer(quiet_cfg(tmp_path, **base), extra_callbacks=[rec], logger=False).fit(
        with_val, datamodule=FixedOrderData()
    )
    build_trainer(quiet_cfg(tmp_path, limit_val_batches=0, **base), logger=False).fit(
        no_val, datamodule=FixedOrderData()
    )
    assert [s for s, _ in with_val.seen] == [8, 16, 24]
    head_index = [n for n, p in with_val.named_parameters() if p.requires_grad].index("head.weight")
    for step, weight in with_val.seen:
        want = reference_ema(rec.steps[: step + 1], decay)[head_index]
        torch.testing.assert_close(weight, want, atol=1e-6, rtol=1e-5)
    # validation swapped the raw weights back: both runs end at the same point
    for a, b in zip(trainable(with_val), trainable(no_val), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_integer_buffers_and_frozen_parameters_are_left_alone(tmp_path):
    task = new_task(0)
    task.register_buffer("codes_C", torch.tensor([3, 7, 11], dtype=torch.long))
    task.head.bias.requires_grad_(False)
    frozen = task.head.bias.detach().clone()
    cfg = quiet_cfg(
        tmp_path,
        max_epochs=1,
        ema_decay=0.9,
        enable_checkpointing=False,
        monitor=None,
        limit_val_batches=0,
    )
    build_trainer(cfg, logger=False).fit(task, datamodule=TinyData())
    assert task.codes_C.dtype == torch.long and task.codes_C.tolist() == [3, 7, 11]
    torch.testing.assert_close(task.head.bias.detach(), frozen, atol=0, rtol=0)


def test_ema_config_is_checked_up_front():
    with pytest.raises(ValueError, match="0 < ema_decay < 1"):
        TrainerConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="fsdp2"):
        TrainerConfig(ema_decay=0.99, strategy="fsdp2")
    growth = GrowthSchedule.coerce([{"at_step": 5, "operator": "grow_depth", "kwargs": {}}])
    with pytest.raises(ValueError, match="growth"):
        TrainerConfig(ema_decay=0.99, growth=growth)
    assert TrainerConfig.from_dict({"ema_decay": "0.995"}).ema_decay == 0.995
    with pytest.raises(ValueError, match="decay"):
        AveragedWeights(0.0)
    with pytest.raises(ValueError, match="start_epoch"):
        AveragedWeights(0.9, start_epoch=-1)


def test_validation_leaves_float32_averages_of_bf16_weights_unrounded():
    """bf16 parameters (bf16-true / FP8 runs): loading the averages for validation rounds
    what the model sees, never the float32 averages themselves, and the raw bf16 weights
    come back bit for bit."""
    module = torch.nn.Linear(3, 1, bias=False).to(torch.bfloat16)
    cb = AveragedWeights(0.99)
    cb._avg = {"weight": torch.tensor([[1.001, 2.002, 3.003]], dtype=torch.float32)}
    before = cb._avg["weight"].clone()
    raw = module.weight.detach().clone()
    cb._load_average(module)
    assert module.weight.dtype == torch.bfloat16
    torch.testing.assert_close(module.weight.detach(), before.to(torch.bfloat16), rtol=0, atol=0)
    cb._load_raw(module)
    torch.testing.assert_close(module.weight.detach(), raw, rtol=0, atol=0)
    torch.testing.assert_close(cb._avg["weight"], before, rtol=0, atol=0)  # not rounded
    assert not torch.equal(before.to(torch.bfloat16).float(), before)  # (rounding would show)


class _Lin(lightning.LightningModule):
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


class _RecordRaw(lightning.pytorch.Callback):
    """The raw weights after each optimizer step (listed after AveragedWeights)."""

    def __init__(self) -> None:
        self.raw: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *_):
        self.raw.append(pl_module.lin.weight.detach().clone())


def _fit(callbacks: list[lightning.pytorch.Callback], epochs: int = 2) -> _Lin:
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([1.0, 2.0, -1.0])
    ds = torch.utils.data.TensorDataset(x, y)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    model = _Lin()
    trainer = lightning.Trainer(
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


def test_ema_follows_recurrence_and_leaves_training_untouched():
    rec_plain = _RecordRaw()
    _fit([rec_plain])
    ema_cb, rec = AveragedWeights(0.9), _RecordRaw()
    model = _fit([ema_cb, rec])
    # the raw trajectory (what the optimizer sees) is the same with and without averaging
    assert len(rec.raw) == len(rec_plain.raw) == 8
    for a, b in zip(rec.raw, rec_plain.raw, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = [[torch.tensor([[0.5, -1.0, 2.0]])], *([w] for w in rec.raw)]

    def ema_after(n_steps: int) -> torch.Tensor:
        return reference_ema(steps[: n_steps + 1], 0.9)[0]

    # validation after epoch 1 (step 4) and epoch 2 (step 8) ran on the averaged weights
    assert len(model.seen_in_validation) == 8  # 4 validation batches per epoch
    torch.testing.assert_close(model.seen_in_validation[0], ema_after(4))
    torch.testing.assert_close(model.seen_in_validation[4], ema_after(8))
    # and the fitted model IS the average, which differs from the last raw weights
    torch.testing.assert_close(model.lin.weight.detach(), ema_after(8))
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
