"""Polars-free scoring path (torch row features, distilled student), best-epoch selection
on validation AP, periodic numeric tokens and tie-free ranking metrics (issue #3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.fraud.calibration import apply_calibration
from apps.fraud.fastscore import RowFeatures, StudentMLP, distill_student, score_rows
from apps.fraud.features import FeatureConfig
from apps.fraud.inputs import InputBuilder
from apps.fraud.metrics import average_precision, recall_at_precision
from apps.fraud.model import FraudModel, PeriodicNumeric
from apps.fraud.readers import load_transactions
from apps.fraud.schema import FraudSchema
from apps.fraud.training import ranking_metrics
from core.config import small_backbone
from tests.apps.fraud.helpers import write_csv

ROWS = {
    "Time": ["0", "7200", "86400", "100000", "23.5", "79300"],
    "V1": ["0.5", None, "-1", "2", "0", "7"],
    "V2": ["1", "2", "3", "4", "-2", "0"],
    "Amount": ["0", "10", "99.5", "3", "1200", "0.5"],
    "Class": ["0", "1", "0", "0", "0", "1"],
}


def _ulb_like(tmp_path):
    schema = FraudSchema(
        name="ulb-like", time_column="Time", time_kind="offset", amount_column="Amount",
        label_column="Class", numeric_columns=("V1", "V2"),
    )  # fmt: skip
    frame = load_transactions(write_csv(tmp_path, ROWS), schema)
    cfg = FeatureConfig(card_features=False, terminal_features=False, calendar_features=False)
    return schema, frame, InputBuilder(schema, cfg, 0).fit(frame)


def _raw(rows=ROWS) -> torch.Tensor:
    cols = [rows["Time"], rows["Amount"], rows["V1"], rows["V2"]]
    return torch.tensor([[float(v) if v is not None else np.nan for v in c] for c in cols]).T


def test_row_features_match_the_polars_pipeline(tmp_path):
    _, frame, ib = _ulb_like(tmp_path)
    feats = RowFeatures.from_state(ib.state_dict())
    mi = ib.transform(frame)
    # load_transactions sorts by time: put the raw rows in the frame's order
    order = np.argsort([float(t) for t in ROWS["Time"]], kind="stable")
    raw = _raw()[torch.from_numpy(order)]
    np.testing.assert_array_equal(feats(raw, scaled=False).numpy(), mi.x_raw)
    np.testing.assert_allclose(feats(raw).numpy(), mi.x_num, rtol=0, atol=1e-6)
    assert feats(raw, scaled=False)[:, 2].tolist() == [0, 0, 2, 22, 0, 3]  # hour of day
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        feats(raw[:, :3])


def test_row_features_refuse_history_schemas():
    with pytest.raises(ValueError, match="row-local"):
        RowFeatures(["card_count_1d"], [], {}, [False], [0.0], [1.0])


def test_distilled_student_follows_its_teacher():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 5)).astype(np.float32)
    teacher = 2 * x[:, 0] - 0.5 * x[:, 1] ** 2 + x[:, 2] * x[:, 3]
    student = distill_student(x, teacher, hidden=(32, 16), epochs=30, batch_size=128)
    with torch.no_grad():
        got = student(torch.from_numpy(x)).numpy()
    assert np.corrcoef(got, teacher)[0, 1] > 0.9
    with pytest.raises(ValueError, match="equal"):
        distill_student(x, teacher[:10])


def test_score_rows_batches_are_consistent(tmp_path):
    _, _, ib = _ulb_like(tmp_path)
    feats = RowFeatures.from_state(ib.state_dict())
    torch.manual_seed(0)
    student = StudentMLP(6, (8,)).eval()
    model = FraudModel(small_backbone(d_model=16), n_numeric=6, numeric_encoding="periodic")
    model.eval()
    raw = _raw()
    for m in (student, model):
        whole = score_rows(feats, m, raw)
        pieces = score_rows(feats, m, raw, batch_size=4)
        assert whole.shape == (6,)
        torch.testing.assert_close(whole, pieces, rtol=1e-5, atol=1e-5)


def test_periodic_embeddings_change_tokens_and_keep_gradients():
    torch.manual_seed(0)
    per = PeriodicNumeric(3, 8, 4, 0.5)
    x = torch.tensor([[0.0, 1.0, float("nan")], [2.0, -1.0, 0.5]], requires_grad=True)
    out = per(x)
    assert out.shape == (2, 3, 8) and torch.isfinite(out).all() and (out >= 0).all()
    out.sum().backward()
    assert per.freq_NK.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="numeric_encoding"):
        FraudModel(small_backbone(d_model=16), n_numeric=3, numeric_encoding="fourier")


def test_ranking_metrics_use_logits_when_probabilities_saturate():
    """float64 sigmoid maps every logit above ~37 to exactly 1.0: ranking on the
    probabilities ties the top rows, ranking on the logits does not."""
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    logits = np.array([80.0, 70.0, 60.0, 50.0, 45.0, -5, -6, -7, -8, -9])
    calib = {"method": "platt", "a": 1.0, "b": 0.0}
    probs = apply_calibration(logits, calib)
    assert (probs[:5] == 1.0).all()  # the saturation this guards against
    assert recall_at_precision(y, probs, 0.9) == 0.0
    m = ranking_metrics(y, logits, calib)
    assert m["recall_at_precision_0.9"] == pytest.approx(0.75)
    assert m["pr_auc"] == pytest.approx(average_precision(y, logits))
    assert ranking_metrics(y, logits, {"method": "isotonic", "x": [0.0], "y": [0.5]}) == {}


def test_best_epoch_by_validation_ap_is_restored(tmp_path):
    """``head.select_best='val/ap'``: the kept weights reproduce the best validation AP."""
    from tests.apps.fraud.fraud_model_helpers import fit_two_epochs_keeps_best_val_ap, tiny_config

    cfg = tiny_config(tmp_path, numeric_encoding="periodic", select_best="val/ap")
    fit_two_epochs_keeps_best_val_ap(cfg)
