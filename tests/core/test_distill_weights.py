"""Per-row weights of the distillation teacher term (``DistillConfig.sample_weight_key``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from core.config import AttentionConfig, BackboneConfig
from core.distill import (
    DistillationModule,
    DistillConfig,
    regression_distillation_loss,
    soft_kl,
    teacher_term,
)
from core.engine import OptimConfig
from core.errors import KeelInputError
from core.examples.synthetic import SyntheticClassifier, _DictDataset, _tensors, make_frame

torch.set_num_threads(1)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _hand_binary_kl(s: float, t: float, T: float) -> float:
    """KL([p_t, 1 - p_t] || [p_s, 1 - p_s]) with p = sigmoid(z / T), in plain floats."""
    p_s, p_t = _sigmoid(s / T), _sigmoid(t / T)
    return p_t * math.log(p_t / p_s) + (1 - p_t) * math.log((1 - p_t) / (1 - p_s))


def test_weighted_binary_kl_matches_hand_computation() -> None:
    s, t, w, T = [0.5, -1.0, 3.0], [2.0, -3.0, 1.0], [3.0, 1.0, 0.0], 2.0
    cfg = DistillConfig(kind="binary", temperature=T)
    got = float(teacher_term(torch.tensor(s), torch.tensor(t), cfg, torch.tensor(w)))
    kls = [_hand_binary_kl(a, b, T) for a, b in zip(s, t, strict=True)]
    # row 2 has weight 0: it must not count at all
    expected = T**2 * (3.0 * kls[0] + 1.0 * kls[1]) / 4.0
    assert got == pytest.approx(expected, rel=1e-5)
    # unit weights = the unweighted mean (the existing behaviour)
    ones = torch.ones(3)
    unweighted = float(teacher_term(torch.tensor(s), torch.tensor(t), cfg))
    assert float(teacher_term(torch.tensor(s), torch.tensor(t), cfg, ones)) == pytest.approx(
        unweighted, rel=1e-6
    )
    assert unweighted == pytest.approx(T**2 * sum(kls) / 3.0, rel=1e-5)


def test_weighted_regression_terms_match_hand_computation() -> None:
    s, t, w = (
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([0.0, 0.0, 1.0]),
        torch.tensor([1.0, 0.0, 2.0]),
    )
    mse = DistillConfig(kind="regression", regression_loss="mse")
    # squared errors 1, 4, 4 weighted 1, 0, 2: (1 + 8) / 3
    assert float(teacher_term(s, t, mse, w)) == pytest.approx(3.0, rel=1e-6)
    huber = DistillConfig(kind="regression", regression_loss="huber", huber_delta=1.0)
    # huber(1) = 0.5, huber(2) = 2 - 0.5 = 1.5 (twice): (0.5 + 0 + 2 * 1.5) / 3
    assert float(teacher_term(s, t, huber, w)) == pytest.approx(3.5 / 3.0, rel=1e-6)
    # multi-output rows: each row's mean error, weighted by row
    s2, t2 = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.zeros(2, 2)
    got = float(
        regression_distillation_loss(s2, t2, 0.0, 1.0, "mse", weight_B=torch.tensor([1.0, 3.0]))
    )
    assert got == pytest.approx((5.0 * 1 + 0.0 * 3) / 4.0, rel=1e-6)


def test_weighted_softmax_kl_broadcasts_over_token_positions() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    w = torch.tensor([2.0, 0.0])
    # weight 0 on row 1: the weighted mean is row 0's mean over its three positions
    assert float(soft_kl(s, t, 2.0, w)) == pytest.approx(
        float(soft_kl(s[:1], t[:1], 2.0)), rel=1e-5
    )


def test_bad_weights_are_rejected() -> None:
    cfg = DistillConfig(kind="regression")
    s, t = torch.zeros(3), torch.ones(3)
    with pytest.raises(KeelInputError, match=r"shape \[3\]"):
        teacher_term(s, t, cfg, torch.ones(2))
    with pytest.raises(KeelInputError, match=">= 0"):
        teacher_term(s, t, cfg, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(KeelInputError, match="sum to 0"):
        teacher_term(s, t, cfg, torch.zeros(3))


def _model(d: int, seed: int) -> SyntheticClassifier:
    torch.manual_seed(seed)
    bb = BackboneConfig(
        d_model=d, n_layers=1, ffn_hidden=2 * d, attention=AttentionConfig(n_heads=2)
    ).to_dict()
    return SyntheticClassifier(bb, OptimConfig().to_dict()).eval()


def test_module_reads_sample_weights_from_the_batch() -> None:
    teacher, student = _model(16, 0), _model(8, 1)
    frame = make_frame(32, 3)
    batch = next(iter(DataLoader(_DictDataset(_tensors(frame)), batch_size=32)))
    cfg = DistillConfig(alpha=1.0, kind="binary", temperature=2.0)
    module = DistillationModule(student, teacher, cfg)
    with torch.no_grad():
        s_z, t_z = student(batch).tolist(), teacher(batch).tolist()
    kls = [_hand_binary_kl(a, b, 2.0) for a, b in zip(s_z, t_z, strict=True)]
    # most weight on the row the student matches worst, so weighting visibly matters
    w = torch.full((32,), 0.1)
    w[max(range(32), key=kls.__getitem__)] = 5.0
    with torch.no_grad():
        weighted = float(module.losses({**batch, "sample_weight": w})["distill"])
        plain = float(module.losses(batch)["distill"])
    expected = 4.0 * sum(wi * k for wi, k in zip(w.tolist(), kls, strict=True)) / float(w.sum())
    assert weighted == pytest.approx(expected, rel=1e-5)
    assert plain == pytest.approx(4.0 * sum(kls) / 32, rel=1e-5)
    assert abs(expected - plain) > 1e-4  # the weights changed the loss


def test_position_sum_reduction_sums_each_row_then_averages_rows() -> None:
    """``position_reduction="sum"`` (dense heads): per-row sum over positions, then the mean
    over rows, for the KL and the regression terms; "mean" keeps the per-position mean."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    reg_sum = DistillConfig(kind="regression", position_reduction="sum")
    reg_mean = DistillConfig(kind="regression")
    expected_sum = (s - t).pow(2).reshape(2, -1).sum(1).mean()
    torch.testing.assert_close(teacher_term(s, t, reg_sum), expected_sum)
    torch.testing.assert_close(teacher_term(s, t, reg_mean), (s - t).pow(2).mean())
    kl_sum = teacher_term(s, t, DistillConfig(kind="binary", position_reduction="sum"))
    kl_mean = teacher_term(s, t, DistillConfig(kind="binary"))
    torch.testing.assert_close(kl_sum, kl_mean * 12)  # 12 positions per row
    w = torch.tensor([3.0, 1.0])
    per_row = (s - t).pow(2).reshape(2, -1).sum(1)
    torch.testing.assert_close(teacher_term(s, t, reg_sum, w), (w * per_row).sum() / w.sum())
    with pytest.raises(ValueError, match="position_reduction"):
        DistillConfig(position_reduction="max")


