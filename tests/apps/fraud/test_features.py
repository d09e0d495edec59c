"""Causal features: exact numbers on a hand-built frame, causality, label-delay leakage."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from apps.fraud.errors import FraudConfigError, FraudDataError
from apps.fraud.features import FeatureBuilder, FeatureConfig
from apps.fraud.readers import load_transactions
from apps.fraud.schema import TS, FraudSchema
from tests.apps.fraud.helpers import tiny_schema, write_csv

# (time, card, terminal, amount, label, channel); 2020-01-01 is a Wednesday, 01-11 a Saturday.
ROWS = [
    ("2020-01-01 00:00:00", 1, 10, 10.0, 0, "a"),
    ("2020-01-01 12:00:00", 1, 20, 20.0, 0, "b"),
    ("2020-01-01 12:00:00", 2, 10, 5.0, 1, "a"),
    ("2020-01-02 00:00:00", 1, 10, 40.0, 0, "b"),
    ("2020-01-02 06:00:00", 2, 10, 7.0, 0, "a"),
    ("2020-01-09 00:00:00", 1, 10, 100.0, 1, "a"),
    ("2020-01-11 23:30:00", 2, 20, 3.0, 0, "c"),
]
CFG = FeatureConfig(windows_days=(1, 7, 30), label_delay_days=1.0, risk_windows_days=(1, 7))


def _flip(where: pl.Expr) -> pl.Expr:
    """The label column with 0 <-> 1 swapped where ``where`` holds."""
    y = pl.col("TX_FRAUD")
    return pl.when(where).then(1 - y).otherwise(y).cast(pl.Int8).alias("TX_FRAUD")


def _tiny(tmp_path) -> tuple[pl.DataFrame, FraudSchema]:
    rows = {
        "TRANSACTION_ID": [str(i) for i in range(len(ROWS))],
        "TX_DATETIME": [r[0] for r in ROWS],
        "CUSTOMER_ID": [str(r[1]) for r in ROWS],
        "TERMINAL_ID": [str(r[2]) for r in ROWS],
        "TX_AMOUNT": [str(r[3]) for r in ROWS],
        "TX_FRAUD": [str(r[4]) for r in ROWS],
        "CHANNEL": [r[5] for r in ROWS],
    }
    schema = tiny_schema(numeric_columns=(), never_use_columns=())
    return load_transactions(write_csv(tmp_path, rows), schema), schema


def test_exact_rolling_numbers_on_a_hand_built_frame(tmp_path):
    frame, schema = _tiny(tmp_path)
    fb = FeatureBuilder(schema, CFG).fit(frame.head(5))  # vocabulary from the first rows only
    out = fb.transform(frame)
    col = lambda name: out.get_column(name).to_list()  # noqa: E731

    # Card windows are (t - w, t]: a transaction exactly w before is out, ties are in.
    assert col("card_count_1d") == [1, 2, 1, 2, 2, 1, 1]
    assert col("card_sum_1d") == [10, 30, 5, 60, 12, 100, 3]
    assert col("card_mean_1d") == [10, 15, 5, 30, 6, 100, 3]
    assert col("card_count_7d") == [1, 2, 1, 3, 2, 1, 1]
    assert col("card_sum_7d") == [10, 30, 5, 70, 12, 100, 3]
    assert col("card_count_30d") == [1, 2, 1, 3, 2, 4, 3]
    assert col("card_sum_30d") == [10, 30, 5, 70, 12, 170, 15]
    assert col("card_hours_since_prev") == [720, 12, 720, 12, 18, 168, 233.5]
    assert col("card_amount_ratio_30d") == pytest.approx(
        [1, 2, 1, 40 / 15, 1.4, 100 / (70 / 3), 0.5]
    )
    # Terminal 10: rows 0, 2, 3, 4, 5; terminal 20: rows 1, 6.
    assert col("terminal_count_1d") == [1, 1, 2, 2, 3, 1, 1]
    assert col("terminal_sum_1d") == [10, 20, 15, 45, 52, 100, 3]
    assert col("terminal_count_7d") == [1, 1, 2, 3, 4, 2, 1]
    assert col("terminal_sum_7d") == [10, 20, 15, 55, 62, 107, 3]
    assert col("terminal_sum_30d") == [10, 20, 15, 55, 62, 162, 23]
    # Delayed terminal risk, delay 1 day: window (t - 1d - w, t - 1d].
    assert col("terminal_labelled_1d") == [0, 0, 0, 1, 1, 0, 0]
    assert col("terminal_labelled_7d") == [0, 0, 0, 1, 1, 3, 0]
    assert col("terminal_risk_7d") == pytest.approx([0, 0, 0, 0, 0, 1 / 3, 0])
    # Calendar features.
    assert col("hour") == [0, 12, 12, 0, 6, 0, 23]
    assert col("is_night") == [1, 0, 0, 1, 0, 1, 1]
    assert col("is_weekend") == [0, 0, 0, 0, 0, 0, 1]
    assert col("amount_log1p") == pytest.approx(np.log1p([r[3] for r in ROWS]).tolist())
    # Categorical codes: vocabulary {a: 1, b: 2} learned on the fit rows; unseen 'c' -> 0.
    assert col("CHANNEL") == [1, 2, 1, 2, 1, 1, 0]
    assert fb.cat_cardinalities_ == [3]


def test_output_keeps_input_row_order_and_matrices_match(tmp_path):
    frame, schema = _tiny(tmp_path)
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=1)
    fb = FeatureBuilder(schema, CFG).fit(frame)
    out = fb.transform(shuffled)
    assert (
        out.get_column("TRANSACTION_ID").to_list()
        == shuffled.get_column("TRANSACTION_ID").to_list()
    )
    ref = fb.transform(frame).sort("TRANSACTION_ID")
    assert out.sort("TRANSACTION_ID").equals(ref)
    x_num, x_cat = fb.to_matrices(out)
    assert x_num.dtype == np.float32 and x_cat.dtype == np.int64
    assert x_num.shape == (7, len(fb.feature_columns_.numeric))
    assert x_cat.shape == (7, 1)
    assert fb.feature_columns_.categorical == ["CHANNEL"]
    assert "TX_FRAUD" not in fb.feature_columns_.all and TS not in fb.feature_columns_.all
    assert np.isfinite(x_num).all()


def test_features_are_causal(synthetic_small, synthetic_schema):
    """Changing or adding transactions after time C leaves every feature at t <= C unchanged."""
    _, path = synthetic_small
    frame = load_transactions(path, synthetic_schema)
    fb = FeatureBuilder(synthetic_schema).fit(frame)
    base = fb.transform(frame)
    cut = frame.get_column(TS).min() + timedelta(days=20)
    future = pl.col(TS) > cut
    extra = (
        frame.filter(future)
        .head(500)
        .with_columns(pl.col("TRANSACTION_ID") + 10_000_000, pl.col(TS) - timedelta(seconds=1))
    )
    changed = pl.concat(
        [
            frame.with_columns(
                pl.when(future)
                .then(pl.col("TX_AMOUNT") * 7 + 1)
                .otherwise(pl.col("TX_AMOUNT"))
                .alias("TX_AMOUNT"),
                _flip(future),
            ),
            extra,
        ]
    ).sort(TS)
    after = fb.transform(changed)
    past_ids = frame.filter(~future).get_column("TRANSACTION_ID")
    left = base.filter(pl.col("TRANSACTION_ID").is_in(past_ids.implode())).sort("TRANSACTION_ID")
    right = after.filter(pl.col("TRANSACTION_ID").is_in(past_ids.implode())).sort("TRANSACTION_ID")
    assert left.height == past_ids.len() > 1000
    assert left.equals(right)
    # Not vacuous: later rows do change.
    fut = base.filter(future).sort("TRANSACTION_ID")
    fut_after = after.filter(
        pl.col("TRANSACTION_ID").is_in(fut.get_column("TRANSACTION_ID").implode())
    )
    assert not fut.equals(fut_after.sort("TRANSACTION_ID"))


@pytest.mark.parametrize(
    ("flag", "size_field", "column"),
    [
        ("risk_recency", "recency_cap_days", "terminal_days_since_fraud"),
        ("risk_episode", "episode_lookback_days", "terminal_fraud_episode_days"),
    ],
)
def test_fraud_time_features_on_a_hand_built_frame(tmp_path, flag, size_field, column):
    """Terminal 10's frauds are rows 2 (01-01 12:00) and 5 (01-09); delay 1 day. Only row 5
    knows one: at 01-08 00:00 it was 6.5 days earlier (the last and the first known fraud
    are the same one here). Row 5's own fraud and row 3's view (01-01 00:00, before the
    12:00 fraud) stay unseen; none within the cap / lookback = the cap / lookback."""
    frame, schema = _tiny(tmp_path)
    for size, want5 in ((60.0, 6.5), (5.0, 5.0)):
        cfg = FeatureConfig(
            windows_days=(1,),
            label_delay_days=1.0,
            risk_windows_days=(1, 7),
            **{flag: True, size_field: size},
        )
        fb = FeatureBuilder(schema, cfg).fit(frame)
        assert column in fb.feature_columns_.numeric
        got = fb.transform(frame).get_column(column).to_list()
        assert got == pytest.approx([size] * 5 + [want5, size])
        assert cfg.history_days() >= 1.0 + size
    assert column not in FeatureBuilder(schema, CFG).fit(frame).feature_columns_.numeric
    with pytest.raises(FraudConfigError, match=size_field):
        FeatureConfig(**{size_field: 0})


def test_fraud_episode_days_match_a_readable_reference(synthetic_small, synthetic_schema):
    """The first fraud in [t - delay - lookback, t - delay] of the row's terminal, by a plain
    loop over every fraud, against the as-of join, on the synthetic sample's rows."""
    _, path = synthetic_small
    frame = load_transactions(path, synthetic_schema)
    delay, lookback = 7.0, 30.0
    cfg = FeatureConfig(
        label_delay_days=delay, risk_episode=True, risk_recency=True, episode_lookback_days=lookback
    )
    out = FeatureBuilder(synthetic_schema, cfg).fit(frame).transform(frame)
    term, label = synthetic_schema.terminal_column, synthetic_schema.label_column
    ts, keys, y = (frame.get_column(c).to_list() for c in (TS, term, label))
    fraud_times: dict = {}
    for t, k, lab in zip(ts, keys, y, strict=True):
        if lab == 1:
            fraud_times.setdefault(k, []).append(t)
    got = out.get_column("terminal_fraud_episode_days").to_list()
    since = out.get_column("terminal_days_since_fraud").to_list()
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ts), 400, replace=False)
    found = 0
    for i in map(int, rows):
        q = ts[i] - timedelta(days=delay)
        window = [f for f in fraud_times.get(keys[i], []) if q - timedelta(days=lookback) <= f <= q]
        want = (q - min(window)).total_seconds() / 86400 if window else lookback
        found += bool(window)
        assert got[i] == pytest.approx(want, abs=1e-6), (i, ts[i], keys[i])
        assert got[i] >= min(since[i], lookback) - 1e-9  # the first fraud is never after the last
    assert found > 20  # not vacuous: many rows see a known fraud
    assert any(g > s + 1.0 for g, s in zip(got, since, strict=True))  # runs of several frauds


