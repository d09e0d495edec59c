"""Causal transaction features in polars.

Every feature of a transaction at time ``t`` is computed only from transactions with time
``<= t`` (ties included, whatever their file order), so features can be built once on the
full chronological frame (train + delay + test days) and then split: history from the
training days feeds test-day features exactly as it would in production.

Label-derived features (the fraud rate of a terminal, target encodings of categoricals)
are stricter: labels arrive late, so the rate at ``t`` uses only labels of transactions in
``(t - delay - w, t - delay]`` (the handbook's "delay period"). A transaction whose label is
null (not yet known) counts neither as fraud nor as labelled.

Families (``w`` in ``windows_days``; prefixes ``card_`` / ``terminal_``):
* ``{p}_count_{w}d``, ``{p}_sum_{w}d``, ``{p}_mean_{w}d``: amount count/sum/mean over (t - w, t]
* ``card_hours_since_prev``: hours since the card's previous transaction (capped)
* ``card_amount_ratio_{r}d``: amount / mean of the card's OTHER transactions in (t - r, t]
* ``{p}_risk_{w}d``, ``{p}_labelled_{w}d``: delayed fraud rate and labelled count
* ``{p}_days_since_fraud`` (``risk_recency``): days from ``t - delay`` back to the last
  fraud known then, capped at ``recency_cap_days``
* ``{p}_fraud_episode_days`` (``risk_episode``): days from ``t - delay`` back to the first
  fraud known then within ``episode_lookback_days`` (the lookback when there is none): how long
  a run of frauds has gone on, which tells a compromise still under way from one over
* ``amount``, ``amount_log1p``, ``hour``, ``is_night``, ``is_weekend`` (calendar times only)
* the schema's numeric columns (nulls filled with the training mean) and categorical
  columns as integer codes (0 = unseen or null, so cardinality = vocabulary + 1).

A model reads ``to_matrices(frame) -> (x_num [n, N] float32, x_cat [n, C] int64)``, with
columns named by ``feature_columns_.numeric`` / ``.categorical``. To save time on long
data, transform only rows from ``FeatureConfig.history_days()`` before the first row you
need. Rolling sums are running sums, so their last bits (about 1e-12 relative) depend on
how much history precedes a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from apps.fraud.errors import FraudConfigError, FraudDataError
from apps.fraud.schema import TS, FraudSchema, load_schema
from core.configio import YamlConfig

_IDX = "__idx"
_ONE = "__one"
_US_PER_DAY = 86_400 * 1_000_000


@dataclass
class FeatureConfig(YamlConfig):
    """Which features to build. ``risk_columns=None`` means the terminal column (if any).

    ``night_hours=(22, 6)``: night is hour >= 22 or hour < 6.
    """

    windows_days: tuple[int, ...] = (1, 7, 30)
    label_delay_days: float = 7.0
    risk_windows_days: tuple[int, ...] = (1, 7, 30)
    risk_columns: tuple[str, ...] | None = None
    ratio_window_days: int = 30
    max_gap_days: float = 30.0
    night_hours: tuple[int, int] = (22, 6)
    card_features: bool = True
    terminal_features: bool = True
    calendar_features: bool = True
    risk_recency: bool = False
    recency_cap_days: float = 60.0
    risk_episode: bool = False
    episode_lookback_days: float = 30.0

    def __post_init__(self) -> None:
        self.windows_days = tuple(int(w) for w in self.windows_days)
        self.risk_windows_days = tuple(int(w) for w in self.risk_windows_days)
        if self.risk_columns is not None:
            self.risk_columns = tuple(self.risk_columns)
        self.night_hours = tuple(self.night_hours)  # type: ignore[assignment]
        for name in ("windows_days", "risk_windows_days"):
            if any(w < 1 for w in getattr(self, name)):
                raise FraudConfigError(
                    f"features.{name} must be >= 1 day, got {getattr(self, name)}"
                )
        if self.label_delay_days < 0 or not math.isfinite(self.label_delay_days):
            raise FraudConfigError(
                f"features.label_delay_days must be >= 0, got {self.label_delay_days}"
            )
        if not self.recency_cap_days > 0:
            raise FraudConfigError(
                f"features.recency_cap_days must be > 0, got {self.recency_cap_days}"
            )
        if not self.episode_lookback_days > 0:
            raise FraudConfigError(
                f"features.episode_lookback_days must be > 0, got {self.episode_lookback_days}"
            )
        if self.ratio_window_days < 1 or self.max_gap_days <= 0:
            raise FraudConfigError("features.ratio_window_days >= 1 and max_gap_days > 0 required")
        if len(self.night_hours) != 2 or not all(0 <= h <= 23 for h in self.night_hours):
            raise FraudConfigError(
                f"features.night_hours must be two hours 0..23, got {self.night_hours}"
            )

    def history_days(self) -> float:
        """Days of history before a row that its features can read: transform only rows
        from ``first_needed_day - history_days`` on (e.g. 37 of the handbook's 183 days
        for one 21-day split) to save time; earlier rows cannot change the result."""
        windows = [*self.windows_days, self.ratio_window_days, self.max_gap_days]
        windows.append(self.label_delay_days + max(self.risk_windows_days, default=0))
        if self.risk_recency:
            windows.append(self.label_delay_days + self.recency_cap_days)
        if self.risk_episode:
            windows.append(self.label_delay_days + self.episode_lookback_days)
        return float(max(windows))


@dataclass(frozen=True)
class FeatureColumns:
    """Names of the model inputs, in matrix column order."""

    numeric: list[str]
    categorical: list[str]

    @property
    def all(self) -> list[str]:
        return self.numeric + self.categorical


def _prefix(schema: FraudSchema, col: str) -> str:
    if col == schema.card_column:
        return "card"
    if col == schema.terminal_column:
        return "terminal"
    return col.lower()


def _window(days: float) -> str:
    return f"{round(days * _US_PER_DAY)}us"


def _rolling_amounts(
    schema: FraudSchema, key: str, prefix: str, windows: tuple[int, ...]
) -> list[pl.Expr]:
    """Count, sum and mean of amount per key over (t - w, t]; frame must be time-sorted."""
    out = []
    for w in windows:
        cnt = pl.col(_ONE).rolling_sum_by(TS, _window(w), closed="right").over(key)
        tot = pl.col(schema.amount_column).rolling_sum_by(TS, _window(w), closed="right").over(key)
        out += [
            cnt.alias(f"{prefix}_count_{w}d"),
            tot.alias(f"{prefix}_sum_{w}d"),
            (tot / cnt).alias(f"{prefix}_mean_{w}d"),
        ]
    return out


def _card_history(schema: FraudSchema, cfg: FeatureConfig) -> list[pl.Expr]:
    card, amount = schema.card_column, pl.col(schema.amount_column)
    cap_h = cfg.max_gap_days * 24.0
    gap_h = pl.col(TS).diff().over(card).dt.total_microseconds() / 3.6e9
    r = cfg.ratio_window_days
    cnt = pl.col(_ONE).rolling_sum_by(TS, _window(r), closed="right").over(card)
    tot = amount.rolling_sum_by(TS, _window(r), closed="right").over(card)
    others_mean = (tot - amount) / (cnt - 1)
    ratio = pl.when((cnt > 1) & (others_mean > 0)).then(amount / others_mean).otherwise(1.0)
    return [
        gap_h.clip(upper_bound=cap_h).fill_null(cap_h).alias("card_hours_since_prev"),
        ratio.alias(f"card_amount_ratio_{r}d"),
    ]


def delayed_label_rates(
    frame: pl.DataFrame,
    key: str,
    label: str,
    delay_days: float,
    windows_days: tuple[int, ...],
    prefix: str,
) -> pl.DataFrame:
    """Per row: fraud rate and labelled count of ``key``'s transactions in
    ``(t - delay - w, t - delay]``, built from cumulative counts of rows with time <= the
    window edges (an as-of join), so no label after ``t - delay`` is ever read.

    ``frame`` must be sorted by ``_ts`` and have the row-id column ``__idx``; the result has
    ``__idx`` plus ``{prefix}_risk_{w}d`` and ``{prefix}_labelled_{w}d`` per window, in
    ``frame``'s row order. A window with no labelled transaction has rate 0.
    """
    events = (
        frame.group_by([key, TS])
        .agg(
            pl.col(label).sum().cast(pl.Float64).alias("__f"),
            pl.col(label).count().cast(pl.Float64).alias("__n"),
        )
        .sort([TS, key])
        .select(
            key,
            pl.col(TS).alias("__rt"),
            pl.col("__f").cum_sum().over(key).alias("__F"),
            pl.col("__n").cum_sum().over(key).alias("__N"),
        )
    )

    def cumulative_at(offset_days: float) -> pl.DataFrame:
        left = frame.select(
            _IDX,
            key,
            (pl.col(TS) - _days(offset_days)).alias("__q"),
        )
        joined = left.join_asof(
            events,
            left_on="__q",
            right_on="__rt",
            by=key,
            strategy="backward",
            check_sortedness=False,
        )
        return joined.select(pl.col("__F").fill_null(0.0), pl.col("__N").fill_null(0.0))

    hi = cumulative_at(delay_days)
    cols = [frame.get_column(_IDX)]
    for w in windows_days:
        lo = cumulative_at(delay_days + w)
        f = hi["__F"] - lo["__F"]
        n = hi["__N"] - lo["__N"]
        rate = (f / n).fill_nan(0.0).fill_null(0.0)
        rate = pl.select(pl.when(n > 0).then(rate).otherwise(0.0)).to_series()
        cols += [rate.alias(f"{prefix}_risk_{w}d"), n.alias(f"{prefix}_labelled_{w}d")]
    return pl.DataFrame(cols)


def _fraud_times(frame: pl.DataFrame, key: str, label: str) -> pl.DataFrame:
    """``key`` and time (``__ft``) of every fraud, one row per key and time, sorted by time:
    the right side of the as-of joins of the fraud-time features below."""
    frauds = frame.filter(pl.col(label) == 1).select(key, pl.col(TS).alias("__ft"))
    return frauds.unique().sort(["__ft", key])


def _days(days: float) -> pl.Expr:
    """``days`` as a polars duration (microseconds, the frames' time unit)."""
    return pl.duration(microseconds=round(days * _US_PER_DAY))


def delayed_fraud_recency(
    frame: pl.DataFrame, key: str, label: str, delay_days: float, cap_days: float, prefix: str
) -> pl.DataFrame:
    """Per row: days from ``t - delay`` back to ``key``'s last fraud at or before
    ``t - delay`` (``{prefix}_days_since_fraud``), ``cap_days`` when there is none within
    the cap. Labels after ``t - delay`` are never read (an as-of join on fraud times).

    Why, beside the windowed rates: the handbook simulator makes a compromised terminal's
    transactions fraud for 28 days. A terminal whose delayed 7-day rate is 1.0 may still be
    compromised or may have been cleaned days ago; how long ago its last known fraud was
    tells the two apart, which a rate over a fixed window does not. ``frame`` must be
    sorted by ``_ts`` and have ``__idx``; the result is in ``frame``'s row order.
    """
    frauds = _fraud_times(frame, key, label)
    left = frame.select(_IDX, key, (pl.col(TS) - _days(delay_days)).alias("__q"))
    joined = left.join_asof(
        frauds, left_on="__q", right_on="__ft", by=key, strategy="backward", check_sortedness=False
    )
    days = (pl.col("__q") - pl.col("__ft")).dt.total_microseconds() / _US_PER_DAY
    name = f"{prefix}_days_since_fraud"
    return joined.select(
        _IDX, days.fill_null(cap_days).clip(upper_bound=cap_days).cast(pl.Float64).alias(name)
    )


def delayed_fraud_episode(
    frame: pl.DataFrame, key: str, label: str, delay_days: float, lookback_days: float, prefix: str
) -> pl.DataFrame:
    """Per row: days from ``t - delay`` back to ``key``'s FIRST fraud in
    ``[t - delay - lookback, t - delay]`` (``{prefix}_fraud_episode_days``), ``lookback_days``
    when there is none. Labels after ``t - delay`` are never read (a forward as-of join from
    ``t - delay - lookback``, kept only when that fraud is at or before ``t - delay``).

    Why, beside :func:`delayed_fraud_recency`: while a terminal is compromised its last known
    fraud is always about ``delay`` old, and it stays so for ``delay`` days after the
    compromise ends (those labels are not in yet), so recency cannot tell the two apart. How
    long the run of known frauds has gone on can: the handbook simulator compromises a
    terminal for 28 days, so a run known for more than 28 - delay days has ended by ``t``.
    The model learns that length from the training labels; nothing here assumes it.
    ``frame`` must be sorted by ``_ts`` and have ``__idx``; the result is in ``frame``'s
    row order.
    """
    frauds = _fraud_times(frame, key, label)
    left = frame.select(
        _IDX,
        key,
        (pl.col(TS) - _days(delay_days)).alias("__q"),
        (pl.col(TS) - _days(delay_days + lookback_days)).alias("__from"),
    ).sort("__from")
    joined = left.join_asof(
        frauds,
        left_on="__from",
        right_on="__ft",
        by=key,
        strategy="forward",
        check_sortedness=False,
    )
    known = pl.col("__ft") <= pl.col("__q")
    days = (pl.col("__q") - pl.col("__ft")).dt.total_microseconds() / _US_PER_DAY
    name = f"{prefix}_fraud_episode_days"
    value = pl.when(known).then(days).otherwise(None).fill_null(lookback_days)
    return joined.select(_IDX, value.cast(pl.Float64).alias(name)).sort(_IDX)


class FeatureBuilder:
    """Causal per-card / per-terminal features (scikit-learn contract).

    ``fit(frame)`` on the TRAINING rows only learns categorical vocabularies and the fill
    values of numeric columns; ``transform(frame)`` is then run on the whole chronological
    frame (history is needed), and returns the key columns (``_ts``, label, card, terminal,
    amount, id) plus the features, in the input row order.
    """

    def __init__(self, schema: FraudSchema | str, config: FeatureConfig | None = None) -> None:
        self.schema = schema
        self.config = config

    def _resolved(self) -> tuple[FraudSchema, FeatureConfig]:
        schema = self.schema if isinstance(self.schema, FraudSchema) else load_schema(self.schema)
        return schema, self.config or FeatureConfig()

    def _risk_columns(self, schema: FraudSchema, cfg: FeatureConfig) -> tuple[str, ...]:
        if cfg.risk_columns is not None:
            cols = cfg.risk_columns
        else:
            cols = (schema.terminal_column,) if schema.terminal_column else ()
        usable = set(schema.role_columns().values()) | set(schema.categorical_columns)
        usable -= {schema.label_column, schema.time_column, schema.amount_column, schema.id_column}
        for col in cols:
            if col in schema.never_use_columns:
                raise FraudConfigError(f"features.risk_columns: {col!r} is a never_use column")
            if col not in usable:
                raise FraudConfigError(
                    f"features.risk_columns: {col!r} must be the card, terminal or a categorical column"
                )
        return cols

    def _check_frame(self, frame: pl.DataFrame, schema: FraudSchema, for_fit: bool) -> None:
        needed = [TS, schema.amount_column, *schema.feature_source_columns]
        needed += [c for c in (schema.card_column, schema.terminal_column) if c]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise FraudDataError(
                f"feature frame lacks columns {missing} (schema {schema.name!r}); load it with "
                "apps.fraud.readers.load_transactions, which adds the parsed time column '_ts'"
            )
        banned = [c for c in schema.never_use_columns if c in schema.feature_source_columns]
        if banned:
            raise FraudConfigError(f"never_use columns {banned} listed as features")
        if for_fit and frame.height == 0:
            raise FraudDataError("cannot fit features on an empty frame")

    def _names(self, schema: FraudSchema, cfg: FeatureConfig) -> FeatureColumns:
        numeric = ["amount", "amount_log1p", "hour", "is_night"]
        if cfg.calendar_features and schema.has_calendar:
            numeric.append("is_weekend")
        for key, prefix, on in (
            (schema.card_column, "card", cfg.card_features),
            (schema.terminal_column, "terminal", cfg.terminal_features),
        ):
            if key and on:
                numeric += [
                    f"{prefix}_{s}_{w}d" for w in cfg.windows_days for s in ("count", "sum", "mean")
                ]
                if prefix == "card":
                    numeric += [
                        "card_hours_since_prev",
                        f"card_amount_ratio_{cfg.ratio_window_days}d",
                    ]
        for col in self._risk_columns(schema, cfg):
            p = _prefix(schema, col)
            numeric += [
                f"{p}_{s}_{w}d" for w in cfg.risk_windows_days for s in ("risk", "labelled")
            ]
            if cfg.risk_recency:
                numeric.append(f"{p}_days_since_fraud")
            if cfg.risk_episode:
                numeric.append(f"{p}_fraud_episode_days")
        numeric += list(schema.numeric_columns)
        names = numeric + list(schema.categorical_columns)
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise FraudConfigError(
                f"schema {schema.name!r} feature columns {clash} clash with built feature names; rename them"
            )
        return FeatureColumns(numeric=numeric, categorical=list(schema.categorical_columns))

    def fit(self, frame: pl.DataFrame, y: object = None) -> FeatureBuilder:
        schema, cfg = self._resolved()
        self._check_frame(frame, schema, for_fit=True)
        self.vocabularies_ = {
            col: sorted(frame.get_column(col).cast(pl.String).drop_nulls().unique().to_list())
            for col in schema.categorical_columns
        }
        self.cat_cardinalities_ = [
            len(self.vocabularies_[c]) + 1 for c in schema.categorical_columns
        ]
        fills = {}
        for col in schema.numeric_columns:
            s = frame.get_column(col).cast(pl.Float64).fill_nan(None)
            m = s.mean()
            fills[col] = float(m) if m is not None else 0.0
        self.fill_values_ = fills
        self.feature_columns_ = self._names(schema, cfg)
        self.n_features_in_ = len(self.feature_columns_.all)
        self.key_columns_ = [
            c
            for c in (
                TS,
                schema.id_column,
                schema.card_column,
                schema.terminal_column,
                schema.amount_column,
                schema.label_column,
            )
            if c is not None and c in frame.columns
        ]
        return self

    def get_feature_names_out(self) -> list[str]:
        return self.feature_columns_.all

    def transform(self, frame: pl.DataFrame) -> pl.DataFrame:
        if not hasattr(self, "feature_columns_"):
            raise RuntimeError("FeatureBuilder is not fitted; call fit(train_frame) first")
        schema, cfg = self._resolved()
        self._check_frame(frame, schema, for_fit=False)
        label = schema.label_column
        base = frame.with_row_index(_IDX).with_columns(pl.lit(1.0).alias(_ONE))
        if label not in base.columns:
            base = base.with_columns(pl.lit(None, dtype=pl.Int8).alias(label))
        s = base.sort([TS, _IDX])
        amount = pl.col(schema.amount_column)
        hour = pl.col(TS).dt.hour()
        lo_n, hi_n = cfg.night_hours
        night = (hour >= lo_n) | (hour < hi_n) if lo_n > hi_n else (hour >= lo_n) & (hour < hi_n)
        exprs: list[pl.Expr] = [
            amount.alias("amount"),
            amount.clip(lower_bound=0).log1p().alias("amount_log1p"),
            hour.cast(pl.Float64).alias("hour"),
            night.cast(pl.Float64).alias("is_night"),
        ]
        if "is_weekend" in self.feature_columns_.numeric:
            exprs.append((pl.col(TS).dt.weekday() >= 6).cast(pl.Float64).alias("is_weekend"))
        if schema.card_column and cfg.card_features:
            exprs += _rolling_amounts(schema, schema.card_column, "card", cfg.windows_days)
            exprs += _card_history(schema, cfg)
        if schema.terminal_column and cfg.terminal_features:
            exprs += _rolling_amounts(schema, schema.terminal_column, "terminal", cfg.windows_days)
        for col in schema.numeric_columns:
            v = pl.col(col).cast(pl.Float64)
            exprs.append(v.fill_nan(None).fill_null(self.fill_values_[col]).alias(col))
        for col in schema.categorical_columns:
            vocab = self.vocabularies_[col]
            codes = (
                pl.col(col)
                .cast(pl.String)
                .replace_strict(
                    vocab, list(range(1, len(vocab) + 1)), default=0, return_dtype=pl.Int64
                )
            )
            exprs.append(codes.alias(col))
        keys = [pl.col(c) for c in self.key_columns_ if c in s.columns]
        out = s.select(pl.col(_IDX), *keys, *exprs)
        for col in self._risk_columns(schema, cfg):
            rates = delayed_label_rates(
                s, col, label, cfg.label_delay_days, cfg.risk_windows_days, _prefix(schema, col)
            )
            out = out.join(rates, on=_IDX, how="left")
            if cfg.risk_recency:
                recency = delayed_fraud_recency(
                    s, col, label, cfg.label_delay_days, cfg.recency_cap_days, _prefix(schema, col)
                )
                out = out.join(recency, on=_IDX, how="left")
            if cfg.risk_episode:
                episode = delayed_fraud_episode(
                    s,
                    col,
                    label,
                    cfg.label_delay_days,
                    cfg.episode_lookback_days,
                    _prefix(schema, col),
                )
                out = out.join(episode, on=_IDX, how="left")
        out = out.sort(_IDX)
        return out.select(
            *[pl.col(c) for c in self.key_columns_ if c in out.columns], *self.feature_columns_.all
        )

    def fit_transform(self, frame: pl.DataFrame, y: object = None) -> pl.DataFrame:
        """Fit on ``frame`` and transform it: only right when ``frame`` is training data."""
        return self.fit(frame).transform(frame)

    def to_matrices(self, features: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(x_num [n, N] float32, x_cat [n, C] int64)`` in ``feature_columns_`` order."""
        cols = self.feature_columns_
        missing = [c for c in cols.all if c not in features.columns]
        if missing:
            raise FraudDataError(f"feature frame lacks {missing}; pass the output of transform()")
        x_num = features.select(cols.numeric).to_numpy().astype(np.float32, copy=False)
        if cols.categorical:
            x_cat = features.select(cols.categorical).to_numpy().astype(np.int64, copy=False)
        else:
            x_cat = np.zeros((features.height, 0), dtype=np.int64)
        return x_num, x_cat
