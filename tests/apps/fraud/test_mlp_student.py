"""The MLP student as a deployable scorer (``student.kind: mlp``): distilled on training
rows, calibrated and thresholded on validation, scored, explained and saved like the
backbone predictor."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from apps.fraud.calibration import apply_calibration
from apps.fraud.config import FraudConfig, StudentConfig
from apps.fraud.distillation import distill, distill_mlp_predictor
from apps.fraud.errors import FraudConfigError, FraudDataError
from apps.fraud.fastscore import StudentMLP
from apps.fraud.predictor import FraudPredictor
from apps.fraud.training import choose_threshold
from core.spec import TrainResult

torch.set_num_threads(1)


def _mlp_cfg(cfg):
    s = copy.deepcopy(cfg)
    s.student.kind = "mlp"
    s.student.hidden = (16, 8)
    s.student.epochs = 10
    s.student.batch_size = 128  # ~5,000 tiny training rows: 400 steps
    return s


@pytest.fixture(scope="module")
def mlp_run(tiny_fraud_run):
    cfg, out = tiny_fraud_run
    scfg = _mlp_cfg(cfg)
    return scfg, out, distill_mlp_predictor(scfg, out.predictor, data=out.data)


def test_student_learns_the_teacher_on_unseen_rows_and_holds_no_backbone(mlp_run) -> None:
    """On the test block (never fitted), the student's logits follow the teacher's more
    closely than an untrained MLP's; the predictor scores with the student alone."""
    cfg, out, res = mlp_run
    p = res.predictor
    assert p.model is None and isinstance(p.student, StudentMLP)
    assert p.student.hidden == [16, 8] and p.student.fit_steps > 0
    test = out.inputs.take(out.data.split.test)
    t_logits, _ = out.predictor.score_inputs(test)
    s_logits, s_scores = p.score_inputs(test)
    with torch.no_grad():
        direct = p.student(torch.from_numpy(test["x_num"])).double().numpy()
    np.testing.assert_allclose(s_logits, direct, rtol=1e-6)
    np.testing.assert_allclose(s_scores, apply_calibration(s_logits, p.calibration))
    torch.manual_seed(0)
    untrained = StudentMLP(test["x_num"].shape[1], [16, 8]).eval()
    with torch.no_grad():
        u_logits = untrained(torch.from_numpy(test["x_num"])).numpy()
    gap = np.sqrt(np.mean((s_logits - t_logits) ** 2))
    gap_untrained = np.sqrt(np.mean((u_logits - t_logits) ** 2))
    assert gap < 0.5 * gap_untrained, (gap, gap_untrained)
    assert res.student_active_params < res.teacher_active_params / 4
    m = res.evaluation.metrics
    assert 0 < m["pr_auc"] <= 1 and "MLP student [16, 8]" in res.evaluation.protocol


def test_calibration_and_threshold_come_from_the_validation_block(mlp_run) -> None:
    cfg, out, res = mlp_run
    p, split, data = res.predictor, out.data.split, out.data
    val_logits, val_scores = p.score_inputs(out.inputs.take(split.valid))
    amounts = data.frame.get_column(data.schema.amount_column).to_numpy()
    want, rule = choose_threshold(
        cfg, val_scores, data.y[split.valid], data.days[split.valid], amounts[split.valid]
    )
    assert p.threshold == pytest.approx(want) and p.options["rule"] == rule
    n_days = len(np.unique(data.days[split.valid]))
    assert (val_scores >= p.threshold).sum() <= cfg.threshold.alerts_per_day * n_days
    assert abs(val_scores.mean() - data.y[split.valid].mean()) < 0.02


def test_alerts_carry_gradient_times_input_reasons(mlp_run) -> None:
    """Reasons name numeric features only (what the student reads), largest |share| first;
    a share is the feature's gradient x input of the student's logit."""
    _, out, res = mlp_run
    p = res.predictor
    frame = out.data.raw[out.data.split.test].select(p.input_columns).to_pandas()
    scored = p.predict(frame)
    alerts = scored[scored["decision"]]
    assert len(alerts) > 0 and scored.loc[~scored["decision"], "reasons"].isna().all()
    names = list(p.inputs.feature_columns.numeric)
    x = out.inputs.take(out.data.split.test)["x_num"]
    contrib = p._student_contributions(x)
    xt = torch.from_numpy(x[:3]).requires_grad_(True)
    p.student(xt).sum().backward()
    np.testing.assert_allclose(contrib[:3], (xt.grad * xt).detach().numpy(), rtol=1e-5, atol=1e-6)
    for text in alerts["reasons"]:
        parts = [q.split("=") for q in text.split("; ")]
        assert len(parts) == 3 and all(name in names for name, _ in parts)
        sizes = [abs(float(v)) for _, v in parts]
        assert sizes == sorted(sizes, reverse=True)