def test_no_label_after_t_minus_delay_influences_the_feature_at_t(
    synthetic_small, synthetic_schema
):
    _, path = synthetic_small
    frame = load_transactions(path, synthetic_schema)
    cfg = FeatureConfig(
        label_delay_days=7.0, risk_windows_days=(1, 7, 30), risk_recency=True, risk_episode=True
    )
    fb = FeatureBuilder(synthetic_schema, cfg).fit(frame)
    base = fb.transform(frame)
    features = fb.feature_columns_.all
    risk_cols = [
        c
        for c in features
        if "_risk_" in c or "_labelled_" in c or "since_fraud" in c or "episode" in c
    ]
    assert len(risk_cols) == 8
    rng = np.random.default_rng(0)
    ts = frame.get_column(TS)
    informative = np.flatnonzero(base.get_column("terminal_labelled_30d").to_numpy() > 0)
    changed_somewhere = False
    for i in map(int, rng.choice(informative, 15, replace=False)):
        t = ts[i]
        edge = t - timedelta(days=cfg.label_delay_days)
        # Flip every label after t - delay (the delay period and the whole future).
        after = fb.transform(frame.with_columns(_flip(pl.col(TS) > edge)))
        assert (
            after.get_column("TX_FRAUD")[i] != base.get_column("TX_FRAUD")[i]
        )  # its own label too
        assert base.select(features).row(i) == after.select(features).row(i), (
            f"row {i} at {t} changed by labels after {edge}"
        )
        # Flipping labels at or before t - delay does reach it (the test can fail).
        moved = fb.transform(frame.with_columns(_flip(pl.col(TS) <= edge))).select(risk_cols).row(i)
        changed_somewhere |= moved != base.select(risk_cols).row(i)
    assert changed_somewhere


