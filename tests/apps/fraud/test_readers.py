"""Schema loading and up-front validation of transaction files (CSV and Parquet)."""

from __future__ import annotations

import math
from datetime import datetime

import polars as pl
import pytest

from apps.fraud.errors import FraudConfigError, FraudDataError
from apps.fraud.readers import (
    load_dataset,
    load_transactions,
    scan_transactions,
    validate_transactions,
)
from apps.fraud.schema import TS, FraudSchema, available_schemas, load_schema
from tests.apps.fraud.helpers import good_rows, tiny_schema, write_csv


def test_good_csv_loads_typed_and_time_sorted(tmp_path):
    path = write_csv(tmp_path, good_rows())
    frame = load_transactions(path, tiny_schema())
    assert frame.height == 6
    assert frame.schema["TX_AMOUNT"] == pl.Float64
    assert frame.schema["TX_FRAUD"] == pl.Int8
    assert frame.schema[TS] == pl.Datetime("us")
    assert frame.schema["SCORE_X"] == pl.Float64
    # Sorted by time: file row 1 (09:00) comes before file row 0 (10:00).
    assert frame.get_column("TRANSACTION_ID").to_list() == ["1", "0", "2", "3", "4", "5"]
    assert frame.get_column(TS)[0] == datetime(2020, 1, 1, 9, 0)
    assert frame.get_column("TX_AMOUNT").to_list() == [3.0, 12.5, 40.25, 7.0, 0.99, 100.0]
    assert frame.get_column("SCORE_X").null_count() == 1  # nulls allowed in numeric features


def test_parquet_and_csv_give_the_same_frame(tmp_path):
    csv = write_csv(tmp_path, good_rows())
    from_csv = load_transactions(csv, tiny_schema())
    parquet = tmp_path / "tx.parquet"
    pl.read_csv(csv).write_parquet(parquet)
    from_parquet = load_transactions(parquet, tiny_schema())
    for col in ("TX_AMOUNT", "TX_FRAUD", TS, "CHANNEL", "SCORE_X"):
        assert from_csv.get_column(col).to_list() == from_parquet.get_column(col).to_list()


def test_missing_column_names_file_and_column(tmp_path):
    rows = good_rows()
    del rows["TX_AMOUNT"]
    path = write_csv(tmp_path, rows)
    with pytest.raises(FraudDataError) as err:
        load_transactions(path, tiny_schema())
    msg = str(err.value)
    assert str(path) in msg
    assert "'TX_AMOUNT' (amount)" in msg and "not found" in msg
    assert isinstance(err.value, ValueError)


def test_mistyped_amount_names_column_and_rows(tmp_path):
    rows = good_rows()
    rows["TX_AMOUNT"][3] = "abc"
    rows["TX_AMOUNT"][5] = "12,5"
    path = write_csv(tmp_path, rows)
    with pytest.raises(FraudDataError) as err:
        load_transactions(path, tiny_schema())
    msg = str(err.value)
    assert str(path) in msg
    assert "column 'TX_AMOUNT' (amount): not a number in 2 row(s)" in msg
    assert "row 3: 'abc'" in msg and "row 5: '12,5'" in msg


def test_mistyped_numeric_feature_in_parquet(tmp_path):
    rows = good_rows()
    frame = pl.read_csv(write_csv(tmp_path, rows)).with_columns(
        pl.Series("SCORE_X", ["0.1", "x", None, "0.4", "0.5", "0.6"])
    )
    path = tmp_path / "tx.parquet"
    frame.write_parquet(path)
    with pytest.raises(FraudDataError) as err:
        load_transactions(path, tiny_schema())
    assert "column 'SCORE_X' (numeric): not a number in 1 row(s); first: row 1: 'x'" in str(
        err.value
    )


def test_wrong_dtype_column_is_reported(tmp_path):
    frame = pl.read_csv(write_csv(tmp_path, good_rows())).with_columns(
        pl.lit(datetime(2020, 1, 1)).alias("TX_AMOUNT")
    )
    path = tmp_path / "tx.parquet"
    frame.write_parquet(path)
    with pytest.raises(FraudDataError) as err:
        load_transactions(path, tiny_schema())
    msg = str(err.value)
    assert "column 'TX_AMOUNT' (amount): column has dtype Datetime" in msg
    assert "expected a number" in msg and "row 0:" in msg


