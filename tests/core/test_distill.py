"""Distillation: loss math, frozen teacher kept out of checkpoints, hidden matching, soft labels."""

from __future__ import annotations

import copy
import math

import lightning
import pytest
import torch
from torch.utils.data import DataLoader

from core.config import AttentionConfig, BackboneConfig, MoEConfig
from core.distill import (
    DistillationModule,
    DistillConfig,
    HiddenStateMatcher,
    SoftLabelDataset,
    binary_distillation_loss,
    distillation_loss,
    produce_soft_labels,
    regression_distillation_loss,
    soft_kl,
)
from core.engine import OptimConfig
from core.errors import KeelInputError
from core.examples.synthetic import SyntheticClassifier, _DictDataset, _tensors, make_frame

torch.set_num_threads(1)


def _hand_kl(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """sum_rows sum_c p_t (log p_t - log p_s) / rows, in float64 by explicit exp/sum."""
    s, t = s.double() / T, t.double() / T
    p_t = torch.exp(t) / torch.exp(t).sum(-1, keepdim=True)
    p_s = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    return float((p_t * (p_t.log() - p_s.log())).sum() / s.shape[0])


def test_kl_term_matches_hand_computation_and_t_squared_scaling() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g) * 3
    for T in (1.0, 2.0, 4.0):
        got = float(soft_kl(s, t, T))
        assert got == pytest.approx(T**2 * _hand_kl(s, t, T), rel=1e-5)
    # alpha = 1: the loss is exactly the T^2-scaled KL; the T^2 factor is the only change
    # besides the softening, checked against the unscaled hand value at T=3.
    loss = distillation_loss(s, t, task_loss=torch.tensor(123.0), alpha=1.0, temperature=3.0)
    assert float(loss) == pytest.approx(9.0 * _hand_kl(s, t, 3.0), rel=1e-5)
    # leading dims are flattened into rows (token-level heads)
    s3, t3 = s.view(5, 1, 4), t.view(5, 1, 4)
    assert float(soft_kl(s3, t3, 2.0)) == pytest.approx(float(soft_kl(s, t, 2.0)), rel=1e-6)
    assert float(soft_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_alpha_zero_gives_task_loss_exactly_and_mixing() -> None:
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    task = torch.tensor(0.7321)
    assert torch.equal(distillation_loss(s, t, task, alpha=0.0, temperature=2.0), task)
    assert torch.equal(binary_distillation_loss(s[:, 0], t[:, 0], task, 0.0, 2.0), task)
    assert torch.equal(regression_distillation_loss(s, t, task, 0.0), task)
    mixed = float(distillation_loss(s, t, task, alpha=0.25, temperature=2.0))
    assert mixed == pytest.approx(0.25 * 4.0 * _hand_kl(s, t, 2.0) + 0.75 * 0.7321, rel=1e-5)


def test_binary_and_regression_variants() -> None:
    z_s, z_t = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.5, -0.2, -0.5])
    T = 2.0
    p_t, p_s = torch.sigmoid(z_t.double() / T), torch.sigmoid(z_s.double() / T)
    hand = (p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()).mean() * T**2
    got = binary_distillation_loss(z_s, z_t, 0.0, alpha=1.0, temperature=T)
    assert float(got) == pytest.approx(float(hand), rel=1e-5)
    # [B, 1] heads give the same value
    assert float(
        binary_distillation_loss(z_s[:, None], z_t[:, None], 0.0, 1.0, T)
    ) == pytest.approx(float(hand), rel=1e-6)
    a, b = torch.tensor([0.0, 1.0, 5.0]), torch.tensor([0.5, 1.0, 1.0])
    mse = regression_distillation_loss(a, b, torch.tensor(2.0), alpha=0.5, loss="mse")
    assert float(mse) == pytest.approx(0.5 * (0.25 + 0 + 16) / 3 + 0.5 * 2.0)
    hub = regression_distillation_loss(a, b, 0.0, alpha=1.0, loss="huber", huber_delta=1.0)
    assert float(hub) == pytest.approx((0.5 * 0.25 + 0 + (4 - 0.5)) / 3)
    with pytest.raises(ValueError, match="same shape"):
        soft_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="layer_map"):
        DistillConfig(hidden_weight=1.0)


