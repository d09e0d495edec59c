"""Synthetic generator: determinism, fraud rate, scenario signatures, CLI and the shipped sample."""

from __future__ import annotations

import polars as pl
import pytest

from apps.fraud.readers import load_dataset, load_transactions
from apps.fraud.schema import load_schema
from apps.fraud.synthetic import (
    ACCOUNT_TAKEOVER,
    CARD_TESTING,
    COMPROMISED_TERMINAL,
    SyntheticConfig,
    generate_transactions,
    main,
)
from tests.apps.fraud.helpers import SAMPLE

SMALL = SyntheticConfig(n_customers=200, n_terminals=300, n_days=30, seed=7)


def test_same_seed_same_data_other_seed_other_data():
    a = generate_transactions(SMALL)
    b = generate_transactions(SMALL)
    assert a.equals(b)
    c = generate_transactions(SyntheticConfig(n_customers=200, n_terminals=300, n_days=30, seed=8))
    assert not a.equals(c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fraud_rate_and_scenarios(seed):
    cfg = SyntheticConfig(n_customers=300, n_terminals=430, n_days=40, seed=seed)
    frame = generate_transactions(cfg)
    rate = frame.get_column("TX_FRAUD").mean()
    assert 0.005 <= rate <= 0.015
    scen = frame.get_column("TX_FRAUD_SCENARIO")
    assert set(scen.unique().to_list()) == {0, CARD_TESTING, COMPROMISED_TERMINAL, ACCOUNT_TAKEOVER}
    assert (frame.get_column("TX_FRAUD") == (scen != 0)).all()
    assert frame.get_column("TX_DATETIME").is_sorted()
    assert frame.get_column("TRANSACTION_ID").to_list() == list(range(frame.height))
    days = frame.get_column("TX_TIME_DAYS")
    assert days.min() == 0 and days.max() == cfg.n_days - 1


def test_scenario_signatures():
    frame = generate_transactions(
        SyntheticConfig(n_customers=400, n_terminals=570, n_days=40, seed=3)
    )
    legit = frame.filter(pl.col("TX_FRAUD_SCENARIO") == 0)
    testing = frame.filter(pl.col("TX_FRAUD_SCENARIO") == CARD_TESTING)
    takeover = frame.filter(pl.col("TX_FRAUD_SCENARIO") == ACCOUNT_TAKEOVER)
    assert testing.get_column("TX_AMOUNT").max() <= 5.0
    assert (testing.get_column("TX_CHANNEL") == "online").all()
    assert takeover.get_column("TX_AMOUNT").median() > 3 * legit.get_column("TX_AMOUNT").median()
    # Card-testing bursts: several transactions of one card within minutes.
    gaps = (
        testing.sort("CUSTOMER_ID", "TX_DATETIME")
        .select(pl.col("TX_DATETIME").diff().over("CUSTOMER_ID").dt.total_seconds())
        .to_series()
        .drop_nulls()
    )
    assert gaps.median() < 600


def test_cli_writes_a_file_the_schema_loads(tmp_path, capsys):
    out = tmp_path / "cli.csv"
    main(["--out", str(out), "--days", "5", "--customers", "40", "--seed", "1"])
    assert "wrote" in capsys.readouterr().out
    frame = load_transactions(out, load_schema("synthetic"))  # CSV: times parsed from text
    expected = generate_transactions(
        SyntheticConfig(n_customers=40, n_terminals=57, n_days=5, seed=1)
    )
    assert frame.height == expected.height
    assert frame.get_column("TX_AMOUNT").to_list() == expected.get_column("TX_AMOUNT").to_list()
    assert "TX_TIME_DAYS" not in frame.columns  # dropped by the schema
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.csv"]  # atomic: no temp left


def test_shipped_sample_is_small_valid_and_reproducible():
    assert SAMPLE.exists(), (
        "regenerate: python -m apps.fraud.synthetic --out data_samples/fraud/transactions.parquet --days 60 --customers 700"
    )
    assert SAMPLE.stat().st_size < 5 * 2**20
    frame, schema = load_dataset("synthetic")
    assert 60_000 <= frame.height <= 100_000
    assert 0.005 <= frame.get_column("TX_FRAUD").mean() <= 0.015
    assert "TX_FRAUD_SCENARIO" in schema.never_use_columns
    regenerated = generate_transactions(
        SyntheticConfig(n_customers=700, n_terminals=1000, n_days=60, seed=0)
    )
    assert pl.read_parquet(SAMPLE).equals(regenerated)
