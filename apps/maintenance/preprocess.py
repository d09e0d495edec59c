"""Preprocessing: RUL targets, unit splits, and per-operating-condition sensor normalisation.

Engines that run in several operating conditions (C-MAPSS FD002/FD004: six combinations of
altitude, Mach number and throttle angle) show sensor levels dominated by the condition, not by
wear. Normalising each sensor with the mean and standard deviation *of its condition* removes
that, leaving the slow degradation drift visible. All statistics, the condition clustering and
the choice of constant sensors are fitted on training rows only; test rows are only transformed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from apps.maintenance.cmapss import N_CONDITIONS, SENSOR_COLUMNS, SETTING_COLUMNS
from apps.maintenance.errors import MaintenanceDataError, show

RUL_CAP = 125.0  # cycles; the piecewise-linear cap most C-MAPSS papers use


def piecewise_linear_rul(
    frame: pd.DataFrame,
    unit_column: str = "unit",
    time_column: str = "cycle",
    cap: float | None = RUL_CAP,
    rul_at_last: Mapping[object, float] | pd.Series | None = None,
    time_unit: str = "h",
) -> np.ndarray:
    """RUL at every row: ``min(cap, rul_at_last[unit] + (t_last(unit) - t))``.

    Training units run to failure, so ``rul_at_last`` is 0 (the default). For truncated test
    units pass the true RUL after each unit's last row (C-MAPSS ``RUL_*``). The cap makes the
    target flat early in life, where wear is not yet observable (Heimes 2008; most C-MAPSS work
    uses 125 cycles); ``cap=None`` gives the raw RUL. Timestamps give RUL in ``time_unit``.
    """
    t = frame[time_column]
    last = t.groupby(frame[unit_column], sort=False).transform("max")
    if pd.api.types.is_datetime64_any_dtype(t):
        rul = ((last - t) / np.timedelta64(1, time_unit)).to_numpy(np.float64)
    else:
        rul = (last - t).to_numpy(np.float64)
    if rul_at_last is not None:
        mapping = pd.Series(rul_at_last) if not isinstance(rul_at_last, pd.Series) else rul_at_last
        offset = frame[unit_column].map(mapping)
        if offset.isna().any():
            r = int(np.argmax(offset.isna().to_numpy()))
            raise MaintenanceDataError(
                f"rul_at_last has no value for unit {show(frame[unit_column].iat[r])} (row {r})"
            )
        rul = rul + offset.to_numpy(np.float64)
    return np.minimum(rul, cap) if cap is not None else rul


def add_cmapss_targets(
    train: pd.DataFrame, test: pd.DataFrame, test_rul: pd.DataFrame, cap: float = RUL_CAP
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copies of ``train``/``test`` with ``rul`` (capped at ``cap``) and ``rul_uncapped``."""
    truth = test_rul.set_index("unit")["rul"]
    out = []
    for frame, at_last in ((train, None), (test, truth)):
        f = frame.copy()
        f["rul_uncapped"] = piecewise_linear_rul(f, cap=None, rul_at_last=at_last)
        f["rul"] = np.minimum(f["rul_uncapped"].to_numpy(), cap)
        out.append(f)
    return out[0], out[1]