def test_unlabelled_rows_count_as_unknown(tmp_path):
    frame, schema = _tiny(tmp_path)
    fb = FeatureBuilder(schema, CFG).fit(frame)
    masked = frame.with_columns(
        pl.when(pl.col("TRANSACTION_ID") == "2")
        .then(None)
        .otherwise(pl.col("TX_FRAUD"))
        .alias("TX_FRAUD")
    )
    out = fb.transform(masked)
    # Row 5's 7-day window held rows 2 (fraud), 3, 4; row 2's label is now unknown.
    assert out.get_column("terminal_labelled_7d")[5] == 2
    assert out.get_column("terminal_risk_7d")[5] == 0.0
    no_label = fb.transform(frame.drop("TX_FRAUD"))
    assert no_label.get_column("terminal_risk_7d").to_list() == [0.0] * 7


def test_ulb_like_schema_gets_given_features_and_time_of_day(tmp_path):
    rows = {
        "Time": ["0", "7200", "86400", "100000"],
        "V1": ["0.5", None, "-1", "2"],
        "V2": ["1", "2", "3", "4"],
        "Amount": ["0", "10", "99.5", "3"],
        "Class": ["0", "1", "0", "0"],
    }
    schema = FraudSchema(
        name="ulb-like", time_column="Time", time_kind="offset", amount_column="Amount",
        label_column="Class", numeric_columns=("V1", "V2"),
    )  # fmt: skip
    frame = load_transactions(write_csv(tmp_path, rows), schema)
    fb = FeatureBuilder(schema).fit(frame)
    out = fb.transform(frame)
    assert fb.feature_columns_.numeric == ["amount", "amount_log1p", "hour", "is_night", "V1", "V2"]
    assert fb.feature_columns_.categorical == []
    assert out.get_column("hour").to_list() == [0, 2, 0, 3]
    assert out.get_column("V1").to_list() == [0.5, 0.5, -1.0, 2.0]  # null -> training mean
    x_num, x_cat = fb.to_matrices(out)
    assert x_num.shape == (4, 6) and x_cat.shape == (4, 0)


