"""RUL targets, unit splits and the per-condition normaliser (fitted on training rows only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from apps.maintenance.cmapss import SETTING_COLUMNS, load_cmapss
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.preprocess import (
    SensorNormalizer,
    add_cmapss_targets,
    cmapss_normalizer,
    piecewise_linear_rul,
    split_units,
)
from tests.shared import require_shared_data


def test_piecewise_linear_rul_train_and_test() -> None:
    f = pd.DataFrame({"unit": [1] * 5 + [2] * 3, "cycle": [1, 2, 3, 4, 5, 1, 2, 3]})
    np.testing.assert_array_equal(piecewise_linear_rul(f, cap=None), [4, 3, 2, 1, 0, 2, 1, 0])
    np.testing.assert_array_equal(piecewise_linear_rul(f, cap=3), [3, 3, 2, 1, 0, 2, 1, 0])
    # truncated test units: the true RUL after the last row is added
    np.testing.assert_array_equal(
        piecewise_linear_rul(f, cap=6, rul_at_last={1: 2, 2: 10}), [6, 5, 4, 3, 2, 6, 6, 6]
    )
    with pytest.raises(MaintenanceDataError, match="no value for unit 2"):
        piecewise_linear_rul(f, rul_at_last={1: 2})
    ts = pd.DataFrame({"unit": 1, "t": pd.date_range("2024-01-01", periods=3, freq="30min")})
    np.testing.assert_array_equal(
        piecewise_linear_rul(ts, time_column="t", cap=None), [1.0, 0.5, 0.0]
    )


def test_split_units_is_by_unit_disjoint_and_seeded() -> None:
    units = np.repeat(np.arange(1, 21), 3)
    tr, va = split_units(units, 0.25, seed=3)
    assert len(va) == 5 and len(tr) == 15
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(1, 21))
    tr2, va2 = split_units(units, 0.25, seed=3)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, split_units(units, 0.25, seed=4)[1])


def _two_condition_frame(rng: np.random.Generator, n: int, shift: float) -> pd.DataFrame:
    cond = rng.integers(0, 2, n)
    return pd.DataFrame(
        {
            "load": np.where(cond == 0, 10.0, 80.0) + rng.normal(0, 0.01, n),
            "a": np.where(cond == 0, 100.0, 500.0) + rng.normal(0, 1 + cond, n) + shift,
            "b": np.where(cond == 0, -5.0, 5.0) + rng.normal(0, 0.1, n),
            "flat": np.where(cond == 0, 7.0, 9.0),  # constant within each condition
        }
    )


def test_normaliser_fits_per_condition_on_train_only() -> None:
    rng = np.random.default_rng(0)
    train = _two_condition_frame(rng, 400, shift=0.0)
    test = _two_condition_frame(rng, 100, shift=50.0)  # drifted: must NOT be re-centred
    norm = SensorNormalizer(
        sensor_columns=("a", "b", "flat"), setting_columns=("load",), n_conditions=2
    )
    norm.fit(train)
    assert norm.n_conditions_ == 2
    assert norm.dropped_sensors_ == ("flat",) and norm.kept_sensors_ == ("a", "b")
    cond_train = (train["load"] > 40).to_numpy().astype(int)  # canonical order: low load first
    np.testing.assert_array_equal(norm.assign_conditions(train), cond_train)
    for c in (0, 1):
        rows = train[cond_train == c][["a", "b"]].to_numpy()
        np.testing.assert_allclose(norm.mean_[c], rows.mean(axis=0))
        np.testing.assert_allclose(norm.scale_[c], rows.std(axis=0))
    fitted = (norm.mean_.copy(), norm.scale_.copy())
    out = norm.transform(test)
    np.testing.assert_array_equal(norm.mean_, fitted[0])  # transform never refits
    cond_test = (test["load"] > 40).to_numpy().astype(int)
    expected = (test["a"].to_numpy() - fitted[0][cond_test, 0]) / fitted[1][cond_test, 0]
    np.testing.assert_allclose(out["a"].to_numpy(), expected)
    assert out["a"].mean() > 10  # the test drift survives: test statistics were not used
    assert "flat" not in out.columns and out["condition"].tolist() == cond_test.tolist()
    assert list(norm.get_feature_names_out()) == ["a", "b"]


def test_normaliser_sklearn_contract_and_errors() -> None:
    rng = np.random.default_rng(1)
    train = _two_condition_frame(rng, 200, 0.0)
    norm = SensorNormalizer(
        sensor_columns=("a", "b"), setting_columns=("load",), n_conditions=2, condition_onehot=True
    )
    assert clone(norm).get_params() == norm.get_params()
    assert not hasattr(norm, "mean_")
    assert norm.fit(train) is norm
    assert list(norm.get_feature_names_out()) == ["a", "b", "condition_0", "condition_1"]
    with pytest.raises(MaintenanceDataError, match="not fitted"):
        SensorNormalizer().transform(train)
    with pytest.raises(MaintenanceDataError, match=r"missing column\(s\) \['b'\]"):
        norm.transform(train.drop(columns="b"))
    bad = train.copy()
    bad.loc[7, "a"] = np.nan
    with pytest.raises(MaintenanceDataError, match="column 'a', row 7"):
        norm.transform(bad)
    rounded = SensorNormalizer(
        sensor_columns=("a", "b"),
        setting_columns=("load",),
        n_conditions=2,
        condition_method="round",
        round_decimals=[-1],
    ).fit(train)
    assert rounded.n_conditions_ == 2
    with pytest.raises(MaintenanceDataError, match="row 0 has settings .* not seen in training"):
        rounded.transform(train.iloc[:3].assign(load=200.0))


@pytest.mark.shared_data
def test_fd002_six_conditions_and_fd001_fourteen_sensors() -> None:
    folder = require_shared_data("maintenance/cmapss")
    fd002 = load_cmapss(folder, "FD002")
    norm = cmapss_normalizer("FD002").fit(fd002.train)
    assert norm.n_conditions_ == 6
    # each KMeans condition is exactly one (altitude, Mach, TRA) combination, in train and test
    for frame in (fd002.train, fd002.test):
        cond = norm.assign_conditions(frame)
        rounded = frame[list(SETTING_COLUMNS)].round(
            {"setting_1": 0, "setting_2": 2, "setting_3": 0}
        )
        combos = pd.Series(list(map(tuple, rounded.to_numpy()))).groupby(cond).nunique()
        assert combos.tolist() == [1] * 6
        assert len(set(pd.Series(list(map(tuple, rounded.to_numpy()))).groupby(cond).first())) == 6
    z = norm.transform(fd002.train)
    per_cond = z.groupby("condition")[list(norm.kept_sensors_)]
    np.testing.assert_allclose(per_cond.mean().to_numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(per_cond.std(ddof=0).to_numpy(), 1.0, atol=1e-6)

    fd001 = load_cmapss(folder, "FD001")
    norm1 = cmapss_normalizer("FD001").fit(fd001.train)
    assert norm1.n_conditions_ == 1
    assert norm1.dropped_sensors_ == tuple(f"sensor_{i}" for i in (1, 5, 6, 10, 16, 18, 19))
    assert len(norm1.kept_sensors_) == 14
    train, test = add_cmapss_targets(fd001.train, fd001.test, fd001.test_rul)
    assert train["rul"].max() == 125 and train.groupby("unit")["rul_uncapped"].min().eq(0).all()
    last = test.groupby("unit").tail(1)
    np.testing.assert_array_equal(last["rul_uncapped"].to_numpy(), fd001.test_rul["rul"].to_numpy())