def test_config_yaml_round_trip(tmp_path) -> None:
    cfg = DistillConfig(alpha=0.9, temperature=3.0, hidden_weight=0.5, layer_map={1: 2, 2: 4})
    path = tmp_path / "d.yaml"
    cfg.to_yaml(path)
    assert DistillConfig.from_yaml(path) == cfg


def test_hidden_matching_zero_for_identical_models_and_masks_padding() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    matcher = HiddenStateMatcher({1: 1, 2: 2}, 8, 8, normalize=True)
    with torch.no_grad():
        assert float(matcher(hidden, hidden)) == 0.0
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    noisy = [h.clone() for h in hidden]
    for h in noisy:
        h[1, 3:] += 10 * torch.randn(2, 8, generator=g)  # garbage only at padded positions
    assert float(matcher(hidden, noisy, pad)) == 0.0
    assert float(matcher(hidden, noisy)) > 0.1
    # different widths: projections are learnable and the loss reaches them
    m2 = HiddenStateMatcher({2: 1}, 8, 12, normalize=False)
    teacher_hidden = [torch.randn(2, 5, 12, generator=g) for _ in range(2)]
    loss = m2(hidden, teacher_hidden, pad)
    loss.backward()
    assert m2.proj["2"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateMatcher({5: 1}, 8, 8)(hidden, hidden)


# --------------------------------------------------------------------------- synthetic task


def _bb(d: int, moe: bool) -> dict:
    return BackboneConfig(
        d_model=d,
        n_layers=2,
        ffn_hidden=2 * d,
        attention=AttentionConfig(n_heads=2, gated=True, top_k=4),
        moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=d)
        if moe
        else None,
    ).to_dict()


def _loader(n: int, seed: int, labels: bool = True, batch_size: int = 128, shuffle: bool = False):
    frame = make_frame(n, seed)
    t = _tensors(frame)
    if labels:
        t["y"] = torch.tensor(frame["label"].to_numpy())
    return DataLoader(_DictDataset(t), batch_size=batch_size, shuffle=shuffle)


@pytest.fixture(scope="module")
def teacher() -> SyntheticClassifier:
    """A tiny teacher trained for 60 full-batch-ish Adam steps on the synthetic task."""
    torch.manual_seed(0)
    model = SyntheticClassifier(_bb(16, moe=True), OptimConfig(lr=3e-3).to_dict())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = next(iter(_loader(1024, 0, batch_size=1024)))
    for _ in range(60):
        opt.zero_grad()
        model.loss(model(batch), batch).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _trainer(tmp_path, max_steps: int, checkpoint: bool = False) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def test_teacher_frozen_out_of_checkpoint_and_student_learns(tmp_path, teacher) -> None:
    torch.manual_seed(1)
    student = SyntheticClassifier(_bb(8, moe=False), OptimConfig(lr=1e-2, max_steps=25).to_dict())
    cfg = DistillConfig(alpha=0.8, temperature=2.0, hidden_weight=0.5, layer_map={1: 1, 2: 2})
    module = DistillationModule(student, teacher, cfg)
    teacher_before = copy.deepcopy(teacher.state_dict())
    assert not any(k.startswith("teacher") for k in module.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in module.parameters()}.isdisjoint({id(p) for p in teacher.parameters()})

    probe = next(iter(_loader(256, 7, batch_size=256)))
    with torch.no_grad():
        before = {k: float(v) for k, v in module.losses(probe).items()}
    trainer = _trainer(tmp_path, max_steps=25, checkpoint=True)
    trainer.fit(module, train_dataloaders=_loader(1024, 0, shuffle=True))
    module.eval()
    with torch.no_grad():
        after = {k: float(v) for k, v in module.losses(probe).items()}

    # teacher: untouched, no gradients, still in eval mode
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    # checkpoint: student and projections only
    ckpt_path = (
        trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    )
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    keys = list(ckpt["state_dict"])
    assert keys and not any("teacher" in k for k in keys)
    assert any(k.startswith("student.backbone.") for k in keys)
    assert any(k.startswith("matcher.proj.") for k in keys)
    n_teacher = sum(v.numel() for v in teacher.state_dict().values())
    n_ckpt = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_ckpt == sum(v.numel() for v in module.state_dict().values()) < n_teacher + n_ckpt
    # the distillation signal improved on held-out rows
    assert all(math.isfinite(v) for v in after.values())
    assert after["distill"] < 0.85 * before["distill"], (before, after)
    assert after["hidden"] < before["hidden"], (before, after)
    assert after["loss"] < before["loss"]


