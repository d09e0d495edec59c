"""Fraud distillation: best epoch by validation AP (as in ``training.fit``), stored teacher
logits, and the class-weighted teacher term."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from apps.fraud.distillation import distill_fit_predictor
from apps.fraud.model import average_precision_np, predict_logits

torch.set_num_threads(1)


def _student_cfg(cfg, select_best: str | None):
    s = copy.deepcopy(cfg)
    s.model.d_model, s.model.ffn_hidden = 16, 32
    s.model.n_layers = s.model.n_dense_layers = 1
    s.model.moe = None
    s.model.attention.n_heads = 2
    s.trainer.max_epochs = 3
    s.baseline.enabled = False
    s.head.select_best = select_best
    return s


@pytest.mark.parametrize(
    "dcfg,class_weighted",
    [({"alpha": 0.7, "kind": "regression", "regression_loss": "huber"}, True), ({}, False)],
)
def test_student_keeps_its_best_validation_epoch(tiny_fraud_run, dcfg, class_weighted) -> None:
    cfg, out = tiny_fraud_run
    scfg = _student_cfg(cfg, "val/ap")
    res = distill_fit_predictor(
        scfg, out.predictor, dcfg, data=out.data, class_weighted=class_weighted
    )
    valid = out.inputs.take(out.data.split.valid)
    y_valid = out.data.y[out.data.split.valid]
    # val/ap reached the callback through DistillationModule's epoch-end hook, and the
    # returned student carries the weights of the epoch that scored it
    assert res.extra["best_epoch"] in range(scfg.trainer.max_epochs)
    ap_now = average_precision_np(y_valid, predict_logits(res.predictor.model, valid))
    assert ap_now == pytest.approx(res.extra["best_val_ap"], abs=1e-6)
    assert res.extra["class_weighted"] is class_weighted
    assert f"class-weighted teacher term {class_weighted}" in res.evaluation.protocol
    assert np.isfinite(res.evaluation.metrics["pr_auc"])


def test_no_selection_without_select_best(tiny_fraud_run) -> None:
    cfg, out = tiny_fraud_run
    res = distill_fit_predictor(_student_cfg(cfg, None), out.predictor, {}, data=out.data)
    assert "best_epoch" not in res.extra
