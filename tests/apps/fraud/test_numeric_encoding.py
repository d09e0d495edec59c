"""Piecewise-linear numeric tokens (``head.numeric_encoding: piecewise``, issue #3): codes on
hand-computed edges, quantile edges from training rows only, steps for repeated quantiles,
and edges that travel with the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.fraud.config import FraudConfigError, HeadConfig
from apps.fraud.model import FraudModel, PiecewiseLinearNumeric, WideLogit, tree_edges
from core.config import small_backbone


def _one_feature(edges: list[float]) -> PiecewiseLinearNumeric:
    ple = PiecewiseLinearNumeric(1, 4, len(edges) - 1)
    ple.edges_NE.copy_(torch.tensor([edges]))
    return ple


def test_codes_on_hand_computed_edges() -> None:
    ple = _one_feature([0.0, 1.0, 2.0, 4.0])
    x = torch.tensor([[-1.0], [0.5], [1.5], [3.0], [6.0], [float("nan")]])
    codes = ple.encode(x)[:, 0]
    expected = torch.tensor(
        [
            [-1.0, 0.0, 0.0],  # below the range: the first bin is open below
            [0.5, 0.0, 0.0],
            [1.0, 0.5, 0.0],
            [1.0, 1.0, 0.5],
            [1.0, 1.0, 2.0],  # above the range: the last bin is open above
            [0.0, 0.0, 0.0],  # NaN is read as 0 (the training mean after scaling)
        ]
    )
    torch.testing.assert_close(codes, expected)


def test_repeated_quantiles_become_steps() -> None:
    """A 0/1 feature has repeated quantile edges; its codes still tell 0 from 1."""
    ple = PiecewiseLinearNumeric(1, 4, 4)
    ple.fit_edges(np.array([[0.0]] * 8 + [[1.0]] * 2))
    assert ple.edges_NE[0].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])
    codes = ple.encode(torch.tensor([[0.0], [1.0]]))[:, 0]
    assert torch.isfinite(codes).all()
    # zero-width bins at 0 fire for both rows; the (0, 1] bin separates them
    torch.testing.assert_close(codes[0], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(codes[1], torch.tensor([1.0, 1.0, 1.0, 1.0]))


def test_edges_are_training_quantiles_and_travel_in_the_state_dict() -> None:
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(500, 3)).astype(np.float32)
    x_train[:, 1] = np.exp(x_train[:, 1])  # skewed: quantile edges are not evenly spaced
    torch.manual_seed(0)
    kw = dict(n_numeric=3, numeric_encoding="piecewise", n_bins=8)
    model = FraudModel(small_backbone(d_model=16), **kw).fit_numeric_encoding(x_train)
    want = np.quantile(x_train.astype(np.float64), np.linspace(0, 1, 9), axis=0).T
    np.testing.assert_allclose(model.piecewise.edges_NE.numpy(), want, rtol=1e-6)

    fresh = FraudModel(small_backbone(d_model=16), **kw)  # placeholder edges
    assert not torch.equal(fresh.piecewise.edges_NE, model.piecewise.edges_NE)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.piecewise.edges_NE, model.piecewise.edges_NE)
    batch = {"x_num": torch.from_numpy(x_train[:16])}
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh.feature_tokens(batch), model.feature_tokens(batch))


def test_piecewise_tokens_learn_a_threshold_a_linear_token_cannot_separate() -> None:
    """The point of the encoding: a rule ``|x| > 1.5`` (outside a band) is one direction
    per bin for piecewise codes, while a single linear direction cannot express it."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 1)).astype(np.float32)
    y = (np.abs(x[:, 0]) > 1.5).astype(np.float32)
    ple = PiecewiseLinearNumeric(1, 8, 16)
    ple.fit_edges(x)
    codes = ple.encode(torch.from_numpy(x))[:, 0].numpy()

    # least-squares fit on the codes vs on the raw value (both with an intercept)
    def r2(feats: np.ndarray) -> float:
        a = np.c_[feats, np.ones(len(feats))]
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        return 1 - np.mean((a @ coef - y) ** 2) / np.var(y)

    assert r2(codes) > 0.8
    assert r2(x) < 0.05


