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


@pytest.fixture(scope="session")
def tiny_fraud_run(tmp_path_factory):
    """One tiny backbone + baseline training on a small synthetic file, shared by the
    model / predictor / estimator tests (a few seconds on one core)."""
    from apps.fraud.training import fit
    from tests.apps.fraud.fraud_model_helpers import tiny_config

    folder = tmp_path_factory.mktemp("fraud_tiny")
    cfg = tiny_config(folder)
    return cfg, fit(cfg)