def test_soft_labels_train_student_without_hard_labels(tmp_path, teacher) -> None:
    unlabeled = _loader(512, 3, labels=False, batch_size=128)
    soft = produce_soft_labels(teacher, unlabeled)
    assert soft.shape == (512,)
    with torch.no_grad():
        direct = torch.cat([teacher(b) for b in unlabeled])
    torch.testing.assert_close(soft, direct)
    with pytest.raises(ValueError, match="shuffle=False"):
        produce_soft_labels(teacher, _loader(64, 3, labels=False, shuffle=True))

    ds = SoftLabelDataset(unlabeled.dataset, soft)
    item = ds[5]
    assert set(item) == {"x_num", "x_cat", "soft_labels"} and float(item["soft_labels"]) == float(
        soft[5]
    )
    with pytest.raises(ValueError, match="rows"):
        SoftLabelDataset(unlabeled.dataset, soft[:10])

    torch.manual_seed(2)
    student = SyntheticClassifier(_bb(8, moe=True), OptimConfig(lr=1e-2, max_steps=20).to_dict())
    module = DistillationModule(student, None, DistillConfig(alpha=1.0, temperature=1.0))
    probe = {
        k: torch.stack([ds[i][k] for i in range(128)]) for k in ("x_num", "x_cat", "soft_labels")
    }
    assert "y" not in probe  # SyntheticClassifier.loss would fail on it: it must not be called
    with torch.no_grad():
        before = float(module.losses(probe)["loss"])
    _trainer(tmp_path, max_steps=20).fit(module, DataLoader(ds, batch_size=64, shuffle=True))
    module.eval()
    with torch.no_grad():
        parts = module.losses(probe)
    assert set(parts) == {"distill", "loss"}
    after = float(parts["loss"])
    assert math.isfinite(after) and after < 0.85 * before, (before, after)
    # a batch without soft labels and without a teacher is a clear error
    with pytest.raises(ValueError, match="no teacher"):
        module.losses({k: probe[k] for k in ("x_num", "x_cat")})


def test_alpha_zero_module_equals_student_task_loss(teacher) -> None:
    torch.manual_seed(3)
    student = SyntheticClassifier(_bb(8, moe=False), OptimConfig().to_dict()).eval()
    module = DistillationModule(student, teacher, DistillConfig(alpha=0.0))
    batch = next(iter(_loader(64, 5, batch_size=64)))
    with torch.no_grad():
        parts = module.losses(batch)
        task = student.loss(student(batch), batch)
    assert torch.equal(parts["loss"], task)
    expected_kl = float(
        binary_distillation_loss(student(batch), teacher(batch), 0.0, alpha=1.0, temperature=2.0)
    )
    assert float(parts["distill"]) == pytest.approx(expected_kl, rel=1e-5)


