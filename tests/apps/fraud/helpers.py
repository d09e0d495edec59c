"""Builders for the fraud tests: schemas and small transaction files in tmp_path."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from apps.fraud.schema import FraudSchema

SAMPLE = Path(__file__).resolve().parents[3] / "data_samples" / "fraud" / "transactions.parquet"


def tiny_schema(**overrides) -> FraudSchema:
    """Handbook-like roles with one categorical and one numeric feature column."""
    base = dict(
        name="tiny",
        time_column="TX_DATETIME",
        amount_column="TX_AMOUNT",
        label_column="TX_FRAUD",
        card_column="CUSTOMER_ID",
        terminal_column="TERMINAL_ID",
        id_column="TRANSACTION_ID",
        categorical_columns=("CHANNEL",),
        numeric_columns=("SCORE_X",),
        never_use_columns=("TX_FRAUD_SCENARIO",),
    )
    base.update(overrides)
    return FraudSchema(**base)


def good_rows() -> dict[str, list]:
    """Six valid transactions as CSV-like strings (rows deliberately not time-sorted)."""
    return {
        "TRANSACTION_ID": ["0", "1", "2", "3", "4", "5"],
        "TX_DATETIME": [
            "2020-01-01 10:00:00",
            "2020-01-01 09:00:00",
            "2020-01-02 11:30:00",
            "2020-01-03 00:00:00",
            "2020-01-03 12:00:00",
            "2020-01-04 08:15:00",
        ],
        "CUSTOMER_ID": ["1", "2", "1", "3", "2", "1"],
        "TERMINAL_ID": ["10", "10", "20", "30", "20", "10"],
        "TX_AMOUNT": ["12.5", "3.0", "40.25", "7", "0.99", "100"],
        "TX_FRAUD": ["0", "0", "1", "0", "0", "1"],
        "TX_FRAUD_SCENARIO": ["0", "0", "3", "0", "0", "3"],
        "CHANNEL": ["chip", "online", "online", "chip", None, "chip"],
        "SCORE_X": ["0.1", "0.2", None, "0.4", "0.5", "0.6"],
    }


def write_csv(tmp_path: Path, rows: dict[str, list], name: str = "tx.csv") -> Path:
    path = tmp_path / name
    pl.DataFrame(rows, schema={k: pl.String for k in rows}).write_csv(path)
    return path
