"""The training engine end to end with the real Lightning Trainer on a tiny model.

``TinySeqTask`` (sequence classification on synthetic data) is the reference concrete
``TaskModule``; test_fp8.py and test_callbacks.py reuse it.
"""

from __future__ import annotations

import logging
import math

import lightning
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.backbone import BackboneOutput
from core.config import AttentionConfig, BackboneConfig, MoEConfig
from core.engine import (
    OptimConfig,
    TaskModule,
    TrainerConfig,
    build_trainer,
    concat_predictions,
    fit,
    member_seed,
    predict,
    resolve_precision,
    seed_everything,
)
from core.optim import split_decay_parameters, warmup_cosine_factor

SEQ_LEN, N_FEATURES = 8, 4


def tiny_backbone(**moe_kw: object) -> BackboneConfig:
    return BackboneConfig(
        d_model=32,
        n_layers=2,
        ffn_hidden=64,
        attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=32, **moe_kw),
        n_dense_layers=1,
    )


class TinyAdapter(nn.Module):
    """Per-step linear embedding + learned positions (a ``pos_embed`` gets no weight decay)."""

    def __init__(self, n_features: int, d_model: int, seq_len: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_features, d_model)
        self.pos_embed = nn.Parameter(torch.randn(1, seq_len, d_model) * 0.02)

    def forward(self, x_BTF: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BTF) + self.pos_embed[:, : x_BTF.shape[1]]


class TinySeqTask(TaskModule):
    """Classify a padded sequence: label = sign of the sum of feature 0 over real steps."""

    def __init__(self, backbone_config, optim_config=None, n_classes: int = 2) -> None:
        super().__init__(backbone_config, optim_config, n_classes=n_classes)
        d = self.backbone_config.d_model
        self.adapter = TinyAdapter(N_FEATURES, d, SEQ_LEN)
        self.head = nn.Linear(d, n_classes)
        self.autocast_seen: tuple[bool, torch.dtype] | None = None

    def tokens(self, batch):
        x_BTF, lengths_B, _ = batch
        self.autocast_seen = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        padding_BT = (
            torch.arange(x_BTF.shape[1], device=x_BTF.device)[None, :] >= lengths_B[:, None]
        )
        return self.adapter(x_BTF), padding_BT

    def head_forward(self, out: BackboneOutput, batch):
        _, lengths_B, _ = batch
        h_BTD = out.last_hidden
        keep_BT1 = (
            torch.arange(h_BTD.shape[1], device=h_BTD.device)[None, :] < lengths_B[:, None]
        ).unsqueeze(-1)
        pooled_BD = (h_BTD * keep_BT1).sum(1) / keep_BT1.sum(1).clamp_min(1)
        return self.head(pooled_BD)

    def loss(self, preds, batch):
        return F.cross_entropy(preds.float(), batch[2])

    def val_metrics(self, preds, batch):
        return {"acc": (preds.argmax(-1) == batch[2]).float().mean()}


def synthetic_dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ_LEN, N_FEATURES, generator=g)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=g)
    real = torch.arange(SEQ_LEN)[None, :] < lengths[:, None]
    x = x * real.unsqueeze(-1)  # padded steps are zeros
    y = (x[:, :, 0].sum(1) > 0).long()
    return TensorDataset(x, lengths, y)


