"""Time-ordered splits: blocks, delay gap, known-compromised cards, prequential folds."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from apps.fraud.errors import FraudDataError
from apps.fraud.readers import load_transactions
from apps.fraud.schema import TS
from apps.fraud.splits import (
    model_selection_start,
    prequential_folds,
    time_fraction_split,
    train_delay_test_split,
    transaction_days,
)
from tests.apps.fraud.helpers import tiny_schema

D0 = datetime(2020, 3, 2)


def _frame(events: list[tuple[int, int, int]]) -> pl.DataFrame:
    """(day, card, label) -> a loaded-like frame with one transaction per event at noon."""
    return pl.DataFrame(
        {
            TS: [D0 + timedelta(days=d, hours=12) for d, _, _ in events],
            "CUSTOMER_ID": [c for _, c, _ in events],
            "TERMINAL_ID": [1] * len(events),
            "TX_AMOUNT": [1.0] * len(events),
            "TX_FRAUD": pl.Series([y for _, _, y in events], dtype=pl.Int8),
        }
    )


def test_known_compromised_cards_follow_the_handbook_rule():
    # train days 0-1, delay days 2-3, test days 4-6 (relative to the training start).
    events = [(d, c, 0) for d in range(8) for c in (1, 2, 3, 4, 5)]
    events += [(0, 1, 1), (3, 2, 1), (2, 4, 1), (5, 3, 1), (-1, 5, 1)]
    frame = _frame(events)
    split = train_delay_test_split(
        frame, tiny_schema(), D0.date(), train_days=2, delay_days=2, test_days=3
    )
    test = frame[split.test]
    kept = {(r[TS].date() - D0.date()).days: set() for r in test.iter_rows(named=True)}
    for r in test.iter_rows(named=True):
        kept[(r[TS].date() - D0.date()).days].add(r["CUSTOMER_ID"])
    # card 1: fraud on training day 0 -> gone from all test days.
    # card 2: fraud on delay day 3 -> known on test day D when 3 < D - 2, i.e. only day 6.
    # card 4: fraud on delay day 2 -> known from test day 5.
    # card 3: fraud on test day 5 itself -> never known in time; card 5: fraud before training.
    assert kept == {4: {2, 3, 4, 5}, 5: {2, 3, 5}, 6: {3, 5}}
    removed = frame[split.removed]
    assert sorted(set(removed.get_column("CUSTOMER_ID").to_list())) == [1, 2, 4]
    assert len(split.removed) == 3 + 1 + 2  # card 1 on days 4-6, card 2 on day 6, card 4 on 5-6
    no_removal = train_delay_test_split(
        frame,
        tiny_schema(),
        D0.date(),
        train_days=2,
        delay_days=2,
        test_days=3,
        remove_known_compromised=False,
    )
    assert len(no_removal.test) == len(split.test) + len(split.removed)
    assert len(no_removal.removed) == 0


def test_blocks_are_disjoint_ordered_and_separated_by_the_delay(synthetic_small, synthetic_schema):
    _, path = synthetic_small
    frame = load_transactions(path, synthetic_schema)
    split = train_delay_test_split(
        frame, synthetic_schema, "2018-04-10", train_days=7, valid_days=2, delay_days=7, test_days=7
    )
    parts = [split.train, split.valid, split.delay, split.test, split.removed]
    all_idx = np.concatenate(parts)
    assert len(all_idx) == len(np.unique(all_idx))  # no overlap
    days = transaction_days(frame).to_numpy()
    span = lambda idx: (days[idx].min(), days[idx].max())  # noqa: E731
    assert span(split.train) == (date(2018, 4, 10), date(2018, 4, 14))
    assert span(split.valid) == (date(2018, 4, 15), date(2018, 4, 16))
    assert span(split.delay) == (date(2018, 4, 17), date(2018, 4, 23))
    assert span(split.test) == (date(2018, 4, 24), date(2018, 4, 30))
    ts = frame.get_column(TS).to_numpy()
    assert ts[split.train].max() < ts[split.valid].min() < ts[split.test].min()
    assert (ts[split.test].min() - ts[split.valid].max()) > np.timedelta64(7, "D")
    # Every kept test row's card had no fraud known by its day; every removed one had.
    cards, y = frame.get_column("CUSTOMER_ID").to_numpy(), frame.get_column("TX_FRAUD").to_numpy()
    start = np.datetime64("2018-04-10")
    rel = (days.astype("datetime64[D]") - start).astype(int)
    for idx, expect in ((split.test, False), (split.removed, True)):
        for i in idx:
            known = (cards == cards[i]) & (y == 1) & (rel >= 0) & (rel < rel[i] - 7)
            assert known.any() == expect
    assert len(split.removed) > 0


def test_prequential_folds_move_back_in_time(synthetic_small, synthetic_schema):
    _, path = synthetic_small
    frame = load_transactions(path, synthetic_schema)  # 2018-04-01 .. 2018-05-10
    test_train_start = date(2018, 4, 20)  # test split: train 04-20.., delay 04-27.., test 05-04..
    start = model_selection_start(test_train_start, delay_days=7, assess_days=7)
    assert start == date(2018, 4, 6)
    train_end = test_train_start + timedelta(days=7)
    folds = prequential_folds(frame, synthetic_schema, start, n_folds=2, must_end_by=train_end)
    assert [f.bounds["test"] for f in folds] == [
        (date(2018, 4, 20), date(2018, 4, 27)),
        (date(2018, 4, 13), date(2018, 4, 20)),
    ]
    for f in folds:
        assert f.bounds["train"][1] + timedelta(days=7) == f.bounds["test"][0]
        assert len(f.train) > 0 and len(f.test) > 0
    with pytest.raises(FraudDataError, match="past must_end_by"):
        prequential_folds(frame, synthetic_schema, start, n_folds=1, must_end_by=test_train_start)
    with pytest.raises(FraudDataError, match="prequential fold 2 .*no training rows"):
        prequential_folds(frame, synthetic_schema, start, n_folds=3)


def test_time_fraction_split_carves_validation_from_the_end_of_training():
    times = [D0 + timedelta(hours=h) for h in range(101)]  # range 100 h
    frame = pl.DataFrame({TS: times, "Class": pl.Series([0, 1] * 50 + [0], dtype=pl.Int8)})
    split = time_fraction_split(frame, train_frac=0.7, valid_frac=0.2)
    hours = lambda idx: [int(i) for i in idx]  # noqa: E731  (row i is hour i)
    assert hours(split.test) == list(range(70, 101))
    assert hours(split.valid) == list(range(56, 70))  # last 20 % of the 70 training hours
    assert hours(split.train) == list(range(0, 56))
    assert len(split.delay) == 0


def test_empty_blocks_raise_with_the_data_range(synthetic_small, synthetic_schema):
    _, path = synthetic_small
    frame = load_transactions(path, synthetic_schema)
    with pytest.raises(
        FraudDataError, match=r"no test rows; the data covers 2018-04-01\.\.2018-05-10"
    ):
        train_delay_test_split(frame, synthetic_schema, "2018-05-01")
    with pytest.raises(FraudDataError, match="valid_days"):
        train_delay_test_split(frame, synthetic_schema, "2018-04-01", train_days=3, valid_days=3)


@pytest.mark.shared_data
def test_ulb_time_split_proportions():
    from apps.fraud.readers import load_dataset
    from tests.shared import require_shared_data

    require_shared_data("fraud/ulb-creditcard/creditcard.parquet")
    frame, _ = load_dataset("ulb", columns=[])
    split = time_fraction_split(frame, train_frac=0.7, valid_frac=0.2)
    t = frame.get_column("Time").to_numpy()
    assert t[split.test].min() >= 0.7 * 172_792 > t[split.valid].max()
    assert t[split.valid].min() >= 0.56 * 172_792 > t[split.train].max()
    assert len(split.train) + len(split.valid) + len(split.test) == 284_807
    y = frame.get_column("Class").to_numpy()
    assert y[split.test].sum() > 50 and y[split.valid].sum() > 20


@pytest.mark.shared_data
def test_handbook_split_sizes_match_the_handbook():
    """The handbook's baseline split (train from 2018-07-25, 7/7/7 days) reports 67,240
    training and 58,264 test transactions after removing known-compromised cards."""
    from apps.fraud.readers import load_dataset
    from tests.shared import require_shared_data

    require_shared_data("fraud/handbook-simulated/transactions.parquet")
    frame, schema = load_dataset("handbook", columns=[])
    split = train_delay_test_split(frame, schema, "2018-07-25")
    assert len(split.train) == 67_240
    assert len(split.test) == 58_264
    assert split.bounds["test"] == (date(2018, 8, 8), date(2018, 8, 15))
