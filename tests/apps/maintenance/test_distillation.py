"""Distilling a trained maintenance teacher into a smaller student (``distillation.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apps.maintenance.distillation import (
    build_student,
    default_distill_config,
    distill,
    distill_fit_predictor,
)
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.training import split_windows
from core.distill import DistillConfig, count_active_params
from core.spec import TrainResult
from tests.apps.maintenance.conftest import tiny_config


def _student_cfg(epochs: int = 6):
    cfg = tiny_config(max_epochs=epochs)
    cfg.model.d_model = 16
    cfg.model.ffn_hidden = 32
    cfg.model.n_layers = 1
    cfg.model.n_dense_layers = 1
    cfg.model.moe = None
    cfg.model.attention.n_heads = 2
    return cfg


def test_default_config_fills_column_kinds_only_when_empty() -> None:
    assert default_distill_config(None).column_kinds == ["regression", "binary"]
    d = default_distill_config({"alpha": 0.9, "column_kinds": ["regression", "regression"]})
    assert d.alpha == 0.9 and d.column_kinds == ["regression", "regression"]


def test_default_config_weighs_columns_like_the_task_loss() -> None:
    """Given the student's alarm_loss_weight, the teacher term's column weights are the task
    loss's [1, alarm_loss_weight]; explicit weights are kept; without the weight, the mean."""
    assert default_distill_config(None).column_weights == []
    assert default_distill_config(None, 0.1).column_weights == [1.0, 0.1]
    kept = default_distill_config({"column_weights": [0.5, 0.5]}, 0.1)
    assert kept.column_weights == [0.5, 0.5]
    with pytest.raises(MaintenanceDataError, match="give column_weights explicitly"):
        default_distill_config({"column_kinds": ["regression"]}, 0.1)


def test_student_tracks_teacher_and_teacher_is_untouched(tiny_fit) -> None:
    _, teacher_out = tiny_fit
    teacher = teacher_out.predictor
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    cfg = _student_cfg()
    data = teacher_out.data
    w = split_windows(teacher, data.policy, cfg.window)
    t_rul, t_prob = teacher.model.predict_windows(w.x, w.mask)

    torch.manual_seed(cfg.seed)
    init = build_student(cfg, w.x.shape[2])
    i_rul, _ = init.predict_windows(w.x, w.mask)
    out = distill_fit_predictor(cfg, teacher, DistillConfig(alpha=1.0), data=data)
    s_rul, s_prob = out.predictor.model.predict_windows(w.x, w.mask)

    gap_init = float(np.sqrt(np.mean((i_rul - t_rul) ** 2)))
    gap_distilled = float(np.sqrt(np.mean((s_rul - t_rul) ** 2)))
    assert gap_distilled < 0.5 * gap_init, (gap_init, gap_distilled)
    assert np.isfinite(s_prob).all() and ((s_prob >= 0) & (s_prob <= 1)).all()
    # smaller student, frozen teacher weights unchanged and back on CPU
    assert out.student_active_params < out.teacher_active_params
    assert out.teacher_active_params == count_active_params(teacher.model)
    for k, v in teacher.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert next(teacher.model.parameters()).device.type == "cpu"
    assert not any(p.requires_grad for p in teacher.model.parameters())
    # the student's predictor serves with the teacher's normaliser
    assert out.predictor.normalizer is teacher.normalizer


def test_spec_hook_returns_evaluated_train_result(tiny_fit) -> None:
    _, teacher_out = tiny_fit
    cfg = _student_cfg(epochs=2)
    res = distill(cfg, teacher_out.predictor, distill_cfg={"alpha": 0.7, "temperature": 2.0})
    assert isinstance(res, TrainResult)
    m = res.evaluation.metrics
    assert math.isfinite(m["rmse_capped"]) and m["rmse_capped"] > 0
    assert "lead_detection_rate" in m
    assert res.extra["distill_config"]["alpha"] == 0.7
    # the effective config is recorded: the student's task-loss column weights filled in
    assert res.extra["distill_config"]["column_weights"] == [1.0, cfg.alarm.alarm_loss_weight]
    assert res.extra["student_active_params"] < res.extra["teacher_active_params"]
    frame = res.predictor.predict(res.input_example)
    assert len(frame) > 0


def test_mismatched_windows_are_refused(tiny_fit) -> None:
    _, teacher_out = tiny_fit
    cfg = _student_cfg()
    cfg.window = 20
    with pytest.raises(MaintenanceDataError, match="window=30"):
        distill_fit_predictor(cfg, teacher_out.predictor)
    with pytest.raises(MaintenanceDataError, match="MaintenancePredictor"):
        distill_fit_predictor(_student_cfg(), object())


def test_distilled_student_pretrains_like_the_scratch_student(tiny_fit) -> None:
    """The student config's masked-patch pretraining runs in the distillation path too, so a
    distilled student and the same student from scratch (``training.fit``) get the same budget."""
    from apps.maintenance.training import pretrain_if_configured

    _, teacher_out = tiny_fit
    teacher, data = teacher_out.predictor, teacher_out.data
    cfg = _student_cfg(epochs=1)
    w = split_windows(teacher, data.train, cfg.window)
    model = build_student(cfg, w.x.shape[2])
    assert pretrain_if_configured(model, cfg, w, seed=0) == []  # off by default
    cfg.pretrain_epochs = 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = pretrain_if_configured(model, cfg, w, seed=0)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    w_val = split_windows(teacher, data.policy, cfg.window)
    runs = {}
    for epochs in (0, 2):
        cfg.pretrain_epochs = epochs
        out = distill_fit_predictor(cfg, teacher, DistillConfig(alpha=1.0), data=data)
        runs[epochs] = out.predictor.model.predict_windows(w_val.x, w_val.mask)[0]
    # same seed, same distillation: only the pretraining differs, and it changes the student
    assert np.abs(runs[2] - runs[0]).max() > 1e-3