class TinyData(lightning.LightningDataModule):
    def __init__(self, n_train: int = 256, n_val: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.train_set = synthetic_dataset(n_train, seed=1)
        self.val_set = synthetic_dataset(n_val, seed=2)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def quiet_cfg(tmp_path, **kw) -> TrainerConfig:
    base = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    base.update(kw)
    return TrainerConfig(**base)


def new_task(seed: int = 0, **optim_kw: object) -> TinySeqTask:
    seed_everything(seed)
    return TinySeqTask(tiny_backbone(), OptimConfig(**{"lr": 3e-3, "warmup_steps": 4, **optim_kw}))


@torch.no_grad()
def mean_loss(module: TaskModule, loader: DataLoader) -> float:
    """Eval-mode loss over ``loader``; leaves the module in train mode (as fit expects)."""
    module.eval()
    losses = [module.loss(module(batch), batch) * len(batch[2]) for batch in loader]
    module.train()
    return float(torch.stack(losses).sum() / len(loader.dataset))


# ----------------------------------------------------------------------------- end to end


def test_fit_learns_logs_checkpoints_and_reloads(tmp_path):
    data = TinyData()
    module = new_task()
    before = mean_loss(module, data.val_dataloader())
    trainer = fit(module, data, quiet_cfg(tmp_path, max_epochs=4, early_stopping_patience=3))

    metrics = trainer.callback_metrics
    assert float(metrics["val/loss"]) < 0.6 * before, (before, float(metrics["val/loss"]))
    assert float(metrics["val/acc"]) >= 0.8
    for key in (
        "train/loss_epoch",
        "moe/load_balance_max_over_mean",
        "moe/layer0/load_balance_max_over_mean",
        "val/moe/load_balance_max_over_mean",
        "moe/step_load_balance_max_over_mean",
    ):
        assert key in metrics, sorted(metrics)
    # max/mean over 4 experts lies in [1, 4]
    assert 1.0 <= float(metrics["moe/load_balance_max_over_mean"]) <= 4.0
    assert trainer.global_step == 4 * 8

    ckpt_cb = trainer.checkpoint_callback
    assert ckpt_cb.monitor == "val/loss" and ckpt_cb.best_model_path
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert float(ckpt_cb.best_model_score) == pytest.approx(
        min(float(metrics["val/loss"]), float(ckpt_cb.best_model_score))
    )

    reloaded = TinySeqTask.load_from_checkpoint(ckpt_cb.last_model_path, weights_only=False)
    assert isinstance(reloaded.hparams["backbone_config"], dict)
    assert reloaded.backbone_config == module.backbone_config
    assert reloaded.optim_config == module.optim_config
    yaml.safe_dump(dict(reloaded.hparams))  # plain data only
    moe = next(module.backbone.moe_layers())
    moe_reloaded = next(reloaded.backbone.moe_layers())
    assert torch.equal(moe.expert_bias, moe_reloaded.expert_bias)
    assert moe.expert_bias.abs().sum() > 0  # the callback moved it during fit
    batch = next(iter(data.val_dataloader()))
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), module(batch))


def test_predict_returns_all_rows_in_order(tmp_path):
    data = TinyData(n_val=70, batch_size=32)  # 3 batches, the last one short
    module = new_task()
    preds = predict(module, data.val_dataloader())
    assert preds.shape == (70, 2)
    module.eval()
    with torch.no_grad():
        expected = torch.cat([module(b) for b in data.val_dataloader()])
    torch.testing.assert_close(preds, expected)
    assert torch.equal(predict(module, data), preds)  # a datamodule works too

    nested = concat_predictions([{"p": torch.ones(2, 3), "z": (torch.zeros(2), torch.ones(2))}] * 3)
    assert nested["p"].shape == (6, 3) and nested["z"][1].shape == (6,)


def test_optimizer_groups_and_warmup_cosine_schedule(tmp_path):
    module = new_task(lr=1e-2, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.1)
    decay, no_decay = split_decay_parameters(module)
    assert "adapter.pos_embed" in no_decay
    assert "adapter.proj.bias" in no_decay and "head.bias" in no_decay
    assert "backbone.norm.weight" in no_decay and "backbone.blocks.0.attn_norm.weight" in no_decay
    assert "backbone.blocks.0.attn.qkv.weight" in decay
    assert "backbone.blocks.1.ffn.w1_EFD" in decay and "head.weight" in decay
    assert set(decay).isdisjoint(no_decay)
    assert len(decay) + len(no_decay) == sum(1 for _ in module.parameters())

    f = warmup_cosine_factor
    assert f(0, 4, 100, 0.1) == pytest.approx(0.25)
    assert f(3, 4, 100, 0.1) == pytest.approx(1.0)
    assert f(4, 4, 100, 0.1) == pytest.approx(1.0)
    assert f(52, 4, 100, 0.1) == pytest.approx(0.55)  # half-way through the cosine
    assert f(100, 4, 100, 0.1) == pytest.approx(0.1) and f(500, 4, 100, 0.1) == pytest.approx(0.1)

    # wired into the trainer: total = estimated_stepping_batches (2 epochs x 8 batches)
    trainer = fit(module, TinyData(), quiet_cfg(tmp_path, max_epochs=2, enable_checkpointing=False))
    optimizer = trainer.optimizers[0]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(groups["no_decay"]["params"]) == len(no_decay)
    expected_lr = 1e-2 * warmup_cosine_factor(trainer.global_step, 3, 16, 0.1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)
    assert expected_lr == pytest.approx(1e-3)  # the schedule ended at min_lr_ratio * lr


