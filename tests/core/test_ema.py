"""EMAWeights (``TrainerConfig.ema_decay``) with the real Lightning Trainer on the tiny task:
the shipped weights are the exponential average of the raw trajectory, validation inside
``fit`` sees the average and leaves training untouched, and only trainable float
parameters are averaged."""

from __future__ import annotations

import lightning
import pytest
import torch
from torch.utils.data import DataLoader

from core.callbacks import EMAWeights
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
        EMAWeights(0.0)


def test_resumed_averages_must_match_the_module(tmp_path):
    cb = EMAWeights(0.9)
    cb.load_state_dict({"n_updates": 3, "shadow": [torch.zeros(2, 2)]})
    cfg = quiet_cfg(
        tmp_path, max_epochs=1, enable_checkpointing=False, monitor=None, limit_val_batches=0
    )
    with pytest.raises(ValueError, match="do not match"):
        build_trainer(cfg, extra_callbacks=[cb], logger=False).fit(
            new_task(0), datamodule=TinyData()
        )


def test_validation_leaves_float32_averages_of_bf16_weights_unrounded():
    """bf16 parameters (bf16-true / FP8 runs): loading the averages for validation rounds
    what the model sees, never the float32 averages themselves, and the raw bf16 weights
    come back bit for bit."""
    cb = EMAWeights(0.99)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    cb._params = [w]
    cb._shadow = [torch.tensor([1.001, 2.002, 3.003], dtype=torch.float32)]
    before = cb._shadow[0].clone()
    raw = w.detach().clone()
    cb._load_averages()
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w.detach(), before.to(torch.bfloat16), rtol=0, atol=0)
    cb._restore_raw()
    torch.testing.assert_close(w.detach(), raw, rtol=0, atol=0)
    torch.testing.assert_close(cb._shadow[0], before, rtol=0, atol=0)  # not rounded to bf16
    assert not torch.equal(before.to(torch.bfloat16).float(), before)  # (rounding would show)