def test_tree_edges_find_a_tail_threshold_that_quantile_edges_miss() -> None:
    """The handbook's rule "amount > 220 is fraud" sits beyond the 99.9th percentile:
    quantile edges put no edge near it, tree edges split exactly there."""
    rng = np.random.default_rng(2)
    amount = rng.gamma(2.0, 25.0, size=20_000)
    y = (amount > 220).astype(int)
    assert 0 < y.mean() < 0.002
    edges = tree_edges(amount, y, 8)
    assert len(edges) == 9 and (np.diff(edges) >= 0).all()
    assert edges[0] == amount.min() and edges[-1] == amount.max()
    below, above = amount[amount <= 220].max(), amount[amount > 220].min()
    assert ((edges >= below) & (edges <= above)).any(), edges
    quant = np.quantile(amount, np.linspace(0, 1, 9))
    assert not ((quant >= below) & (quant <= above)).any()
    # one split suffices here, so the top edge repeats (zero-width steps at the maximum)
    assert (edges[-2:] == amount.max()).all()

    # The linear codes only bend at the edge (a change of slope, 0.006 across the rule
    # here); the step codes flip there, in exactly one code.
    x = torch.tensor([[below], [above]], dtype=torch.float32)
    smooth = PiecewiseLinearNumeric(1, 4, 8)
    smooth.fit_edges(amount[:, None], y, method="tree")
    assert (smooth.encode(x)[1, 0] - smooth.encode(x)[0, 0]).abs().max() < 0.05
    ple = PiecewiseLinearNumeric(1, 4, 8, steps=True)
    ple.fit_edges(amount[:, None], y, method="tree")
    codes = ple.encode(x)[:, 0]
    assert codes.shape == (2, 16)
    torch.testing.assert_close(codes[:, :8], smooth.encode(x)[:, 0])
    flips = (codes[1, 8:] - codes[0, 8:]).abs()
    assert flips.sum() == 1.0 and flips.max() == 1.0


def test_tree_edges_without_signal_fall_back_to_the_range() -> None:
    x = np.arange(10.0)
    assert tree_edges(x, np.zeros(10), 4).tolist() == [0, 9, 9, 9, 9]
    assert tree_edges(np.ones(10), np.r_[np.zeros(5), np.ones(5)], 4).tolist() == [1] * 5