def test_non_binary_label_names_rows(tmp_path):
    rows = good_rows()
    rows["TX_FRAUD"][1] = "2"
    rows["TX_FRAUD"][4] = "yes"
    path = write_csv(tmp_path, rows)
    with pytest.raises(FraudDataError) as err:
        load_transactions(path, tiny_schema())
    msg = str(err.value)
    assert "column 'TX_FRAUD' (label): label is not 0 or 1 in 2 row(s)" in msg
    assert "row 1: '2'" in msg and "row 4: 'yes'" in msg


def test_non_binary_integer_label_in_parquet(tmp_path):
    frame = pl.read_csv(write_csv(tmp_path, good_rows())).with_columns(
        pl.Series("TX_FRAUD", [0, 1, 0, -1, 0, 1])
    )
    path = tmp_path / "tx.parquet"
    frame.write_parquet(path)
    with pytest.raises(FraudDataError) as err:
        validate_transactions(path, tiny_schema())
    assert "column 'TX_FRAUD' (label): label is not 0 or 1 in 1 row(s); first: row 3: -1" in str(
        err.value
    )


def test_unparseable_time_names_rows(tmp_path):
    rows = good_rows()
    rows["TX_DATETIME"][2] = "yesterday"
    rows["TX_DATETIME"][4] = "2020-13-45 00:00:00"
    path = write_csv(tmp_path, rows)
    with pytest.raises(FraudDataError) as err:
        load_transactions(path, tiny_schema())
    msg = str(err.value)
    assert "column 'TX_DATETIME' (time): unparseable time in 2 row(s)" in msg
    assert "row 2: 'yesterday'" in msg and "row 4: '2020-13-45 00:00:00'" in msg


def test_nan_and_missing_amounts_name_rows(tmp_path):
    frame = pl.read_csv(write_csv(tmp_path, good_rows())).with_columns(
        pl.Series("TX_AMOUNT", [1.0, 2.0, 3.0, 4.0, math.nan, None])
    )
    path = tmp_path / "tx.parquet"
    frame.write_parquet(path)
    with pytest.raises(FraudDataError) as err:
        load_transactions(path, tiny_schema())
    msg = str(err.value)
    assert (
        "column 'TX_AMOUNT' (amount): NaN or infinite amount in 1 row(s); first: row 4: nan" in msg
    )
    assert "column 'TX_AMOUNT' (amount): missing amount in 1 row(s); first: row 5: null" in msg
    assert "2 problem(s)" in msg


def test_negative_amount_rejected_unless_allowed(tmp_path):
    rows = good_rows()
    rows["TX_AMOUNT"][0] = "-5"
    path = write_csv(tmp_path, rows)
    with pytest.raises(FraudDataError, match=r"negative amount in 1 row\(s\); first: row 0: '-5'"):
        load_transactions(path, tiny_schema())
    frame = load_transactions(path, tiny_schema(allow_negative_amount=True))
    assert frame.get_column("TX_AMOUNT").min() == -5.0


def test_missing_card_id_is_reported(tmp_path):
    rows = good_rows()
    rows["CUSTOMER_ID"][2] = None
    path = write_csv(tmp_path, rows)
    with pytest.raises(
        FraudDataError,
        match=r"'CUSTOMER_ID' \(card\): missing card id in 1 row\(s\); first: row 2: null",
    ):
        load_transactions(path, tiny_schema())


def test_offset_times_and_optional_label(tmp_path):
    rows = {
        "Time": ["0", "3600.5", "90000"],
        "Amount": ["1", "2", "3"],
        "V1": ["0.1", "0.2", "0.3"],
    }
    path = write_csv(tmp_path, rows)
    schema = FraudSchema(
        name="ulb-like", time_column="Time", time_kind="offset", amount_column="Amount",
        label_column="Class", numeric_columns=("V1",),
    )  # fmt: skip
    with pytest.raises(FraudDataError, match=r"'Class' \(label\)"):
        load_transactions(path, schema)
    frame = load_transactions(path, schema, require_label=False)
    assert frame.get_column(TS).to_list() == [
        datetime(1970, 1, 1, 0, 0),
        datetime(1970, 1, 1, 1, 0, 0, 500000),
        datetime(1970, 1, 2, 1, 0),
    ]
    assert not schema.has_calendar


