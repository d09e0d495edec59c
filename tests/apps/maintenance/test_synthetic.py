"""Synthetic fleet: determinism, degradation before failure, events, CLI outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.cmapss import load_cmapss
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.events import label_runs, load_events
from apps.maintenance.preprocess import SensorNormalizer
from apps.maintenance.schema import SensorSchema, load_sensor_table, validate_sensor_frame
from apps.maintenance.synthetic import FleetConfig, generate_fleet, main

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def _small(seed: int = 7, **kw: object) -> FleetConfig:
    return FleetConfig(n_assets=4, n_sensors=9, n_degrading=3, seed=seed, **kw)


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    a, b = generate_fleet(_small()), generate_fleet(_small())
    pd.testing.assert_frame_equal(a.sensors, b.sensors)
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.lives, b.lives)
    c = generate_fleet(_small(seed=8))
    assert not a.sensors[list(a.schema.sensor_columns)].equals(
        c.sensors[list(c.schema.sensor_columns)]
    )


def test_degradation_precedes_failure_and_drifts_only_degrading_sensors() -> None:
    fleet = generate_fleet(
        FleetConfig(n_assets=6, n_sensors=10, n_degrading=4, seed=3, p_open_last=0.0)
    )
    failed = fleet.lives[fleet.lives["outcome"] == "failure"]
    assert len(failed) >= 6
    assert (failed["onset_time"] < failed["failure_time"]).all()
    names = list(fleet.schema.sensor_columns)
    s = fleet.sensors
    runs = []
    for _, run in failed.iterrows():
        in_run = (s["asset_id"] == run["asset_id"]) & s["timestamp"].between(
            run["start"], run["end"]
        )
        runs.append((s.index[in_run], s.index[in_run & (s["timestamp"] < run["onset_time"])]))
        assert s.loc[in_run, "timestamp"].iloc[-1] == run["failure_time"]
    # remove the operating-condition levels with statistics of healthy (pre-onset) readings
    healthy = s.loc[np.concatenate([pre for _, pre in runs])]
    norm = SensorNormalizer(
        sensor_columns=names,
        setting_columns=("op_setting_1",),
        n_conditions=3,
        condition_method="round",
    ).fit(healthy)
    assert norm.n_conditions_ == 3
    z = norm.transform(s)
    for rows, pre in runs:
        # drift of the last 10 readings before failure against the same run's healthy level
        shift = (z.loc[rows[-10:], names].mean() - z.loc[pre, names].mean()).abs()
        for name in names:
            if name in fleet.degrading_sensors:
                assert shift[name] > 2.0, (name, shift[name])
            else:
                assert shift[name] < 1.0, (name, shift[name])
    assert len(fleet.degrading_sensors) == 4


def test_events_match_runs_and_label_exact_rul_in_hours() -> None:
    fleet = generate_fleet(_small(p_preventive=0.3))
    table = validate_sensor_frame(fleet.sensors, fleet.schema)
    assert not table.report.any_repairs
    events = load_events(fleet.events, fleet.schema)
    runs = label_runs(table, events)
    assert runs.runs["outcome"].tolist() == fleet.lives["outcome"].tolist()
    f = runs.frame[runs.frame["run_failed"]]
    last = f.groupby("run_id").tail(1)
    assert (last["rul"] == 0).all()
    first = f.groupby("run_id").head(1)
    life = fleet.lives[fleet.lives["outcome"] == "failure"]["life_hours"].to_numpy()
    np.testing.assert_array_equal(first["rul"].to_numpy(), life)  # hourly readings 0..L hours
    # after each failure comes a maintenance event, later than the failure
    for _, ev in fleet.events.groupby("asset_id"):
        kinds = ev["event"].tolist()
        for i, k in enumerate(kinds):
            if k == "failure":
                assert (
                    kinds[i + 1] == "maintenance"
                    and ev["timestamp"].iloc[i + 1] > ev["timestamp"].iloc[i]
                )


def test_config_is_validated() -> None:
    with pytest.raises(MaintenanceDataError, match="n_degrading=12"):
        FleetConfig(n_sensors=10, n_degrading=12)
    with pytest.raises(MaintenanceDataError, match=r"life_hours=\(300, 200\): low > high"):
        FleetConfig(life_hours=(300, 200))


def test_cli_writes_loadable_tables_and_cmapss(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    rc = main(
        [
            "--out",
            str(out),
            "--assets",
            "3",
            "--sensors",
            "8",
            "--seed",
            "2",
            "--nan-fraction",
            "0.01",
            "--cmapss",
        ]
    )
    assert rc == 0
    for name in ("sensors", "events", "lives"):
        assert (out / f"fleet_{name}.parquet").stat().st_size < 3_000_000
    schema = SensorSchema.from_yaml(out / "fleet_schema.yaml")
    assert len(schema.sensor_columns) == 8 and schema.time_kind == "timestamp"
    with pytest.raises(MaintenanceDataError, match="NaN"):
        load_sensor_table(out / "fleet_sensors.parquet", schema)
    schema.repair.nan = "drop_row"
    table = load_sensor_table(out / "fleet_sensors.parquet", schema)
    assert table.report.nan_rows_dropped > 0
    assert table.report.n_rows_out == table.report.n_rows_in - table.report.nan_rows_dropped
    data = load_cmapss(out / "cmapss", "SYN")
    assert data.n_train_units + data.n_test_units == int(
        (pd.read_parquet(out / "fleet_lives.parquet")["outcome"] == "failure").sum()
    )
    assert main(["--out", str(out), "--sensors", "30"]) == 2


def test_shipped_sample_loads() -> None:
    folder = PROJECT_ROOT / "data_samples" / "maintenance"
    schema = SensorSchema.from_yaml(folder / "fleet_schema.yaml")
    table = load_sensor_table(folder / "fleet_sensors.parquet", schema)
    runs = label_runs(table, load_events(folder / "fleet_events.parquet", schema))
    assert runs.runs["outcome"].eq("failure").sum() >= 10
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 5_000_000
    pd.testing.assert_frame_equal(
        table.frame, generate_fleet(FleetConfig.from_yaml(folder / "fleet_config.yaml")).sensors
    )
