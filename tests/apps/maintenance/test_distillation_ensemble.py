"""Distilling a seed-ensemble teacher (the shipped FD001/FD003 recipes): its targets are the
ensemble's own prediction, stored before training; the members stay frozen and out of the
student; an ensemble's active parameters are the sum over its members."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.maintenance.distillation import (
    build_student,
    distill_fit_predictor,
    ensemble_targets,
)
from apps.maintenance.training import fit, split_windows
from core.distill import count_active_params
from tests.apps.maintenance.conftest import tiny_config


@pytest.fixture(scope="module")
def ensemble_teacher():
    cfg = tiny_config(max_epochs=1)
    cfg.ensemble_size = 3
    out = fit(cfg)
    return out.predictor, out.data, cfg


def test_targets_are_the_ensembles_mean_prediction(ensemble_teacher):
    teacher, data, cfg = ensemble_teacher
    ens = teacher.model
    w = split_windows(teacher.normalizer, data.policy, cfg.window)
    targets = ensemble_targets(ens, w).numpy().astype(np.float64)
    assert targets.shape == (len(w), 2)
    # each member's own forward, averaged here independently of RULEnsemble
    x, mask = torch.as_tensor(w.x), torch.as_tensor(w.mask)
    with torch.no_grad():
        outs = [m.eval()({"x": x, "mask": mask}).double() for m in ens.members]
    cap = float(ens.rul_cap)
    mean_rul = np.mean([o[:, 0].clamp(0, 1).numpy() * cap for o in outs], axis=0)
    mean_prob = np.mean([torch.sigmoid(o[:, 1]).numpy() for o in outs], axis=0)
    np.testing.assert_allclose(targets[:, 0] * cap, mean_rul, rtol=0, atol=1e-3)
    np.testing.assert_allclose(1 / (1 + np.exp(-targets[:, 1])), mean_prob, rtol=0, atol=1e-5)
    m0 = outs[0][:, 0].clamp(0, 1).numpy() * cap
    assert np.abs(mean_rul - m0).max() > 1e-3  # not just member 0's prediction


def test_distilling_an_ensemble_freezes_it_and_keeps_it_out_of_the_student(ensemble_teacher):
    teacher, data, cfg = ensemble_teacher
    scfg = tiny_config(max_epochs=1)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    fresh = build_student(scfg, int(teacher.model.hparams["n_channels"]))
    out = distill_fit_predictor(scfg, teacher, {"alpha": 0.7}, data=data)
    after = teacher.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    student = out.predictor.model
    assert not hasattr(student, "members")
    assert set(student.state_dict()) == set(fresh.state_dict())  # no member weights inside
    assert out.predictor.normalizer == teacher.normalizer  # reads the teacher's inputs
    per_member = [count_active_params(m) for m in teacher.model.members]
    assert out.teacher_active_params == count_active_params(teacher.model) == sum(per_member)
    assert out.student_active_params == count_active_params(student)
    w = split_windows(teacher.normalizer, data.policy, cfg.window)
    rul, prob = student.predict_windows(w.x, w.mask)
    assert np.isfinite(rul).all() and ((prob >= 0) & (prob <= 1)).all()
    # the student moved toward the ensemble: its RUL error against the ensemble's prediction
    # is below a fresh (untrained) student's
    ens_rul, _ = teacher.model.predict_windows(w.x, w.mask)
    fresh_rul, _ = fresh.eval().predict_windows(w.x, w.mask)
    assert np.abs(rul - ens_rul).mean() < np.abs(fresh_rul - ens_rul).mean()