def test_config_and_frame_errors(tmp_path):
    frame, schema = _tiny(tmp_path)
    with pytest.raises(FraudConfigError, match="never_use"):
        FeatureBuilder(
            tiny_schema(numeric_columns=(), categorical_columns=("CHANNEL",)),
            FeatureConfig(risk_columns=("TX_FRAUD_SCENARIO",)),
        ).fit(frame)
    with pytest.raises(FraudConfigError, match="label_delay_days"):
        FeatureConfig(label_delay_days=-1)
    with pytest.raises(FraudDataError, match="_ts"):
        FeatureBuilder(schema).fit(frame.drop(TS))
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureBuilder(schema).transform(frame)


def test_categorical_target_encoding_is_delayed_too(tmp_path):
    frame, schema = _tiny(tmp_path)
    cfg = FeatureConfig(label_delay_days=1.0, risk_windows_days=(30,), risk_columns=("CHANNEL",))
    fb = FeatureBuilder(schema, cfg).fit(frame)
    out = fb.transform(frame)
    # Row 5 (01-09, channel a): labelled 'a' rows in (12-09, 01-08]: rows 0, 2 (fraud), 4.
    assert out.get_column("channel_labelled_30d")[5] == 3
    assert out.get_column("channel_risk_30d")[5] == pytest.approx(1 / 3)
    assert out.get_column("channel_labelled_30d")[2] == 0  # row 0 is 12 h before: not yet known
    assert datetime(2020, 1, 1, 12) == out.get_column(TS)[2]


@pytest.mark.shared_data
def test_ulb_features_and_history_window():
    from apps.fraud.readers import load_dataset
    from apps.fraud.splits import time_fraction_split
    from tests.shared import require_shared_data

    require_shared_data("fraud/ulb-creditcard/creditcard.parquet")
    frame, schema = load_dataset("ulb")
    split = time_fraction_split(frame)
    fb = FeatureBuilder(schema).fit(frame[split.train])
    x_num, x_cat = fb.to_matrices(fb.transform(frame))
    assert x_num.shape == (284_807, 4 + 28) and x_cat.shape == (284_807, 0)
    assert fb.feature_columns_.numeric[:4] == ["amount", "amount_log1p", "hour", "is_night"]
    assert np.isfinite(x_num).all()
    assert FeatureConfig().history_days() == 37.0  # 7-day delay + 30-day risk window


def test_history_days_is_enough_history(synthetic_small, synthetic_schema):
    """Features of rows from day S computed on a frame trimmed to S - history_days equal
    those computed on the full frame."""
    _, path = synthetic_small
    frame = load_transactions(path, synthetic_schema)
    cfg = FeatureConfig(
        windows_days=(1, 7),
        ratio_window_days=7,
        max_gap_days=5,
        label_delay_days=3,
        risk_windows_days=(1, 7),
    )
    assert cfg.history_days() == 10.0
    fb = FeatureBuilder(synthetic_schema, cfg).fit(frame)
    start = frame.get_column(TS).min() + timedelta(days=20)
    trimmed = frame.filter(pl.col(TS) >= start - timedelta(days=cfg.history_days()))
    full = fb.transform(frame).filter(pl.col(TS) >= start)
    part = fb.transform(trimmed).filter(pl.col(TS) >= start)
    assert full.height > 1000
    # Equal up to float round-off: rolling sums add and subtract as the window slides.
    assert_frame_equal(full, part, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)
    too_short = frame.filter(pl.col(TS) >= start - timedelta(days=cfg.history_days() - 2))
    with pytest.raises(AssertionError):
        assert_frame_equal(
            full, fb.transform(too_short).filter(pl.col(TS) >= start), check_exact=False
        )


def test_feature_config_round_trips_through_yaml(tmp_path):
    cfg = FeatureConfig(windows_days=(1, 3), risk_columns=("CHANNEL",), night_hours=(23, 5))
    path = tmp_path / "features.yaml"
    cfg.to_yaml(path)
    assert FeatureConfig.from_yaml(path) == cfg