def split_units(
    units: Sequence[object] | np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split *units* (never rows: windows of one unit overlap) into train and validation sets."""
    if not 0.0 < val_fraction < 1.0:
        raise MaintenanceDataError(f"val_fraction={val_fraction}: expected 0 < val_fraction < 1")
    u = np.unique(np.asarray(units))
    if len(u) < 2:
        raise MaintenanceDataError(f"split_units: need at least 2 units, got {len(u)}")
    perm = np.random.default_rng(seed).permutation(len(u))
    n_val = min(len(u) - 1, max(1, round(val_fraction * len(u))))
    return np.sort(u[perm[n_val:]]), np.sort(u[perm[:n_val]])


class SensorNormalizer(TransformerMixin, BaseEstimator):
    """Per-operating-condition z-scoring of sensors, with constant sensors dropped.

    ``fit`` (training rows only) finds the operating conditions from ``setting_columns`` (KMeans
    with ``n_conditions`` clusters on standardised settings, or exact groups of settings rounded
    to ``round_decimals``), drops every sensor that takes at most ``max_constant_levels``
    distinct values within every condition (1: truly constant; 2 also drops sensors that only
    flip between two quantisation levels, which reproduces the usual 14-sensor C-MAPSS FD001
    set), and stores each kept sensor's mean and standard deviation per condition (a zero
    deviation becomes 1: such a sensor is centred, not scaled). ``transform`` replaces the kept
    sensors with ``(x - mean[c]) / std[c]``, removes dropped ones, and adds an int ``condition``
    column (plus one-hot ``condition_<k>`` columns when ``condition_onehot``).
    """

    def __init__(
        self,
        sensor_columns: Sequence[str] = SENSOR_COLUMNS,
        setting_columns: Sequence[str] = (),
        n_conditions: int = 1,
        condition_method: str = "kmeans",
        round_decimals: Sequence[int] | None = None,
        drop_constant: bool = True,
        max_constant_levels: int = 1,
        condition_onehot: bool = False,
        random_state: int = 0,
    ) -> None:
        self.sensor_columns = sensor_columns
        self.setting_columns = setting_columns
        self.n_conditions = n_conditions
        self.condition_method = condition_method
        self.round_decimals = round_decimals
        self.drop_constant = drop_constant
        self.max_constant_levels = max_constant_levels
        self.condition_onehot = condition_onehot
        self.random_state = random_state

    # ---------------------------------------------------------------- fit
    def fit(self, X: pd.DataFrame, y: object = None) -> SensorNormalizer:
        sensors = list(self.sensor_columns)
        settings = list(self.setting_columns)
        if self.condition_method not in ("kmeans", "round"):
            raise MaintenanceDataError(
                f"condition_method={self.condition_method!r}: expected 'kmeans' or 'round'"
            )
        if self.n_conditions < 1:
            raise MaintenanceDataError(f"n_conditions={self.n_conditions}: expected >= 1")
        values = _numeric_block(X, sensors, "fit")
        self.sensors_in_ = tuple(sensors)
        self.setting_columns_ = tuple(settings)
        cond = self._fit_conditions(X)
        k = int(cond.max()) + 1
        self.n_conditions_ = k
        self.condition_counts_ = np.bincount(cond, minlength=k)
        levels = np.stack(
            [pd.DataFrame(values[cond == c]).nunique().to_numpy() for c in range(k)]
        )  # [K, S]
        if self.drop_constant:
            constant = (levels <= self.max_constant_levels).all(axis=0)
        else:
            constant = np.zeros(len(sensors), dtype=bool)
        self.dropped_sensors_ = tuple(s for s, c in zip(sensors, constant, strict=True) if c)
        self.kept_sensors_ = tuple(s for s, c in zip(sensors, constant, strict=True) if not c)
        if not self.kept_sensors_:
            raise MaintenanceDataError(
                "SensorNormalizer.fit: every sensor is constant; nothing to model"
            )
        kept = values[:, ~constant]
        mean = np.stack([kept[cond == c].mean(axis=0) for c in range(k)])
        std = np.stack([kept[cond == c].std(axis=0) for c in range(k)])
        self.mean_ = mean
        self.scale_ = np.where(std > 0, std, 1.0)
        return self

    def _fit_conditions(self, X: pd.DataFrame) -> np.ndarray:
        settings = list(self.setting_columns)
        self.kmeans_ = None
        self.setting_center_ = None
        self.setting_scale_ = None
        self.condition_table_ = None
        if self.n_conditions == 1 or not settings:
            return np.zeros(len(X), dtype=np.int64)
        s = _numeric_block(X, settings, "fit")
        if self.condition_method == "round":
            keys = _round_keys(s, self._decimals(len(settings)))
            table, cond = np.unique(keys, axis=0, return_inverse=True)
            self.condition_table_ = table
            return cond.reshape(-1).astype(np.int64)
        if len(np.unique(s, axis=0)) < self.n_conditions:
            raise MaintenanceDataError(
                f"SensorNormalizer.fit: fewer distinct setting rows than n_conditions={self.n_conditions}"
            )
        self.setting_center_ = s.mean(axis=0)
        sd = s.std(axis=0)
        self.setting_scale_ = np.where(sd > 0, sd, 1.0)
        km = KMeans(n_clusters=self.n_conditions, n_init=10, random_state=self.random_state)
        with threadpool_limits(1):
            labels = km.fit_predict((s - self.setting_center_) / self.setting_scale_)
        # relabel clusters in a canonical order (by centroid, lexicographic) so ids are stable
        order = np.lexsort(km.cluster_centers_.T[::-1])
        remap = np.empty_like(order)
        remap[order] = np.arange(len(order))
        self.kmeans_ = km
        self.cluster_remap_ = remap
        return remap[labels].astype(np.int64)

    def _decimals(self, n: int) -> list[int]:
        dec = list(self.round_decimals) if self.round_decimals is not None else [0] * n
        if len(dec) != n:
            raise MaintenanceDataError(
                f"round_decimals={dec}: expected one entry per setting column ({n})"
            )
        return dec

    # ---------------------------------------------------------- transform
    def assign_conditions(self, X: pd.DataFrame) -> np.ndarray:
        """Operating-condition id (0..n_conditions_-1) of every row, from the fitted model."""
        self._check_fitted()
        if self.n_conditions_ == 1 and self.kmeans_ is None and self.condition_table_ is None:
            return np.zeros(len(X), dtype=np.int64)
        s = _numeric_block(X, list(self.setting_columns_), "transform")
        if self.condition_table_ is not None:
            keys = _round_keys(s, self._decimals(s.shape[1]))
            lookup = {tuple(row): i for i, row in enumerate(self.condition_table_)}
            out = np.empty(len(keys), dtype=np.int64)
            for r, row in enumerate(map(tuple, keys)):
                if row not in lookup:
                    raise MaintenanceDataError(
                        f"transform: row {r} has settings {list(s[r])}, an operating condition not seen "
                        "in training (condition_method='round')"
                    )
                out[r] = lookup[row]
            return out
        with threadpool_limits(1):
            labels = self.kmeans_.predict((s - self.setting_center_) / self.setting_scale_)
        return self.cluster_remap_[labels].astype(np.int64)

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        self._check_fitted()
        cond = self.assign_conditions(X)
        kept = list(self.kept_sensors_)
        values = _numeric_block(X, kept, "transform")
        out = X.drop(columns=list(self.dropped_sensors_)).copy()
        out[kept] = (values - self.mean_[cond]) / self.scale_[cond]
        out["condition"] = cond
        if self.condition_onehot:
            for c in range(self.n_conditions_):
                out[f"condition_{c}"] = (cond == c).astype(np.float64)
        return out

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """The model's input features: kept sensors (plus one-hot conditions when enabled)."""
        self._check_fitted()
        names = list(self.kept_sensors_)
        if self.condition_onehot:
            names += [f"condition_{c}" for c in range(self.n_conditions_)]
        return np.asarray(names, dtype=object)

    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise MaintenanceDataError(
                "SensorNormalizer is not fitted; call fit(train_frame) first"
            )


