"""Growth configured in ``TrainerConfig.growth``: YAML round-trip and ``build_trainer`` wiring.

A schedule written in a training config (the way every app config embeds ``TrainerConfig``)
must grow the model mid-run in a real Lightning ``fit`` and the optimizer must keep
training the new parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.backbone import BackboneOutput
from core.config import AttentionConfig, BackboneConfig, MoEConfig
from core.configio import YamlConfig
from core.engine import OptimConfig, TaskModule, TrainerConfig, build_trainer
from core.growth import GrowthCallback, GrowthSchedule, GrowthStep

torch.set_num_threads(1)
D, T = 16, 6
SMALL = BackboneConfig(
    d_model=D,
    n_layers=1,
    ffn_hidden=16,
    moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=8),
    n_dense_layers=1,
    attention=AttentionConfig(n_heads=2, gated=True, top_k=None),
)

APP_YAML = """
lr: 0.003
trainer:
  max_epochs: null
  max_steps: 10
  accelerator: cpu
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  monitor: null
  growth:
    steps:
      - {at_step: 6, operator: grow_width, kwargs: {new_ffn_hidden: 32}}
      - {at_step: 3, operator: grow_depth, kwargs: {new_layers_at: [1, 1]}}
"""


@dataclass
class AppLikeConfig(YamlConfig):
    """Stands in for an app config: a ``TrainerConfig`` nested in a YAML dataclass."""

    lr: float = 1e-3
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig.quiet(1))


class Regressor(TaskModule):
    def __init__(self, backbone_config, optim_config=None, d_in: int = 4):
        super().__init__(backbone_config, optim_config, d_in=d_in)
        self.embed = nn.Linear(d_in, self.backbone_config.d_model)
        self.head = nn.Linear(self.backbone_config.d_model, 1)

    def tokens(self, batch):
        return self.embed(batch[0]), None

    def head_forward(self, out: BackboneOutput, batch):
        return self.head(out.last_hidden.mean(1)).squeeze(-1)

    def loss(self, preds, batch):
        return nn.functional.mse_loss(preds.float(), batch[1])


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, T, 4, generator=g)
    y = x[..., 0].mean(1) * 2 - x[..., 1].amax(1)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=g)


def test_trainer_config_growth_yaml_round_trip(tmp_path) -> None:
    cfg = AppLikeConfig.from_dict(yaml.safe_load(APP_YAML))
    g = cfg.trainer.growth
    assert isinstance(g, GrowthSchedule)
    assert [(s.at_step, s.operator) for s in g.steps] == [(3, "grow_depth"), (6, "grow_width")]
    assert isinstance(g.steps[0], GrowthStep) and g.steps[0].kwargs == {"new_layers_at": [1, 1]}
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    again = AppLikeConfig.from_yaml(path)
    assert again.trainer.growth == g
    assert again.to_dict() == cfg.to_dict()
    # TrainerConfig's own dict round trip, and a bare list of steps is accepted too
    assert TrainerConfig.from_dict(cfg.trainer.to_dict()).growth == g
    bare = TrainerConfig(growth=[{"at_step": 1, "operator": "split_experts"}])
    assert bare.growth.steps[0].operator == "split_experts"
    assert TrainerConfig().growth is None and "growth" in TrainerConfig().to_dict()


def test_growth_config_errors() -> None:
    with pytest.raises(ValueError, match="growth operator must be one of"):
        TrainerConfig(growth={"steps": [{"at_step": 1, "operator": "grow_sideways"}]})
    with pytest.raises(ValueError, match="single process"):
        TrainerConfig(strategy="ddp", growth=[{"at_step": 1, "operator": "grow_depth"}])
    # an empty schedule adds no callback
    trainer = build_trainer(TrainerConfig.quiet(1, accelerator="cpu", growth={"steps": []}))
    assert not any(isinstance(c, GrowthCallback) for c in trainer.callbacks)


def test_configured_growth_grows_mid_training_and_new_params_train() -> None:
    cfg = AppLikeConfig.from_dict(yaml.safe_load(APP_YAML))
    torch.manual_seed(0)
    model = Regressor(SMALL, OptimConfig(lr=cfg.lr, warmup_steps=0, max_steps=10))
    n0 = sum(p.numel() for p in model.parameters())
    trainer = build_trainer(cfg.trainer)
    cbs = [c for c in trainer.callbacks if isinstance(c, GrowthCallback)]
    assert len(cbs) == 1
    trainer.fit(model, train_dataloaders=_loader())
    assert trainer.global_step == 10
    hist = cbs[0].history
    assert [(h[0], h[1]) for h in hist] == [(3, "grow_depth"), (6, "grow_width")]
    bb = model.backbone
    assert bb.cfg.n_layers == 3 and bb.cfg.ffn_hidden == 32
    assert model.hparams["backbone_config"]["n_layers"] == 3
    assert hist[0][2] == n0 and hist[0][3] > n0 and hist[1][3] > hist[1][2]
    # the identity blocks started with zero output projections: they must have moved,
    # and the optimizer must own every current parameter with AdamW state
    for j in (1, 2):  # new blocks, appended after the dense one: MoE blocks
        blk = bb.blocks[j]
        assert blk.is_moe
        assert blk.attn.out_proj.weight.abs().sum() > 0
        assert blk.ffn.w2_EDF.abs().sum() > 0 and blk.ffn.shared.w2.weight.abs().sum() > 0
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    assert all(len(opt.state[p]) > 0 for p in model.parameters())
    # the widened FFN's new hidden units (zero w2 columns at growth) have learned
    new_cols = bb.blocks[0].ffn.w2.weight[:, 16:]
    assert new_cols.abs().sum() > 0
    # and Adam's step count shows which params predate growth (10 steps) vs. are new
    steps = {int(opt.state[p]["step"]) for p in model.parameters()}
    assert max(steps) == 10 and min(steps) < 10