def test_save_load_round_trip_and_bad_rows(mlp_run, tmp_path) -> None:
    _, out, res = mlp_run
    p = res.predictor
    frame = out.data.raw[out.data.split.test[:300]].select(p.input_columns).to_pandas()
    frame = frame.reset_index(drop=True)
    before = p.predict(frame)
    p.save(tmp_path)
    names = sorted(q.name for q in tmp_path.iterdir())
    assert names == ["inputs.json", "predictor.json", "student.pt"]
    saved = json.loads((tmp_path / "predictor.json").read_text())
    assert saved["model"] is None and saved["student"]["hidden"] == [16, 8]
    loaded = FraudPredictor.load(tmp_path)
    pd.testing.assert_frame_equal(before, loaded.predict(frame))
    bad = frame.copy()
    bad["TX_AMOUNT"] = bad["TX_AMOUNT"].astype(object)
    bad.loc[4, "TX_AMOUNT"] = "abc"
    scored = loaded.predict(bad)
    assert "TX_AMOUNT" in scored.loc[4, "reject_reason"] and np.isnan(scored.loc[4, "score"])
    assert scored["score"].drop(index=4).notna().all()
    (tmp_path / "student.pt").unlink()
    with pytest.raises(FraudDataError, match="missing student.pt"):
        FraudPredictor.load(tmp_path)


def test_spec_hook_routes_on_student_kind_and_config_checks(tiny_fraud_run) -> None:
    cfg, out = tiny_fraud_run
    r = distill(_mlp_cfg(cfg), out.predictor, distill_cfg={"alpha": 1.0})
    assert isinstance(r, TrainResult) and r.predictor.student is not None
    assert r.extra["student_kind"] == "mlp" and r.extra["distill_config"]["kind"] == "regression"
    back = FraudConfig.from_dict(_mlp_cfg(cfg).to_dict())
    assert back.student == StudentConfig("mlp", (16, 8), 10, 128)
    with pytest.raises(FraudConfigError, match="student.kind='tree'"):
        StudentConfig(kind="tree")
    with pytest.raises(FraudDataError, match="backbone or a student"):
        FraudPredictor(None, out.predictor.inputs, {"method": "none"}, {"alert": 0.5})


def test_an_ensemble_teacher_is_the_mean_of_its_teachers_logits(mlp_run) -> None:
    """``more_teachers``: the soft label is the mean logit, each teacher through its own
    input builder; the same teacher twice teaches exactly the single-teacher student, and
    the run reports both teachers' parameters and the student's validation AP."""
    from sklearn.metrics import average_precision_score

    from apps.fraud.distillation import ensemble_logits

    cfg, out, res = mlp_run
    data, split = out.data, out.data.split
    other = copy.deepcopy(out.predictor)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = split.train[:500]
    one = out.predictor.score_inputs(out.inputs.take(rows))[0]
    two = other.score_inputs(other.inputs.transform(data.frame).take(rows))[0]
    assert np.abs(one - two).max() > 1e-3  # the perturbed teacher really differs
    np.testing.assert_allclose(
        ensemble_logits([out.predictor, other], data, rows), (one + two) / 2, rtol=1e-6
    )

    twice = distill_mlp_predictor(cfg, out.predictor, data=data, more_teachers=[out.predictor])
    for a, b in zip(
        twice.predictor.student.state_dict().values(),
        res.predictor.student.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert twice.extra["n_teachers"] == 2 and res.extra["n_teachers"] == 1
    assert twice.teacher_active_params == 2 * res.teacher_active_params
    val_logits = res.predictor.score_inputs(out.inputs.take(split.valid))[0]
    want = average_precision_score(data.y[split.valid], val_logits)
    assert res.extra["validation_ap"] == pytest.approx(want)
    assert "Ensemble teacher: mean logit of 2 teachers" in twice.evaluation.protocol
