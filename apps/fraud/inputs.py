"""Model inputs from transactions: scaled feature matrices plus each card's recent history.

Train and serve go through the same two steps, so a served score is computed exactly as
the evaluated one:

1. :func:`canonical_frame` turns a typed polars frame (from ``readers.load_transactions``
   or from the predictor's row validation) into one layout: card / terminal ids as
   strings, amount and numeric columns Float64, categoricals String, ``_ts``.
2. :class:`InputBuilder` (fit on TRAINING rows only) runs the causal
   ``FeatureBuilder``, scales numeric features (``log1p`` for non-negative columns, then
   standardise with training mean/std, clip to +-8) and builds the card-history sequence:
   for each transaction the ``history_len`` most recent EARLIER transactions of the same
   card (strictly earlier timestamp; ties are not history), described by their features
   only (amount, time gap, hour, same terminal / same category as now), never by labels.
   Short histories are padded and the padding mask marks them.

All fitted state is plain JSON (:meth:`InputBuilder.state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from apps.fraud.errors import FraudDataError
from apps.fraud.features import FeatureBuilder, FeatureColumns, FeatureConfig
from apps.fraud.schema import TS, FraudSchema

CLIP = 8.0


def canonical_frame(frame: pl.DataFrame, schema: FraudSchema) -> pl.DataFrame:
    """Same column types whatever the source: ids -> String, numbers -> Float64."""
    exprs = []
    for col in frame.columns:
        c = pl.col(col)
        if col in (schema.card_column, schema.terminal_column, schema.id_column):
            exprs.append(c.cast(pl.String))
        elif col == schema.amount_column or col in schema.numeric_columns:
            exprs.append(c.cast(pl.Float64))
        elif col in schema.categorical_columns:
            exprs.append(c.cast(pl.String))
        elif col == TS:
            exprs.append(c.cast(pl.Datetime("us")))
        else:
            exprs.append(c)
    return frame.select(exprs)


@dataclass
class Scaler:
    """Per-column ``log1p`` flag, mean and std (fitted on training rows)."""

    log: list[bool]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, x_NF: np.ndarray) -> Scaler:
        x = x_NF.astype(np.float64)
        log = [bool(np.nanmin(col) >= 0) if np.isfinite(col).any() else False for col in x.T]
        z = _apply_log(x, log)
        mean = np.nanmean(z, axis=0) if len(z) else np.zeros(x.shape[1])
        std = np.nanstd(z, axis=0) if len(z) else np.ones(x.shape[1])
        mean = np.nan_to_num(mean)
        std = np.where(np.isfinite(std) & (std > 1e-9), std, 1.0)
        return cls(log, [float(v) for v in mean], [float(v) for v in std])

    def transform(self, x_NF: np.ndarray) -> np.ndarray:
        z = _apply_log(x_NF.astype(np.float64), self.log)
        z = (z - np.asarray(self.mean)) / np.asarray(self.std)
        return np.clip(z, -CLIP, CLIP).astype(np.float32)


def _apply_log(x: np.ndarray, log: list[bool]) -> np.ndarray:
    out = x.copy()
    cols = np.flatnonzero(log)
    if len(cols):
        out[:, cols] = np.log1p(np.clip(out[:, cols], 0, None))
    return out


def history_feature_names(schema: FraudSchema) -> list[str]:
    names = ["hist_log_amount", "hist_log_amount_vs_now", "hist_log_gap_h", "hist_hour_sin"]
    names.append("hist_hour_cos")
    if schema.terminal_column:
        names.append("hist_same_terminal")
    names += [f"hist_same_{c}" for c in schema.categorical_columns]
    return names


def card_history(
    frame: pl.DataFrame, schema: FraudSchema, history_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(hist_NHF float32, pad_NH bool)`` in ``frame``'s row order (True = padding).

    Lag ``k`` (1..H) of row i is the k-th most recent transaction of i's card with a time
    strictly before i's; only feature columns are read, never the label.
    """
    n, H = frame.height, history_len
    F = len(history_feature_names(schema))
    if schema.card_column is None or H == 0 or n == 0:
        return np.zeros((n, H, F), np.float32), np.ones((n, H), bool)
    card = frame.get_column(schema.card_column).cast(pl.String).fill_null("").to_numpy()
    ts = frame.get_column(TS).cast(pl.Int64).to_numpy()
    _, card_code = np.unique(card.astype(str), return_inverse=True)
    order = np.lexsort((np.arange(n), ts, card_code))
    c_s, t_s = card_code[order], ts[order]
    new_group = np.r_[True, c_s[1:] != c_s[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    new_tie = new_group | np.r_[True, t_s[1:] != t_s[:-1]]
    first_same = np.maximum.accumulate(np.where(new_tie, np.arange(n), 0))

    amount = frame.get_column(schema.amount_column).cast(pl.Float64).to_numpy()[order]
    log_amt = np.log1p(np.clip(np.nan_to_num(amount), 0, None))
    hour = (t_s // 1_000_000 % 86_400) / 3600.0
    same_cols = []
    for col in [schema.terminal_column, *schema.categorical_columns]:
        if col:
            v = frame.get_column(col).cast(pl.String).fill_null("\0").to_numpy().astype(str)
            same_cols.append(v[order])

    hist = np.zeros((n, H, F), np.float32)
    pad = np.ones((n, H), bool)
    rows = np.arange(n)
    for k in range(1, H + 1):
        q = first_same - k
        ok = q >= group_start
        i, j = rows[ok], q[ok]
        gap_h = (t_s[i] - t_s[j]) / 3.6e9
        feats = [
            log_amt[j] / 5.0,
            (log_amt[j] - log_amt[i]) / 2.0,
            np.log1p(gap_h) / 5.0,
            np.sin(2 * math.pi * hour[j] / 24),
            np.cos(2 * math.pi * hour[j] / 24),
        ]
        feats += [(v[j] == v[i]).astype(np.float64) for v in same_cols]
        hist[i, k - 1] = np.stack(feats, axis=1)
        pad[i, k - 1] = False
    out_hist = np.empty_like(hist)
    out_pad = np.empty_like(pad)
    out_hist[order], out_pad[order] = hist, pad
    return out_hist, out_pad


@dataclass
class ModelInputs:
    """Arrays for the model and the baseline, one row per transaction of the frame."""

    features: pl.DataFrame  # key columns + raw (unscaled) features, FeatureBuilder output
    x_raw: np.ndarray  # [N, F] unscaled numeric features (LightGBM reads these)
    x_num: np.ndarray  # [N, F] scaled numeric features (the backbone reads these)
    x_cat: np.ndarray  # [N, C]
    hist: np.ndarray  # [N, H, Fh]
    hist_pad: np.ndarray  # [N, H] True = padding

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "x_num": self.x_num[idx],
            "x_cat": self.x_cat[idx],
            "hist": self.hist[idx],
            "hist_pad": self.hist_pad[idx],
        }


class InputBuilder:
    """FeatureBuilder + scaling + card history, fitted on training rows (JSON state)."""

    def __init__(self, schema: FraudSchema, features: FeatureConfig, history_len: int) -> None:
        self.schema = schema
        self.features_config = features
        self.history_len = history_len if schema.card_column else 0

    def fit(
        self,
        train_frame: pl.DataFrame,
        context: pl.DataFrame | None = None,
        train_rows: np.ndarray | None = None,
    ) -> InputBuilder:
        """Fit vocabularies/fills on ``train_frame``. Scaling is fitted on the training rows'
        features; pass the chronological ``context`` frame and the ``train_rows`` indices
        into it so those features see the history they will see in production."""
        self.builder_ = FeatureBuilder(self.schema, self.features_config).fit(train_frame)
        if context is None:
            context, train_rows = train_frame, np.arange(train_frame.height)
        feats = self.builder_.transform(context)
        x_raw, _ = self.builder_.to_matrices(feats)
        self.scaler_ = Scaler.fit(x_raw[train_rows])
        self.fitted_inputs_ = self._assemble(context, feats)
        return self

    @property
    def feature_columns(self) -> FeatureColumns:
        return self.builder_.feature_columns_

    @property
    def cat_cardinalities(self) -> list[int]:
        return list(self.builder_.cat_cardinalities_)

    @property
    def n_hist_features(self) -> int:
        return len(history_feature_names(self.schema))

    def transform(self, frame: pl.DataFrame) -> ModelInputs:
        if not hasattr(self, "builder_"):
            raise RuntimeError("InputBuilder is not fitted")
        return self._assemble(frame, self.builder_.transform(frame))

    def _assemble(self, frame: pl.DataFrame, feats: pl.DataFrame) -> ModelInputs:
        x_raw, x_cat = self.builder_.to_matrices(feats)
        hist, pad = card_history(frame, self.schema, self.history_len)
        return ModelInputs(feats, x_raw, self.scaler_.transform(x_raw), x_cat, hist, pad)

    # ------------------------------------------------------------------ plain-file state
    def state_dict(self) -> dict[str, Any]:
        b = self.builder_
        return {
            "schema": self.schema.to_dict(),
            "features": self.features_config.to_dict(),
            "history_len": self.history_len,
            "vocabularies": b.vocabularies_,
            "fill_values": b.fill_values_,
            "numeric": b.feature_columns_.numeric,
            "categorical": b.feature_columns_.categorical,
            "key_columns": b.key_columns_,
            "scaler": {"log": self.scaler_.log, "mean": self.scaler_.mean, "std": self.scaler_.std},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> InputBuilder:
        schema = FraudSchema.from_dict(state["schema"])
        feats = FeatureConfig.from_dict(state["features"])
        self = cls(schema, feats, int(state["history_len"]))
        b = FeatureBuilder(schema, feats)
        b.vocabularies_ = {k: list(v) for k, v in state["vocabularies"].items()}
        b.cat_cardinalities_ = [len(b.vocabularies_[c]) + 1 for c in schema.categorical_columns]
        b.fill_values_ = {k: float(v) for k, v in state["fill_values"].items()}
        b.feature_columns_ = FeatureColumns(list(state["numeric"]), list(state["categorical"]))
        b.n_features_in_ = len(b.feature_columns_.all)
        b.key_columns_ = list(state["key_columns"])
        if b.feature_columns_ != b._names(schema, feats):
            raise FraudDataError("saved feature columns do not match the schema and feature config")
        self.builder_ = b
        sc = state["scaler"]
        self.scaler_ = Scaler(list(sc["log"]), list(sc["mean"]), list(sc["std"]))
        return self
