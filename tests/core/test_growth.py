"""Function-preserving growth operators and the growth callback in a real Lightning run."""

from __future__ import annotations

import dataclasses
import math

import lightning
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.backbone import Backbone, BackboneOutput
from core.config import AttentionConfig, BackboneConfig, MoEConfig
from core.engine import OptimConfig, TaskModule
from core.growth import (
    GrowthCallback,
    GrowthSchedule,
    apply_growth,
    grow_depth,
    grow_width,
    pad_tokens,
    split_all_experts,
    split_experts,
    upcycle_to_moe,
)

torch.set_num_threads(1)
D, T = 16, 6
MOE = MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=2, expert_hidden=8)
CFGS = {
    "dense_gated_topk": BackboneConfig(
        d_model=D, n_layers=2, ffn_hidden=16, moe=None,
        attention=AttentionConfig(n_heads=2, gated=True, top_k=3),
    ),
    "moe_gated_topk": BackboneConfig(
        d_model=D, n_layers=2, ffn_hidden=16, moe=MOE, n_dense_layers=1,
        attention=AttentionConfig(n_heads=2, gated=True, top_k=3),
    ),
    "moe_plain_qknorm": BackboneConfig(
        d_model=D, n_layers=3, ffn_hidden=16, moe=MOE, n_dense_layers=1,
        attention=AttentionConfig(n_heads=2, gated=False, qk_norm=True),
    ),
}  # fmt: skip
OPS = {
    "depth": lambda b: grow_depth(b, [0, 1, b.cfg.n_layers]),
    "ffn_expert_width": lambda b: grow_width(
        b, new_ffn_hidden=28, new_expert_hidden=12 if b.cfg.moe else None
    ),
    "d_model_heads": lambda b: grow_width(b, new_n_heads=3),
    "upcycle": lambda b: upcycle_to_moe(b, None if b.cfg.moe else MOE, n_dense_layers=0),
    "upcycle_copy": lambda b: upcycle_to_moe(
        b, dataclasses.replace(MOE, expert_hidden=16, route_scale=2.5), init="copy"
    ),
    "split_experts": split_all_experts,
}