def test_label_mask_keeps_unknown_labels_out_of_the_task_loss(teacher) -> None:
    """Rows marked unlabelled (``has_label`` 0) count in the teacher term only: the task
    loss equals the student's loss on the labelled rows alone, their placeholder labels can
    be anything, and a batch with no labelled row has a task loss of 0 that still trains."""
    torch.manual_seed(4)
    student = SyntheticClassifier(_bb(8, moe=False), OptimConfig().to_dict()).eval()
    module = DistillationModule(student, teacher, DistillConfig(alpha=0.4))
    batch = next(iter(_loader(64, 6, batch_size=64)))
    mask = torch.zeros(64, dtype=torch.long)
    mask[:40] = 1
    with torch.no_grad():
        plain = module.losses(batch)
        masked = module.losses({**batch, "has_label": mask})
        first = {k: v[:40] for k, v in batch.items()}
        expected_task = float(student.loss(student(first), first))
        flipped = {**batch, "y": torch.where(mask.bool(), batch["y"], 1 - batch["y"])}
        masked_flipped = module.losses({**flipped, "has_label": mask})
    assert float(masked["task"]) == pytest.approx(expected_task, rel=1e-5)
    assert float(masked["task"]) != pytest.approx(float(plain["task"]), rel=1e-3)
    assert torch.equal(masked["distill"], plain["distill"])  # the teacher term sees every row
    assert float(masked["loss"]) == pytest.approx(
        0.4 * float(masked["distill"]) + 0.6 * expected_task, rel=1e-5
    )
    assert torch.equal(masked_flipped["loss"], masked["loss"])

    none = module.losses({**batch, "has_label": torch.zeros(64)})
    assert float(none["task"]) == 0.0
    assert float(none["loss"]) == pytest.approx(0.4 * float(none["distill"]), rel=1e-6)
    none["loss"].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0

    with pytest.raises(KeelInputError, match="one entry per row"):
        module.losses({**batch, "has_label": torch.ones(63)})


def test_teacher_rows_unlabelled_keeps_the_teacher_off_labelled_rows(teacher) -> None:
    """``teacher_rows="unlabelled"``: the teacher term is the plain term over the rows the
    label mask marks 0 (class weights included), and 0 for a batch with none or no mask."""
    torch.manual_seed(5)
    student = SyntheticClassifier(_bb(8, moe=False), OptimConfig().to_dict()).eval()
    cfg = DistillConfig(alpha=0.5, kind="regression", teacher_rows="unlabelled")
    module = DistillationModule(student, teacher, cfg)
    batch = next(iter(_loader(64, 7, batch_size=64)))
    mask = torch.ones(64)
    mask[::3] = 0
    weight = torch.rand(64) + 0.5
    with torch.no_grad():
        parts = module.losses({**batch, "has_label": mask, "sample_weight": weight})
        rows = mask == 0
        expected = regression_distillation_loss(
            student(batch)[rows], teacher(batch)[rows], 0.0, 1.0, "mse", 1.0, weight[rows]
        )
        labelled = module.losses({**batch, "has_label": torch.ones(64)})
        no_mask = module.losses(batch)
    assert float(parts["distill"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(labelled["distill"]) == 0.0 and float(no_mask["distill"]) == 0.0
    assert float(no_mask["loss"]) == pytest.approx(0.5 * float(no_mask["task"]), rel=1e-6)
    with pytest.raises(ValueError, match="teacher_rows"):
        DistillConfig(teacher_rows="labelled")


def test_select_rows_indexes_batch_tensors_in_any_container() -> None:
    """Tensors with the batch's leading size are indexed inside dicts, lists, tuples and
    namedtuples; per-batch constants pass through."""
    from collections import namedtuple

    from core.distill import select_rows

    Preds = namedtuple("Preds", "logits scale")
    rows = torch.tensor([True, False, True, False])
    out = select_rows(
        {"p": Preds(torch.arange(4), torch.tensor(2.0)), "l": [torch.ones(4, 3)]}, rows, 4
    )
    assert isinstance(out["p"], Preds)
    assert out["p"].logits.tolist() == [0, 2] and float(out["p"].scale) == 2.0
    assert out["l"][0].shape == (2, 3)