def test_bad_piecewise_settings_are_rejected() -> None:
    with pytest.raises(FraudConfigError, match="n_bins"):
        HeadConfig(numeric_encoding="piecewise", n_bins=1)
    with pytest.raises(FraudConfigError, match="piecewise"):
        HeadConfig(numeric_encoding="quantile")
    ple = PiecewiseLinearNumeric(2, 4, 4)
    with pytest.raises(ValueError, match=r"\(rows, 2\)"):
        ple.fit_edges(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least one"):
        ple.fit_edges(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="one label per training row"):
        ple.fit_edges(np.zeros((5, 2)), method="tree")
    with pytest.raises(ValueError, match="'quantile' or 'tree'"):
        ple.fit_edges(np.zeros((5, 2)), method="kmeans")
    with pytest.raises(FraudConfigError, match="bin_edges"):
        HeadConfig(numeric_encoding="piecewise", bin_edges="kmeans")


def test_fit_takes_the_edges_from_the_training_rows_only(tmp_path) -> None:
    """``training.fit`` with piecewise tokens and the wide logit: the edges are the quantiles
    of the rows the model trains on (never validation or test rows), best-epoch selection
    still holds, and the wide weights (zero at the start) train."""
    from apps.fraud.training import training_rows
    from tests.apps.fraud.fraud_model_helpers import fit_two_epochs_keeps_best_val_ap, tiny_config

    cfg = tiny_config(
        tmp_path, numeric_encoding="piecewise", n_bins=8, select_best="val/ap", wide=True
    )
    out = fit_two_epochs_keeps_best_val_ap(cfg)
    assert float(out.predictor.model.wide.weight_NK.abs().sum()) > 0
    rows, _ = training_rows(out.data, cfg)
    x_train = out.inputs.take(rows)["x_num"].astype(np.float64)
    want = np.quantile(x_train, np.linspace(0, 1, 9), axis=0).T
    edges = out.predictor.model.piecewise.edges_NE.numpy()
    np.testing.assert_allclose(edges, want, rtol=1e-5, atol=1e-6)
    x_all = out.inputs.x_num.astype(np.float64)
    all_rows = np.quantile(x_all, np.linspace(0, 1, 9), axis=0).T
    assert not np.allclose(edges, all_rows, atol=1e-3)


def _wide_model(wide: bool, n: int = 3) -> FraudModel:
    torch.manual_seed(0)
    return FraudModel(
        small_backbone(d_model=16),
        n_numeric=n,
        numeric_encoding="piecewise",
        n_bins=4,
        bin_steps=True,
        wide=wide,
    )


def test_wide_logit_starts_as_the_deep_model_and_its_terms_are_exact() -> None:
    """Zero-initialised, the wide part leaves the logit unchanged; once it has weights,
    the attributions of the wide part are exact: with the deep path's gradient terms
    removed, a feature's contribution changes by exactly its wide term."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(6, 3)).astype(np.float32))
    deep, wide = _wide_model(False).eval(), _wide_model(True).eval()
    wide.load_state_dict(deep.state_dict(), strict=False)  # same deep weights
    batch = {"x_num": x}
    torch.testing.assert_close(wide(batch), deep(batch))

    with torch.no_grad():
        wide.wide.weight_NK.copy_(torch.arange(24, dtype=torch.float32).reshape(3, 8) / 10)
    logit_deep, contrib_deep = deep.attributions(batch)
    logit_wide, contrib_wide = wide.attributions(batch)
    codes = wide.piecewise.encode(x) - wide.piecewise.encode(torch.zeros(1, 3))
    term = (codes * wide.wide.weight_NK).sum(-1)  # (B, N), by hand
    torch.testing.assert_close(logit_wide, logit_deep + term.sum(-1))
    torch.testing.assert_close(wide(batch), logit_wide)
    torch.testing.assert_close(contrib_wide, contrib_deep + term)


def test_wide_logit_learns_a_tail_rule_from_few_examples() -> None:
    """The handbook rule "amount above a limit is fraud" with 30 positives in 3,000 rows:
    a logistic fit on the step codes of tree edges ranks every rule row above every
    other row, which is what the wide part adds to the deep path."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 1)).astype(np.float32)
    x[:30, 0] = rng.uniform(2.6, 4.0, size=30)
    x[30:, 0] = np.clip(x[30:, 0], None, 2.5)
    y = (x[:, 0] > 2.55).astype(np.float32)
    ple = PiecewiseLinearNumeric(1, 4, 8, steps=True)
    ple.fit_edges(x, y, "tree")
    wide = WideLogit(1, ple.n_codes)
    opt = torch.optim.Adam(wide.parameters(), lr=0.1)
    codes = ple.encode(torch.from_numpy(x))
    target = torch.from_numpy(y)
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            wide(codes).sum(-1), target, pos_weight=torch.tensor(10.0)
        )
        loss.backward()
        opt.step()
    s = wide(codes).sum(-1).detach().numpy()
    assert s[y == 1].min() > s[y == 0].max()


def test_wide_needs_piecewise_codes() -> None:
    with pytest.raises(FraudConfigError, match="wide"):
        HeadConfig(numeric_encoding="linear", wide=True)
    with pytest.raises(ValueError, match="piecewise"):
        FraudModel(small_backbone(d_model=16), n_numeric=2, wide=True)