def _inputs(d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, T, d, generator=g)
    pad = torch.zeros(3, T, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    return x, pad


def _check_same(small: Backbone, grown: Backbone) -> None:
    small.eval(), grown.eval()
    x, pad = _inputs()
    for mask in (pad, None):
        ref = small(x, mask, return_hidden=True)
        out = grown(pad_tokens(x, grown.cfg.d_model), mask, return_hidden=True)
        torch.testing.assert_close(out.last_hidden[..., :D], ref.last_hidden, atol=1e-5, rtol=0)
        if grown.cfg.d_model > D:  # the padded channels stay exactly zero
            assert out.last_hidden[..., D:].abs().max().item() == 0.0
        if grown.cfg.n_layers == small.cfg.n_layers:
            for h_new, h_old in zip(out.hidden_states, ref.hidden_states, strict=True):
                torch.testing.assert_close(h_new[..., :D], h_old, atol=1e-5, rtol=0)


# split_experts needs MoE layers; a new MoEConfig (upcycle_copy) needs a dense-only backbone
CASES = [
    (c, o)
    for c in CFGS
    for o in OPS
    if not (o == "split_experts" and CFGS[c].moe is None)
    and not (o == "upcycle_copy" and CFGS[c].moe is not None)
]


@pytest.mark.parametrize(("cfg_name", "op_name"), CASES)
def test_grown_backbone_outputs_equal_small(cfg_name: str, op_name: str) -> None:
    cfg = CFGS[cfg_name]
    torch.manual_seed(0)
    small = Backbone(cfg)
    with torch.no_grad():  # non-trivial norms and expert biases, as after training
        for name, p in small.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        for m in small.moe_layers():
            m.expert_bias.copy_(0.01 * torch.randn_like(m.expert_bias))
    grown = OPS[op_name](small)
    assert grown is not small and grown.count_params() > small.count_params()
    _check_same(small, grown)


def test_config_changes_and_layouts() -> None:
    moe = CFGS["moe_gated_topk"]
    deep = grow_depth(Backbone(moe), [0, 2])
    assert deep.cfg.n_layers == 4 and deep.cfg.n_dense_layers == 2
    assert [b.is_moe for b in deep.blocks] == [False, False, True, True]
    wide = grow_width(Backbone(moe), new_d_model=32)
    assert wide.cfg.attention.n_heads == 4 and wide.cfg.norm_eps == pytest.approx(moe.norm_eps / 2)
    up = upcycle_to_moe(Backbone(CFGS["dense_gated_topk"]), MOE, n_dense_layers=1)
    assert [b.is_moe for b in up.blocks] == [False, True] and up.cfg.moe == MOE
    split = split_all_experts(Backbone(moe)).cfg.moe
    assert (split.n_routed_experts, split.top_k, split.expert_hidden) == (8, 4, 4)
    assert (split.n_shared_experts, split.route_scale) == (4, 2.0)
    with pytest.raises(ValueError, match="rmsnorm"):
        grow_width(Backbone(dataclasses.replace(moe, norm="layernorm")), new_d_model=32)
    ln = Backbone(dataclasses.replace(moe, norm="layernorm"))
    _check_same(ln, grow_width(ln, new_ffn_hidden=24, new_expert_hidden=16))
    with pytest.raises(ValueError, match="head_dim"):
        grow_width(Backbone(moe), new_d_model=20)
    with pytest.raises(ValueError, match="0..2"):
        grow_depth(Backbone(moe), [3])
    with pytest.raises(ValueError, match="shared"):
        upcycle_to_moe(
            Backbone(CFGS["dense_gated_topk"]), dataclasses.replace(MOE, n_shared_experts=1)
        )


def test_split_single_moe_layer_exact() -> None:
    torch.manual_seed(1)
    bb = Backbone(CFGS["moe_gated_topk"])
    layer = bb.blocks[1].ffn.eval()
    new = split_experts(layer).eval()
    x = torch.randn(2, T, D)
    torch.testing.assert_close(new(x), layer(x), atol=1e-5, rtol=0)
    assert new.n_experts == 8 and new.top_k == 4 and new.expert_hidden == 4


def test_grown_model_trains_and_new_params_get_gradients() -> None:
    torch.manual_seed(2)
    small = Backbone(CFGS["moe_gated_topk"])
    grown = grow_width(grow_depth(small, [2]), new_d_model=24, new_expert_hidden=12)
    grown.train()
    x, pad = _inputs()
    x = pad_tokens(x, 24)
    target = torch.randn(3, T, 24, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.AdamW(grown.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        opt.zero_grad()
        loss = (grown(x, pad).last_hidden - target)[~pad].pow(2).mean()
        loss.backward()
        if step == 0:
            new_block = grown.blocks[2]
            assert new_block.attn.out_proj.weight.grad.abs().sum() > 0
            assert new_block.ffn.w2_EDF.grad.abs().sum() > 0
            # new width: new residual channels' output rows and new expert units' columns
            assert grown.blocks[0].attn.out_proj.weight.grad[D:].abs().sum() > 0
            assert grown.blocks[1].ffn.w2_EDF.grad[:, :, 8:].abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.97 * losses[0], losses
    # after one step the zero-initialised projections have moved, so the rest learns too
    assert grown.blocks[2].attn.qkv.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- callback


class SeqClassifier(TaskModule):
    """Linear token embedding -> backbone -> masked mean pool -> class logits."""

    def __init__(self, backbone_config, optim_config=None, d_in: int = 5, n_classes: int = 3):
        super().__init__(backbone_config, optim_config, d_in=d_in, n_classes=n_classes)
        d = self.backbone_config.d_model
        self.embed = nn.Linear(d_in, d)
        self.head = nn.Linear(d, n_classes)

    def tokens(self, batch):
        x, pad, _ = batch
        return self.embed(x), pad

    def head_forward(self, out: BackboneOutput, batch):
        _, pad, _ = batch
        keep = (~pad).unsqueeze(-1).float()
        pooled = (out.last_hidden * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.head(pooled)

    def loss(self, preds, batch):
        return nn.functional.cross_entropy(preds.float(), batch[2])

    @torch.no_grad()
    def grow_d_model(self, old_d: int, new_d: int) -> None:
        """Embed into the leading channels (zeros elsewhere); head reads new channels with 0."""
        embed = nn.Linear(self.embed.in_features, new_d)
        head = nn.Linear(new_d, self.head.out_features)
        embed.weight.zero_()
        embed.bias.zero_()
        head.weight.zero_()
        embed.weight[:old_d] = self.embed.weight
        embed.bias[:old_d] = self.embed.bias
        head.weight[:, :old_d] = self.head.weight
        head.bias.copy_(self.head.bias)
        self.embed, self.head = embed.to(self.embed.weight), head.to(self.head.weight)


def _data(n: int = 48) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, T, 5, generator=g)
    pad = torch.rand(n, T, generator=g) < 0.3
    pad[:, 0] = False
    y = (x[..., 0].mean(1) > 0).long() + (x[..., 1].mean(1) > 0.3).long()
    return DataLoader(TensorDataset(x, pad, y), batch_size=8, shuffle=True)


def test_apply_growth_preserves_task_module_outputs() -> None:
    torch.manual_seed(3)
    model = SeqClassifier(CFGS["moe_gated_topk"]).eval()
    batch = next(iter(_data()))
    with torch.no_grad():
        ref = model(batch)
        for op, kw in [
            ("grow_depth", {"new_layers_at": [1]}),
            ("grow_width", {"new_d_model": 24}),
            ("split_experts", {}),
            ("upcycle_to_moe", {"n_dense_layers": 0}),
        ]:
            apply_growth(model, op, **kw)
            model.eval()
            torch.testing.assert_close(model(batch), ref, atol=1e-5, rtol=0)
    assert model.hparams["backbone_config"]["d_model"] == 24
    assert model.backbone_config.n_layers == 3 and model.backbone_config.n_dense_layers == 0
    plain = TaskModule(CFGS["dense_gated_topk"])
    with pytest.raises(ValueError, match="grow_d_model"):
        apply_growth(plain, "grow_width", new_d_model=24)
    assert plain.backbone.cfg.d_model == D  # nothing changed on error


def test_growth_callback_in_lightning_run(tmp_path) -> None:
    torch.manual_seed(4)
    model = SeqClassifier(CFGS["moe_gated_topk"], OptimConfig(lr=3e-3, max_steps=8))
    schedule = GrowthSchedule.from_dict(
        {
            "steps": [
                {"at_step": 4, "operator": "grow_width", "kwargs": {"new_d_model": 24}},
                {"at_step": 2, "operator": "grow_depth", "kwargs": {"new_layers_at": [2]}},
                {"at_step": 6, "operator": "split_experts"},
            ]
        }
    )
    assert [s.at_step for s in schedule.steps] == [2, 4, 6]
    callback = GrowthCallback(schedule)
    n0 = sum(p.numel() for p in model.parameters())
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, train_dataloaders=_data())
    assert trainer.global_step == 8
    assert [(h[0], h[1]) for h in callback.history] == [
        (2, "grow_depth"), (4, "grow_width"), (6, "split_experts")
    ]  # fmt: skip
    # expected parameter counts, from configs built independently
    c0 = CFGS["moe_gated_topk"]
    c1 = dataclasses.replace(c0, n_layers=3)
    c2 = dataclasses.replace(c1, d_model=24, attention=dataclasses.replace(c1.attention, n_heads=3))
    c3 = dataclasses.replace(c2, moe=dataclasses.replace(
        MOE, n_routed_experts=8, top_k=4, expert_hidden=4, n_shared_experts=4, route_scale=2.0
    ))  # fmt: skip
    io = lambda d: (5 * d + d) + (d * 3 + 3)  # noqa: E731 - embed + head
    expected = [Backbone(c).count_params() + io(c.d_model) for c in (c0, c1, c2, c3)]
    assert n0 == expected[0]
    assert [(h[2], h[3]) for h in callback.history] == list(
        zip(expected[:-1], expected[1:], strict=True)
    )
    assert expected[0] < expected[1] < expected[2] < expected[3]  # split adds router rows
    assert sum(p.numel() for p in model.parameters()) == expected[3]
    # the optimizer owns exactly the current parameters, and they all trained
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    assert all(len(opt.state[p]) > 0 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert callback.state_dict() == {"n_applied": 3}
