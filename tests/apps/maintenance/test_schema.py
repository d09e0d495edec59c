"""Sensor-table schema: every defect is a clear error or a counted repair; events and runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.events import events_from_flags, label_runs, load_events
from apps.maintenance.schema import (
    RepairPolicy,
    SensorSchema,
    load_sensor_table,
    validate_sensor_frame,
)


def _schema(**repair: str) -> SensorSchema:
    return SensorSchema(
        asset_column="asset",
        time_column="cycle",
        sensor_columns=("s1", "s2"),
        repair=RepairPolicy(**repair),
    )


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "asset": ["A", "A", "A", "B", "B", "B"],
            "cycle": [1, 2, 3, 1, 2, 3],
            "s1": [1.0, 2.0, 3.0, 10.0, 20.0, 30.0],
            "s2": [5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
        }
    )


def _csv(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "readings.csv"
    frame.to_csv(path, index=False)
    return path


def test_clean_table_loads_unchanged(tmp_path: Path) -> None:
    table = load_sensor_table(_csv(tmp_path, _frame()), _schema())
    pd.testing.assert_frame_equal(table.frame, _frame())
    assert not table.report.any_repairs
    assert table.report.n_rows_in == table.report.n_rows_out == 6


def test_missing_sensor_column_names_file_and_column(tmp_path: Path) -> None:
    path = _csv(tmp_path, _frame().drop(columns="s2"))
    with pytest.raises(MaintenanceDataError) as err:
        load_sensor_table(path, _schema())
    msg = str(err.value)
    assert str(path) in msg and "missing column(s) ['s2']" in msg


def test_non_numeric_value_names_file_column_asset_row_and_line(tmp_path: Path) -> None:
    f = _frame().astype({"s2": object})
    f.loc[4, "s2"] = "n/a?"
    path = _csv(tmp_path, f)
    with pytest.raises(MaintenanceDataError) as err:
        load_sensor_table(path, _schema())
    msg = str(err.value)
    assert str(path) in msg
    assert "column 's2', asset 'B', row 4 (line 6)" in msg
    assert "'n/a?' is not numeric" in msg


def test_infinite_value_is_an_error() -> None:
    f = _frame()
    f.loc[2, "s1"] = np.inf
    with pytest.raises(
        MaintenanceDataError, match="column 's1', asset 'A', row 2: value inf is not finite"
    ):
        validate_sensor_frame(f, _schema())


def test_nan_error_then_each_repair_counted() -> None:
    f = _frame()
    f.loc[1, "s1"] = np.nan
    f.loc[4, "s2"] = np.nan
    f.loc[5, "s2"] = np.nan
    with pytest.raises(MaintenanceDataError) as err:
        validate_sensor_frame(f, _schema(), source="plant.parquet")
    assert "plant.parquet, column 's1', asset 'A', row 1: NaN" in str(err.value)

    filled = validate_sensor_frame(f, _schema(nan="ffill"))
    assert filled.report.nan_cells_filled == 3 and filled.report.any_repairs
    assert filled.frame["s1"].tolist() == [1.0, 1.0, 3.0, 10.0, 20.0, 30.0]
    assert filled.frame["s2"].tolist() == [5.0, 6.0, 7.0, 8.0, 8.0, 8.0]
    assert "forward-filled 3" in filled.report.summary()

    dropped = validate_sensor_frame(f, _schema(nan="drop_row"))
    assert dropped.report.nan_rows_dropped == 3
    assert dropped.report.n_rows_out == 3
    assert dropped.frame["cycle"].tolist() == [1, 3, 1]


def test_ffill_cannot_invent_a_first_reading() -> None:
    f = _frame()
    f.loc[3, "s1"] = np.nan  # asset B's first reading
    with pytest.raises(MaintenanceDataError) as err:
        validate_sensor_frame(f, _schema(nan="ffill"))
    assert "column 's1', asset 'B', row 3: NaN with no earlier reading" in str(err.value)


def test_unsorted_error_names_asset_rows_then_sort_counts() -> None:
    f = _frame()
    f.loc[[3, 4, 5], "cycle"] = [3, 1, 2]  # asset B: 3, 1, 2
    with pytest.raises(MaintenanceDataError) as err:
        validate_sensor_frame(f, _schema())
    msg = str(err.value)
    assert "column 'cycle', asset 'B', row 4: time 1 comes after 3 (row 3)" in msg

    table = validate_sensor_frame(f, _schema(unsorted="sort"))
    assert table.report.assets_sorted == 1
    assert table.report.rows_moved == 3  # positions 0,1,2 become 2,0,1
    b = table.frame[table.frame["asset"] == "B"]
    assert b["cycle"].tolist() == [1, 2, 3]
    assert b["s1"].tolist() == [20.0, 30.0, 10.0]  # values travel with their times


def test_interleaved_assets_are_not_a_repair() -> None:
    f = _frame().iloc[[0, 3, 1, 4, 2, 5]]
    table = validate_sensor_frame(f, _schema())
    assert not table.report.any_repairs
    pd.testing.assert_frame_equal(table.frame, _frame())


def test_duplicates_error_names_rows_then_keep_last_counts() -> None:
    f = pd.concat([_frame(), _frame().iloc[[1]].assign(s1=99.0)], ignore_index=True)
    with pytest.raises(MaintenanceDataError) as err:
        validate_sensor_frame(f, _schema())
    assert "column 'cycle', asset 'A', row 1: time 2 appears in rows [1, 6]" in str(err.value)

    table = validate_sensor_frame(f, _schema(duplicates="keep_last"))
    assert table.report.duplicate_rows_dropped == 1
    assert table.frame["s1"].tolist() == [1.0, 99.0, 3.0, 10.0, 20.0, 30.0]


def test_timestamps_parse_and_bad_ones_are_named() -> None:
    schema = SensorSchema(
        asset_column="asset", time_column="ts", sensor_columns=("s1",), time_kind="timestamp"
    )
    f = pd.DataFrame(
        {
            "asset": ["A", "A", "A"],
            "ts": ["2024-01-01T00:00", "2024-01-01T01:00", "yesterday"],
            "s1": [1, 2, 3],
        }
    )
    with pytest.raises(
        MaintenanceDataError, match="column 'ts', asset 'A', row 2: 'yesterday' is not a timestamp"
    ):
        validate_sensor_frame(f, schema)
    f.loc[2, "ts"] = "2024-01-01T02:00"
    table = validate_sensor_frame(f, schema)
    assert pd.api.types.is_datetime64_any_dtype(table.frame["ts"])
    with pytest.raises(MaintenanceDataError, match="cycle 1.5 is not an integer"):
        validate_sensor_frame(_frame().assign(cycle=[1, 1.5, 3, 1, 2, 3]), _schema())


def test_missing_asset_id_is_always_an_error() -> None:
    f = _frame().astype({"asset": object})
    f.loc[2, "asset"] = None
    with pytest.raises(MaintenanceDataError, match="column 'asset', row 2: missing asset id"):
        validate_sensor_frame(f, _schema(nan="drop_row"))


def test_schema_yaml_round_trip_and_bad_config(tmp_path: Path) -> None:
    schema = SensorSchema(
        asset_column="asset",
        time_column="ts",
        sensor_columns=("s1", "s2"),
        time_kind="timestamp",
        setting_columns=("load",),
        event_column="failed",
        repair=RepairPolicy(nan="ffill", unsorted="sort", duplicates="keep_last"),
    )
    path = tmp_path / "schema.yaml"
    schema.to_yaml(path)
    assert SensorSchema.from_yaml(path) == schema
    path.write_text("asset_column: a\ntime_column: t\nrepair: {nan: interpolate}\n")
    with pytest.raises(
        MaintenanceDataError,
        match=r"repair.nan='interpolate': expected one of \['error', 'ffill', 'drop_row'\]",
    ):
        SensorSchema.from_yaml(path)
    path.write_text("asset_column: a\ntime_column: t\nsensors: [x]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        SensorSchema.from_yaml(path)
    with pytest.raises(MaintenanceDataError, match="more than one role"):
        SensorSchema(asset_column="a", time_column="t", sensor_columns=("a",))


def test_event_flag_checked_and_converted_to_events() -> None:
    schema = SensorSchema(
        asset_column="asset",
        time_column="cycle",
        sensor_columns=("s1", "s2"),
        event_column="failed",
    )
    f = _frame().assign(failed=[0, 0, 1, 0, 0, 2])
    with pytest.raises(
        MaintenanceDataError, match="column 'failed', asset 'B', row 5: event flag 2"
    ):
        validate_sensor_frame(f, schema)
    table = validate_sensor_frame(f.assign(failed=[0, 0, 1, 0, 0, 0]), schema)
    events = events_from_flags(table)
    assert events.to_dict("list") == {"asset": ["A"], "cycle": [3], "event": ["failure"]}


def test_label_runs_splits_at_events_and_labels_rul() -> None:
    schema = SensorSchema(asset_column="asset", time_column="cycle", sensor_columns=("s1",))
    f = pd.DataFrame(
        {"asset": ["A"] * 10 + ["B"] * 3, "cycle": list(range(1, 11)) + [1, 2, 3], "s1": 1.0}
    )
    table = validate_sensor_frame(f, schema)
    events = load_events(
        pd.DataFrame(
            {
                "asset": ["A", "A", "A"],
                "cycle": [7, 4, 5],
                "event": ["Maintenance", "failure", "maintenance"],
            }
        ),
        schema,
    )
    assert events["cycle"].tolist() == [4, 5, 7]
    runs = label_runs(table, events)
    fr = runs.frame
    a = fr[fr["asset"] == "A"]
    # run 0: cycles 1..4 fail at 4; cycle 5 closes with maintenance (censored); 6..7 closed by
    # maintenance at 7 (censored); 8..10 open
    assert a["run_index"].tolist() == [0, 0, 0, 0, 1, 2, 2, 3, 3, 3]
    np.testing.assert_array_equal(a["rul"].to_numpy()[:4], [3.0, 2.0, 1.0, 0.0])
    assert a["rul"].iloc[4:].isna().all()
    assert runs.runs["outcome"].tolist() == [
        "failure",
        "maintenance",
        "maintenance",
        "open",
        "open",
    ]
    assert fr["run_id"].nunique() == 5
    assert fr.loc[fr["asset"] == "B", "run_failed"].sum() == 0


def test_label_runs_timestamps_give_hours_and_refuse_unscorable_failures() -> None:
    schema = SensorSchema(
        asset_column="asset", time_column="ts", sensor_columns=("s1",), time_kind="timestamp"
    )
    ts = pd.date_range("2024-03-01", periods=4, freq="30min")
    table = validate_sensor_frame(pd.DataFrame({"asset": "A", "ts": ts, "s1": 1.0}), schema)
    events = load_events(
        pd.DataFrame({"asset": ["A"], "ts": [ts[-1]], "event": ["failure"]}), schema
    )
    np.testing.assert_array_equal(
        label_runs(table, events).frame["rul"].to_numpy(), [1.5, 1.0, 0.5, 0.0]
    )

    two_failures = pd.DataFrame(
        {"asset": ["A", "A"], "ts": [ts[-1], ts[-1] + pd.Timedelta("1h")], "event": "failure"}
    )
    with pytest.raises(MaintenanceDataError, match="closes a run with no readings"):
        label_runs(table, load_events(two_failures, schema))
    with pytest.raises(MaintenanceDataError, match="asset 'Z' has no readings"):
        label_runs(
            table,
            load_events(pd.DataFrame({"asset": ["Z"], "ts": [ts[0]], "event": "failure"}), schema),
        )
    with pytest.raises(MaintenanceDataError, match="row 0: event 'broke'"):
        load_events(pd.DataFrame({"asset": ["A"], "ts": [ts[0]], "event": ["broke"]}), schema)
