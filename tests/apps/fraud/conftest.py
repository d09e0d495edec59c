"""Fixtures of the fraud tests (builders live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from apps.fraud.schema import FraudSchema, load_schema
from apps.fraud.synthetic import SyntheticConfig, generate_transactions, write_frame


@pytest.fixture
def synthetic_small(tmp_path: Path) -> tuple[pl.DataFrame, Path]:
    """40 days, 150 customers, written as parquet (loaded back through the schema)."""
    frame = generate_transactions(
        SyntheticConfig(n_customers=150, n_terminals=200, n_days=40, seed=3)
    )
    path = write_frame(frame, tmp_path / "syn.parquet")
    return frame, path


@pytest.fixture
def synthetic_schema() -> FraudSchema:
    return load_schema("synthetic")