def cmapss_normalizer(subset: str, condition_onehot: bool = False) -> SensorNormalizer:
    """The usual C-MAPSS preprocessing: six KMeans conditions for FD002/FD004, one otherwise;
    sensors with at most two levels per condition dropped (14 sensors kept on FD001)."""
    if subset not in N_CONDITIONS:
        raise MaintenanceDataError(f"subset {subset!r}: expected one of {sorted(N_CONDITIONS)}")
    return SensorNormalizer(
        sensor_columns=SENSOR_COLUMNS,
        setting_columns=SETTING_COLUMNS,
        n_conditions=N_CONDITIONS[subset],
        condition_method="kmeans",
        max_constant_levels=2,
        condition_onehot=condition_onehot,
    )


def _numeric_block(X: pd.DataFrame, columns: list[str], stage: str) -> np.ndarray:
    missing = [c for c in columns if c not in X.columns]
    if missing:
        raise MaintenanceDataError(f"SensorNormalizer.{stage}: missing column(s) {missing}")
    values = X[columns].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise MaintenanceDataError(
            f"SensorNormalizer.{stage}: column {columns[c]!r}, row {r}: {values[r, c]} is not a finite number"
        )
    return values


def _round_keys(s: np.ndarray, decimals: list[int]) -> np.ndarray:
    keys = np.stack([np.round(s[:, j], d) for j, d in enumerate(decimals)], axis=1)
    return keys + 0.0  # -0.0 -> 0.0 so both round to the same condition