def test_seeded_runs_are_reproducible(tmp_path):
    def run(seed: int) -> tuple[float, torch.Tensor]:
        module = new_task(seed)
        cfg = quiet_cfg(tmp_path, max_steps=5, seed=seed, enable_checkpointing=False)
        trainer = fit(module, TinyData(), cfg)
        return float(
            trainer.callback_metrics["train/loss_step"]
        ), module.head.weight.detach().clone()

    loss_a, w_a = run(0)
    loss_b, w_b = run(0)
    loss_c, w_c = run(1)
    assert loss_a == loss_b and torch.equal(w_a, w_b)
    assert not torch.equal(w_a, w_c)


def test_early_stopping_stops_when_the_monitor_stalls(tmp_path):
    # lr = 0 and no bias updates: the model never changes, so val/loss never improves.
    module = new_task(lr=0.0)
    cfg = quiet_cfg(
        tmp_path,
        max_epochs=10,
        early_stopping_patience=2,
        expert_bias_update=False,
        limit_train_batches=2,
    )
    trainer = fit(module, TinyData(), cfg)
    early = next(
        cb for cb in trainer.callbacks if isinstance(cb, lightning.pytorch.callbacks.EarlyStopping)
    )
    assert early.stopped_epoch == 2  # best at epoch 0, two epochs without improvement
    assert trainer.current_epoch == 3 < 10


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    module = new_task()
    trainer = fit(
        module,
        TinyData(),
        quiet_cfg(tmp_path, max_epochs=1, accumulate_grad_batches=2, enable_checkpointing=False),
    )
    assert trainer.global_step == 8 // 2
    assert trainer.accumulate_grad_batches == 2


# ----------------------------------------------------------------------------- config / precision


def test_trainer_config_validates_and_round_trips():
    with pytest.raises(ValueError, match="precision='fp4'.*expected one of"):
        TrainerConfig(precision="fp4")
    with pytest.raises(ValueError, match="strategy='deepspeed'"):
        TrainerConfig(strategy="deepspeed")
    with pytest.raises(ValueError, match="needs a monitor"):
        TrainerConfig(monitor=None, early_stopping_patience=3)
    with pytest.raises(ValueError, match="unknown TrainerConfig keys"):
        TrainerConfig.from_dict({"max_epoch": 3})
    cfg = TrainerConfig(precision="bf16-mixed", fp8_exclude=("head",), max_epochs=3)
    again = TrainerConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert (
        OptimConfig.from_dict(yaml.safe_load(yaml.safe_dump(OptimConfig().to_dict())))
        == OptimConfig()
    )
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.5))


def test_16_mixed_on_cpu_runs_bf16_autocast_without_scaler(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="core.engine")
    trainer = build_trainer(quiet_cfg(tmp_path, precision="16-mixed", max_steps=2))
    messages = [r.getMessage() for r in caplog.records if r.name == "core.engine"]
    assert any(
        "16-mixed' on CPU" in m
        and "torch.autocast('cpu', dtype=torch.bfloat16)" in m
        and "no GradScaler" in m
        for m in messages
    ), messages
    plugin = trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision)
    assert (plugin.precision, plugin.device, plugin.scaler) == ("bf16-mixed", "cpu", None)

    # The message describes Lightning's own behaviour, not only Keel's choice.
    plain = lightning.Trainer(
        accelerator="cpu", precision="16-mixed", logger=False, enable_checkpointing=False
    )
    assert isinstance(plain.precision_plugin, MixedPrecision)
    assert (plain.precision_plugin.precision, plain.precision_plugin.scaler) == ("bf16-mixed", None)

    module = new_task()
    trainer.fit(module, TinyData())
    assert module.autocast_seen == (True, torch.bfloat16)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))