def test_column_selection_and_drop(tmp_path):
    path = write_csv(tmp_path, good_rows())
    schema = tiny_schema(drop_columns=("TX_FRAUD_SCENARIO",), never_use_columns=())
    full = load_transactions(path, schema)
    assert "TX_FRAUD_SCENARIO" not in full.columns and "CHANNEL" in full.columns
    slim = load_transactions(path, schema, columns=[])
    assert set(slim.columns) == {
        "TRANSACTION_ID", "TX_DATETIME", TS, "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD",
    }  # fmt: skip
    lazy = scan_transactions(path, schema, columns=["SCORE_X"])
    assert isinstance(lazy, pl.LazyFrame)
    assert "SCORE_X" in lazy.collect_schema().names()


def test_schema_config_errors(tmp_path):
    with pytest.raises(FraudConfigError, match="available"):
        load_schema("no-such-schema")
    with pytest.raises(FraudConfigError, match="never_use_columns and cannot be features"):
        tiny_schema(numeric_columns=("TX_FRAUD_SCENARIO",))
    with pytest.raises(FraudConfigError, match="two roles"):
        tiny_schema(terminal_column="CUSTOMER_ID")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntime_column: t\namount_column: a\nlabel_column: y\ntime_kind: epoch\n")
    with pytest.raises(FraudConfigError, match=r"bad.yaml.*time_kind"):
        load_schema(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("name: x\ntime_column: t\namount_column: a\nlabel_column: y\ncolour: red\n")
    with pytest.raises(FraudConfigError, match="colour"):
        load_schema(unknown)


def test_shipped_schemas_round_trip_through_yaml(tmp_path):
    assert available_schemas() == ["handbook", "synthetic", "ulb"]
    for name in available_schemas():
        schema = load_schema(name)
        path = tmp_path / f"{name}.yaml"
        schema.to_yaml(path)
        assert load_schema(path) == schema
    assert "TX_FRAUD_SCENARIO" in load_schema("handbook").never_use_columns
    assert load_schema("ulb").numeric_columns == tuple(f"V{i}" for i in range(1, 29))


@pytest.mark.shared_data
def test_ulb_loads_through_its_schema():
    from tests.shared import require_shared_data

    require_shared_data("fraud/ulb-creditcard/creditcard.parquet")
    frame, schema = load_dataset("ulb", columns=[])
    assert frame.height == 284_807
    assert frame.columns == ["Time", TS, "Amount", "Class"]
    assert int(frame.get_column("Class").sum()) == 492
    assert frame.get_column("Time").min() == 0.0
    assert frame.get_column("Time").max() == 172_792.0
    assert frame.get_column(TS).max() == datetime(1970, 1, 2, 23, 59, 52)
    validate_transactions(schema.resolve_path(), schema)  # all 28 PCA columns numeric


@pytest.mark.shared_data
def test_handbook_loads_through_its_schema():
    from tests.shared import require_shared_data

    require_shared_data("fraud/handbook-simulated/transactions.parquet")
    frame, _ = load_dataset("handbook", columns=[])
    assert frame.height == 1_754_155
    ts = frame.get_column(TS)
    assert ts.min().date().isoformat() == "2018-04-01"
    assert ts.max().date().isoformat() == "2018-09-30"
    assert int(frame.get_column("TX_FRAUD").sum()) == 14_681
    assert frame.get_column("CUSTOMER_ID").n_unique() == 4_990
    assert ts.is_sorted()


def test_streaming_engine_gives_the_same_frame(tmp_path):
    path = write_csv(tmp_path, good_rows())
    eager = load_transactions(path, tiny_schema(), engine="in-memory")
    streamed = load_transactions(path, tiny_schema(), engine="streaming")
    assert eager.equals(streamed)
    rows = good_rows()
    rows["TX_FRAUD"][2] = "7"
    with pytest.raises(FraudDataError, match="row 2: '7'"):
        load_transactions(write_csv(tmp_path, rows, "bad.csv"), tiny_schema(), engine="streaming")