def test_column_weights_sum_the_per_column_terms_and_default_to_their_mean() -> None:
    """Two columns [regression, binary]: squared error on column 0, T^2 * binary KL on
    column 1; ``column_weights`` gives ``sum_c w_c * term_c``, empty gives their mean."""
    s = torch.tensor([[0.5, 1.0], [0.2, -2.0]])
    t = torch.tensor([[0.0, 0.0], [0.4, 1.0]])
    T = 2.0
    mse = ((0.5 - 0.0) ** 2 + (0.2 - 0.4) ** 2) / 2
    kl = T * T * (_hand_binary_kl(1.0, 0.0, T) + _hand_binary_kl(-2.0, 1.0, T)) / 2
    kinds = ["regression", "binary"]
    mean = DistillConfig(temperature=T, column_kinds=kinds)
    assert float(teacher_term(s, t, mean)) == pytest.approx((mse + kl) / 2, rel=1e-5)
    task = DistillConfig(temperature=T, column_kinds=kinds, column_weights=[1.0, 0.1])
    assert float(teacher_term(s, t, task)) == pytest.approx(mse + 0.1 * kl, rel=1e-5)
    # [0.5, 0.5] is the mean exactly; a zero weight drops its column
    half = DistillConfig(temperature=T, column_kinds=kinds, column_weights=[0.5, 0.5])
    assert float(teacher_term(s, t, half)) == pytest.approx((mse + kl) / 2, rel=1e-6)
    rul_only = DistillConfig(temperature=T, column_kinds=kinds, column_weights=[1.0, 0.0])
    assert float(teacher_term(s, t, rul_only)) == pytest.approx(mse, rel=1e-6)


@pytest.mark.parametrize(
    "weights, match",
    [([1.0], "has 1 entries but column_kinds names 2"), ([1.0, -0.1], "finite and >= 0")],
)
def test_bad_column_weights_are_rejected(weights: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillConfig(column_kinds=["regression", "binary"], column_weights=weights)
    # weights without kinds are accepted (an app fills its kinds in), but not used alone
    alone = DistillConfig(column_weights=[1.0, 0.1])
    with pytest.raises(KeelInputError, match="need one column kind each"):
        teacher_term(torch.zeros(2, 2), torch.zeros(2, 2), alone)