def test_bf16_true_trains_the_moe_backbone(tmp_path):
    """bf16-true (the FP8 base precision) makes bf16 the default dtype inside forward."""
    module = new_task()
    trainer = fit(
        module,
        TinyData(),
        quiet_cfg(tmp_path, precision="bf16-true", max_steps=3, enable_checkpointing=False),
    )
    assert trainer.global_step == 3
    assert module.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    moe = next(module.backbone.moe_layers())
    assert moe.expert_bias.dtype == torch.float32 and moe.expert_bias.abs().sum() > 0
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))


def test_resolve_precision_names():
    assert resolve_precision("32", "cpu") == ("32-true", None)
    assert resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", None)
    assert resolve_precision("fp8-emulated", "cpu") == ("bf16-true", "emulated")
    assert resolve_precision("fp8", "cpu", fp8_emulated=True) == ("bf16-true", "emulated")


# ----------------------------------------------------------------------------- strategies


def test_ddp_strategy_keeps_per_rank_moe_counts():
    trainer = build_trainer(
        TrainerConfig(strategy="ddp", accelerator="cpu", devices=1, enable_progress_bar=False)
    )
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs["broadcast_buffers"] is False


def test_fsdp2_one_process_gloo_run_shards_blocks(tmp_path, clean_dist_env):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    cfg = quiet_cfg(tmp_path, strategy="fsdp2", max_steps=4, enable_checkpointing=False)
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy, ModelParallelStrategy)
    module = new_task()
    trainer.fit(module, TinyData())

    mesh = module.device_mesh
    assert mesh.mesh_dim_names == ("data_parallel", "tensor_parallel")
    assert mesh["data_parallel"].size() == 1 and mesh["tensor_parallel"].size() == 1
    assert all(isinstance(b, FSDPModule) for b in module.backbone.blocks)
    assert isinstance(module.backbone, FSDPModule) and isinstance(module.head, FSDPModule)
    assert all(isinstance(p, DTensor) for p in module.parameters())
    assert trainer.global_step == 4
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))
    moe = next(module.backbone.moe_layers())
    assert moe.expert_bias.abs().sum() > 0  # bias updates ran under FSDP2 too


def test_compile_blocks_trains(tmp_path):
    """compile=True: each block goes through dynamo + AOTAutograd (aot_eager keeps it fast)."""
    torch._dynamo.reset()
    module = new_task()
    cfg = quiet_cfg(
        tmp_path, compile=True, compile_backend="aot_eager", max_steps=2, enable_checkpointing=False
    )
    trainer = fit(module, TinyData(), cfg)
    assert module._blocks_compiled
    assert all(b._compiled_call_impl is not None for b in module.backbone.blocks)
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))
    # parameter names are unchanged by in-place compilation
    assert "backbone.blocks.0.attn.qkv.weight" in module.state_dict()


@pytest.mark.slow
def test_compile_blocks_with_inductor_trains(tmp_path):
    """The default inductor backend on one MoE block (a cold CPU compile takes ~30-50 s)."""
    torch._dynamo.reset()
    seed_everything(0)
    backbone = BackboneConfig(
        d_model=32,
        n_layers=1,
        n_dense_layers=0,
        attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=32),
    )
    module = TinySeqTask(backbone, OptimConfig(lr=3e-3))
    cfg = quiet_cfg(tmp_path, compile=True, max_steps=2, enable_checkpointing=False)
    trainer = fit(module, TinyData(), cfg)
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))


def test_member_seed_keeps_member_zero_and_never_meets_another_runs_seed():
    """Ensemble member 0 is the single-model run; no member of runs seeded 0-9 shares a
    seed with any member of another (runs of neighbouring seeds stay independent)."""
    assert member_seed(7, 0) == 7
    assert len({member_seed(s, k) for s in range(10) for k in range(5)}) == 50
