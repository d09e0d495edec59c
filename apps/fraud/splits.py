"""Time-ordered evaluation splits (never random: fraud patterns drift and cards repeat).

* :func:`train_delay_test_split`: the handbook protocol. A block of training days, a block
  of delay days (their labels are not known yet when the model is trained, so they are
  used neither to train nor to test), then test days. A card with a fraud whose label is
  known by a test day (fraud on a day ``< test_day - delay_days``, counted from the start
  of training) is removed from that test day, as the handbook does: such a card is
  already blocked in production, so scoring it would inflate the metric.
* :func:`prequential_folds`: the same blocks moved back in time by ``assess_days`` per
  fold, for model selection (hyper-parameters, thresholds) without touching test days.
* :func:`time_fraction_split`: for sets without card ids or calendar (ULB): the first
  ``train_frac`` of the time range trains, the rest tests; a validation slice is carved
  from the END of the training part for threshold / hyper-parameter choice.

Splits are row indices into the given frame (which needs the ``_ts`` column the readers
add); days are calendar days of ``_ts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl

from apps.fraud.errors import FraudDataError
from apps.fraud.schema import TS, FraudSchema

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class TimeSplit:
    """Row indices of one time-ordered split. ``removed``: test-period rows dropped as
    known-compromised cards; ``bounds``: name -> (first day/time, end exclusive)."""

    train: np.ndarray
    valid: np.ndarray
    delay: np.ndarray
    test: np.ndarray
    removed: np.ndarray
    protocol: str
    bounds: dict[str, tuple[object, object]] = field(default_factory=dict)


def _ts(frame: pl.DataFrame) -> pl.Series:
    if TS not in frame.columns:
        raise FraudDataError(
            f"split frame lacks the time column {TS!r}; load it with apps.fraud.readers.load_transactions"
        )
    return frame.get_column(TS)


def transaction_days(frame: pl.DataFrame) -> pl.Series:
    """Calendar day (``Date``) of each transaction: the 'day' of per-day metrics."""
    return _ts(frame).dt.date()


def _as_day(start: date | datetime | str | int, first_day: date) -> date:
    if isinstance(start, bool):
        raise TypeError("train_start must be a date, ISO string or day offset")
    if isinstance(start, int):
        return first_day + timedelta(days=start)
    if isinstance(start, datetime):
        return start.date()
    if isinstance(start, date):
        return start
    return date.fromisoformat(str(start)[:10])


def _idx(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int64)


def train_delay_test_split(
    frame: pl.DataFrame,
    schema: FraudSchema,
    train_start: date | datetime | str | int,
    *,
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
    valid_days: int = 0,
    remove_known_compromised: bool | None = None,
) -> TimeSplit:
    """Handbook blocks: train ``[s, s+train)``, delay, test ``[s+train+delay, +test_days)``.

    ``train_start``: a date, ISO string, or int (days after the first transaction's day).
    ``valid_days > 0`` carves the last ``valid_days`` of the training block into a
    validation block (early stopping, thresholds). ``remove_known_compromised`` (default:
    when the schema has a card column) drops, on test day ``D``, every card with a fraud on
    a day in ``[s, D - delay_days)``: the handbook's known-compromised rule.
    """
    if min(train_days, test_days) < 1 or delay_days < 0 or not 0 <= valid_days < train_days:
        raise FraudDataError(
            f"need train_days >= 1, test_days >= 1, delay_days >= 0, 0 <= valid_days < train_days;"
            f" got {train_days}, {test_days}, {delay_days}, {valid_days}"
        )
    days = transaction_days(frame)
    first, last = days.min(), days.max()
    start = _as_day(train_start, first)
    rel = days.cast(pl.Int64).to_numpy() - (start - date(1970, 1, 1)).days
    t0 = train_days + delay_days
    in_train = (rel >= 0) & (rel < train_days - valid_days)
    in_valid = (rel >= train_days - valid_days) & (rel < train_days)
    in_delay = (rel >= train_days) & (rel < t0)
    in_test = (rel >= t0) & (rel < t0 + test_days)
    end = start + timedelta(days=t0 + test_days)
    if not in_train.any() or not in_test.any():
        raise FraudDataError(
            f"split train {start}..{start + timedelta(days=train_days)} / test "
            f"{start + timedelta(days=t0)}..{end} (end exclusive) has no "
            f"{'training' if not in_train.any() else 'test'} rows; the data covers {first}..{last}"
        )
    if remove_known_compromised is None:
        remove_known_compromised = schema.card_column is not None
    removed = np.zeros(len(rel), dtype=bool)
    if remove_known_compromised:
        if schema.card_column is None:
            raise FraudDataError(
                f"schema {schema.name!r} has no card column: cannot remove known-compromised cards"
            )
        label = frame.get_column(schema.label_column).to_numpy()
        cards = frame.get_column(schema.card_column)
        fraud_days = (
            pl.DataFrame({"c": cards, "d": rel, "y": label})
            .filter((pl.col("y") == 1) & (pl.col("d") >= 0))
            .group_by("c")
            .agg(pl.col("d").min().alias("first"))
        )
        first_fraud = (
            pl.DataFrame({"c": cards})
            .join(fraud_days, on="c", how="left", maintain_order="left")
            .get_column("first")
            .fill_null(np.iinfo(np.int64).max)
            .to_numpy()
        )
        removed = in_test & (first_fraud < rel - delay_days)
    bounds = {
        "train": (start, start + timedelta(days=train_days - valid_days)),
        "valid": (
            start + timedelta(days=train_days - valid_days),
            start + timedelta(days=train_days),
        ),
        "delay": (start + timedelta(days=train_days), start + timedelta(days=t0)),
        "test": (start + timedelta(days=t0), end),
    }
    return TimeSplit(
        train=_idx(in_train),
        valid=_idx(in_valid),
        delay=_idx(in_delay),
        test=_idx(in_test & ~removed),
        removed=_idx(removed),
        protocol=(
            f"train {train_days - valid_days}d + valid {valid_days}d / delay {delay_days}d / "
            f"test {test_days}d from {start}; known-compromised cards removed from test days: "
            f"{bool(remove_known_compromised)}"
        ),
        bounds=bounds,
    )


def model_selection_start(
    train_start: date | datetime | str, *, delay_days: int = 7, assess_days: int = 7
) -> date:
    """Training start of the latest prequential fold for a test split that trains from
    ``train_start`` (handbook: ``train_start - (delay + assess)`` days), so that validation
    folds assess only days before the test split's training ends."""
    if isinstance(train_start, int):
        raise TypeError("model_selection_start needs a date, datetime or ISO string")
    return _as_day(train_start, date.min) - timedelta(days=delay_days + assess_days)


def prequential_folds(
    frame: pl.DataFrame,
    schema: FraudSchema,
    start: date | datetime | str | int,
    *,
    n_folds: int = 4,
    train_days: int = 7,
    delay_days: int = 7,
    assess_days: int = 7,
    remove_known_compromised: bool | None = None,
    must_end_by: date | datetime | str | None = None,
) -> list[TimeSplit]:
    """Prequential validation: fold ``i`` is a train/delay/assess split whose training starts
    ``i * assess_days`` before ``start`` (rolling blocks moving back in time; the assessment
    blocks tile the ``n_folds * assess_days`` days before the latest fold's end).

    ``must_end_by``: raise if any assessment block reaches this day (pass the test split's
    first delay day to prove model selection never sees test-period data).
    """
    if n_folds < 1:
        raise FraudDataError(f"n_folds must be >= 1, got {n_folds}")
    first = transaction_days(frame).min()
    s0 = _as_day(start, first)
    folds = []
    for i in range(n_folds):
        s = s0 - timedelta(days=i * assess_days)
        try:
            split = train_delay_test_split(
                frame,
                schema,
                s,
                train_days=train_days,
                delay_days=delay_days,
                test_days=assess_days,
                remove_known_compromised=remove_known_compromised,
            )
        except FraudDataError as err:
            raise FraudDataError(f"prequential fold {i} (train from {s}): {err}") from None
        end = split.bounds["test"][1]
        if must_end_by is not None and end > _as_day(must_end_by, first):
            raise FraudDataError(
                f"prequential fold {i} assesses days up to {end} (exclusive), past must_end_by {must_end_by}"
            )
        folds.append(split)
    return folds


def time_fraction_split(
    frame: pl.DataFrame,
    *,
    train_frac: float = 0.7,
    valid_frac: float = 0.2,
    test_end_frac: float = 1.0,
) -> TimeSplit:
    """ULB protocol: times before ``t_min + train_frac * range`` train, the rest test; the last
    ``valid_frac`` of the training time range is the validation slice (no delay block).
    ``test_end_frac < 1`` ends the test part at ``t_min + test_end_frac * range`` (exclusive):
    a prequential fold that assesses a slice before the real test part."""
    if not 0 < train_frac < test_end_frac <= 1 or not 0 <= valid_frac < 1:
        raise FraudDataError(
            "need 0 < train_frac < test_end_frac <= 1 and 0 <= valid_frac < 1, got "
            f"train_frac={train_frac}, test_end_frac={test_end_frac}, valid_frac={valid_frac}"
        )
    ts = _ts(frame)
    t_min, t_max = ts.min(), ts.max()
    cut = t_min + (t_max - t_min) * train_frac
    vcut = t_min + (cut - t_min) * (1 - valid_frac)
    t = ts.to_numpy()
    cut_np, vcut_np = np.datetime64(cut, "us"), np.datetime64(vcut, "us")
    train, valid, test = t < vcut_np, (t >= vcut_np) & (t < cut_np), t >= cut_np
    end = t_max
    if test_end_frac < 1:
        end = t_min + (t_max - t_min) * test_end_frac
        test &= t < np.datetime64(end, "us")
    if not train.any() or not test.any():
        raise FraudDataError(f"time split at {cut} leaves an empty train or test part")
    tail = "the rest tests" if test_end_frac >= 1 else f"up to {test_end_frac:.0%} of it tests"
    return TimeSplit(
        train=_idx(train),
        valid=_idx(valid),
        delay=_EMPTY,
        test=_idx(test),
        removed=_EMPTY,
        protocol=(
            f"time split: first {train_frac:.0%} of the time range trains (its last "
            f"{valid_frac:.0%} validates), {tail}"
        ),
        bounds={"train": (t_min, vcut), "valid": (vcut, cut), "test": (cut, end)},
    )
