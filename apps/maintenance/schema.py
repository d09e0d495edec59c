"""Generic sensor tables: a declared schema, validation, and counted repairs.

A sensor table has one row per (asset, time) reading: an asset id, a time (an integer cycle or
a timestamp), numeric sensor columns, optional operating-setting columns, and optionally a 0/1
failure flag. Real tables arrive with duplicated or out-of-order readings, missing sensors,
NaNs and text in numeric columns. Each of these either stops the load with a
:class:`MaintenanceDataError` naming the file, column, asset and row, or is repaired the way
the schema's :class:`RepairPolicy` says; every repair is counted in a :class:`RepairReport`
and logged, so a repaired table is never silently different from the file.

Checks run in this order: required columns, asset ids, times, numeric values (text and
infinities are always errors), the event flag, duplicates, order, then NaNs. NaNs are only
repaired in sensor and setting columns; a missing asset id or time is always an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from apps.maintenance.errors import MaintenanceDataError, show
from core.configio import YamlConfig

log = logging.getLogger(__name__)

NAN_POLICIES = ("error", "ffill", "drop_row")
UNSORTED_POLICIES = ("error", "sort")
DUPLICATE_POLICIES = ("error", "keep_last")
TIME_KINDS = ("cycle", "timestamp")
TIME_UNITS = ("s", "m", "h", "D")


@dataclass
class RepairPolicy(YamlConfig):
    """What to do with each kind of defect instead of raising.

    * ``nan``: ``"error"``; ``"ffill"`` (carry the asset's previous reading forward; a NaN with
      no earlier reading of that asset is still an error); ``"drop_row"`` (drop the reading).
    * ``unsorted``: ``"error"``; ``"sort"`` (stable sort of each asset's readings by time).
    * ``duplicates``: ``"error"``; ``"keep_last"`` (of readings sharing asset and time, keep the
      values of the one that comes last in the file; for the order check it stands where the
      first one stood, so a re-sent reading is not also counted as out of order).
    """

    nan: str = "error"
    unsorted: str = "error"
    duplicates: str = "error"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("nan", NAN_POLICIES),
            ("unsorted", UNSORTED_POLICIES),
            ("duplicates", DUPLICATE_POLICIES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise MaintenanceDataError(
                    f"repair.{name}={value!r}: expected one of {list(allowed)}"
                )


@dataclass
class SensorSchema(YamlConfig):
    """Column roles of a sensor table (YAML: ``SensorSchema.from_yaml(path)``).

    ``sensor_columns`` empty means every column not named in another role. ``time_kind`` is
    ``"cycle"`` (integers) or ``"timestamp"`` (datetimes, or ISO-8601 text); durations of
    timestamped data (RUL, lead times) are measured in ``time_unit`` (``s``, ``m``, ``h``,
    ``D``). ``event_column`` is an optional 0/1 flag, 1 on the reading at which the asset failed.
    """

    asset_column: str
    time_column: str
    sensor_columns: tuple[str, ...] = ()
    time_kind: str = "cycle"
    setting_columns: tuple[str, ...] = ()
    event_column: str | None = None
    time_unit: str = "h"
    repair: RepairPolicy = field(default_factory=RepairPolicy)

    def __post_init__(self) -> None:
        self.sensor_columns = tuple(self.sensor_columns)
        self.setting_columns = tuple(self.setting_columns)
        if isinstance(self.repair, dict):
            self.repair = RepairPolicy(**self.repair)
        if self.time_kind not in TIME_KINDS:
            raise MaintenanceDataError(
                f"time_kind={self.time_kind!r}: expected one of {list(TIME_KINDS)}"
            )
        if self.time_unit not in TIME_UNITS:
            raise MaintenanceDataError(
                f"time_unit={self.time_unit!r}: expected one of {list(TIME_UNITS)}"
            )
        named = [self.asset_column, self.time_column, *self.setting_columns, *self.sensor_columns]
        if self.event_column is not None:
            named.append(self.event_column)
        dup = sorted({c for c in named if named.count(c) > 1})
        if dup:
            raise MaintenanceDataError(f"SensorSchema: columns {dup} are given more than one role")

    def resolve_sensors(self, columns: list[str] | pd.Index) -> tuple[str, ...]:
        """The sensor columns: as declared, or every column without another role."""
        if self.sensor_columns:
            return self.sensor_columns
        taken = {self.asset_column, self.time_column, *self.setting_columns, self.event_column}
        return tuple(str(c) for c in columns if c not in taken)

    @property
    def time_delta(self) -> np.timedelta64:
        """One ``time_unit`` as a timedelta (durations of timestamped data are in this unit)."""
        return np.timedelta64(1, self.time_unit)


@dataclass
class RepairReport:
    """Counts of every repair made while loading one table (all zero: loaded as is)."""

    source: str
    n_rows_in: int
    n_rows_out: int = 0
    duplicate_rows_dropped: int = 0
    assets_sorted: int = 0
    rows_moved: int = 0
    nan_cells_filled: int = 0
    nan_rows_dropped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def any_repairs(self) -> bool:
        return bool(
            self.duplicate_rows_dropped
            or self.assets_sorted
            or self.nan_cells_filled
            or self.nan_rows_dropped
        )

    def to_dict(self) -> dict[str, int | str]:
        return {
            "source": self.source,
            "n_rows_in": self.n_rows_in,
            "n_rows_out": self.n_rows_out,
            "duplicate_rows_dropped": self.duplicate_rows_dropped,
            "assets_sorted": self.assets_sorted,
            "rows_moved": self.rows_moved,
            "nan_cells_filled": self.nan_cells_filled,
            "nan_rows_dropped": self.nan_rows_dropped,
        }

    def summary(self) -> str:
        if not self.any_repairs:
            return f"{self.source}: {self.n_rows_in} rows, no repairs"
        parts = [f"{k}={v}" for k, v in self.to_dict().items() if k != "source" and v]
        return f"{self.source}: repaired ({', '.join(parts)}); " + "; ".join(self.notes)


@dataclass
class SensorTable:
    """A validated table: sorted by asset then time, index 0..n-1, plus what was repaired."""

    frame: pd.DataFrame
    schema: SensorSchema
    sensor_columns: tuple[str, ...]
    report: RepairReport


class _Where:
    """Formats 'file, column, asset, row' for messages (CSV rows also give the file line)."""

    def __init__(self, source: str, csv: bool) -> None:
        self.source = source
        self.csv = csv

    def row(self, r: int) -> str:
        return f"row {r} (line {r + 2})" if self.csv else f"row {r}"

    def __call__(self, column: str | None, asset: object, r: int) -> str:
        col = f", column {column!r}" if column is not None else ""
        return f"{self.source}{col}, asset {show(asset)}, {self.row(r)}"


def load_sensor_table(path: str | Path, schema: SensorSchema) -> SensorTable:
    """Read a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) file and validate it."""
    path = Path(path)
    if not path.exists():
        raise MaintenanceDataError(f"sensor table {path} not found")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            frame, csv = pd.read_parquet(path), False
        elif name.endswith((".csv", ".csv.gz")):
            frame, csv = pd.read_csv(path, low_memory=False), True
        else:
            raise MaintenanceDataError(
                f"{path}: unknown format; expected .csv, .csv.gz, .parquet or .pq"
            )
    except MaintenanceDataError:
        raise
    except Exception as err:  # pyarrow / parser errors: say which file
        raise MaintenanceDataError(
            f"{path}: could not be read ({type(err).__name__}: {err})"
        ) from err
    return validate_sensor_frame(frame, schema, source=str(path), csv=csv)


def validate_sensor_frame(
    frame: pd.DataFrame, schema: SensorSchema, source: str = "<frame>", csv: bool = False
) -> SensorTable:
    """Validate (and repair, per ``schema.repair``) an in-memory sensor table.

    Row numbers in messages are 0-based positions in ``frame`` (for CSV also the file line,
    counting the header as line 1). The result keeps only the schema's columns (asset, time,
    settings, sensors, event flag), sorted by asset then time; sensors and settings are float64.
    """
    where = _Where(source, csv)
    df = frame.reset_index(drop=True)
    sensors = schema.resolve_sensors(df.columns)
    if not sensors:
        raise MaintenanceDataError(f"{source}: no sensor columns (columns: {list(df.columns)})")
    numeric = [*schema.setting_columns, *sensors]
    required = [schema.asset_column, schema.time_column, *numeric]
    if schema.event_column is not None:
        required.append(schema.event_column)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MaintenanceDataError(
            f"{source}: missing column(s) {missing}; the file has {list(map(str, df.columns))}"
        )
    report = RepairReport(source=source, n_rows_in=len(df))
    df = df[required].copy()
    df["__row"] = np.arange(len(df))
    asset = schema.asset_column

    nulls = df[asset].isna().to_numpy()
    if nulls.any():
        r = int(np.argmax(nulls))
        raise MaintenanceDataError(f"{source}, column {asset!r}, {where.row(r)}: missing asset id")
    df[schema.time_column] = _parse_time(df, schema, where)
    for col in numeric:
        df[col] = _to_numeric(df, col, asset, where)
    if schema.event_column is not None:
        df[schema.event_column] = _parse_event_flag(df, schema.event_column, asset, where)

    df = _handle_duplicates(df, schema, where, report)
    df = _handle_order(df, schema, where, report)
    df = _handle_nans(df, schema, numeric, where, report)

    df = df.drop(columns="__row").reset_index(drop=True)
    report.n_rows_out = len(df)
    if report.any_repairs:
        log.warning(report.summary())
    return SensorTable(frame=df, schema=schema, sensor_columns=tuple(sensors), report=report)


def _parse_time(df: pd.DataFrame, schema: SensorSchema, where: _Where) -> pd.Series:
    col, asset = schema.time_column, schema.asset_column
    s = df[col]
    if schema.time_kind == "cycle":
        if pd.api.types.is_bool_dtype(s) or pd.api.types.is_datetime64_any_dtype(s):
            raise MaintenanceDataError(
                f"{where.source}, column {col!r}: expected integer cycles, got {s.dtype}"
            )
        values = pd.to_numeric(s, errors="coerce")
        bad = (
            values.isna()
            | ~np.isfinite(values.fillna(0))
            | (values.fillna(0) != np.round(values.fillna(0)))
        )
        if bad.any():
            r = int(np.argmax(bad.to_numpy()))
            raise MaintenanceDataError(
                f"{where(col, df[asset].iat[r], r)}: cycle {show(s.iat[r])} is not an integer"
            )
        return values.astype(np.int64)
    if pd.api.types.is_datetime64_any_dtype(s):
        values = s
    elif pd.api.types.is_numeric_dtype(s):
        raise MaintenanceDataError(
            f"{where.source}, column {col!r}: numbers where timestamps were expected; give datetimes "
            "or ISO-8601 text, or set time_kind: cycle"
        )
    else:
        try:
            values = pd.to_datetime(s, errors="coerce", format="ISO8601")
        except (ValueError, TypeError) as err:
            raise MaintenanceDataError(
                f"{where.source}, column {col!r}: timestamps could not be parsed ({err}); mixed time "
                "zones? convert them to UTC"
            ) from err
        if not pd.api.types.is_datetime64_any_dtype(values):
            raise MaintenanceDataError(
                f"{where.source}, column {col!r}: timestamps with mixed time zones; convert them to UTC"
            )
    bad = values.isna().to_numpy()
    if bad.any():
        r = int(np.argmax(bad))
        what = "missing timestamp" if pd.isna(s.iat[r]) else f"{show(s.iat[r])} is not a timestamp"
        raise MaintenanceDataError(f"{where(col, df[asset].iat[r], r)}: {what}")
    return values


def _to_numeric(df: pd.DataFrame, col: str, asset: str, where: _Where) -> pd.Series:
    s = df[col]
    if pd.api.types.is_bool_dtype(s):
        return s.astype(np.float64)
    if pd.api.types.is_numeric_dtype(s):
        values = s.astype(np.float64)
    else:
        values = pd.to_numeric(s, errors="coerce")
        text = s.astype(str).str.strip().str.lower()
        bad = (values.isna() & s.notna() & ~text.isin(["", "nan"])).to_numpy()
        if bad.any():
            r = int(np.argmax(bad))
            raise MaintenanceDataError(
                f"{where(col, df[asset].iat[r], r)}: value {show(s.iat[r])} is not numeric"
            )
        values = values.astype(np.float64)
    inf = np.isinf(values.to_numpy())
    if inf.any():
        r = int(np.argmax(inf))
        raise MaintenanceDataError(
            f"{where(col, df[asset].iat[r], r)}: value {show(s.iat[r])} is not finite"
        )
    return values


def _parse_event_flag(df: pd.DataFrame, col: str, asset: str, where: _Where) -> pd.Series:
    s = df[col]
    values = pd.to_numeric(s.astype(object).where(s.notna(), None), errors="coerce")
    bad = (~values.isin([0, 1])).to_numpy()
    if bad.any():
        r = int(np.argmax(bad))
        raise MaintenanceDataError(
            f"{where(col, df[asset].iat[r], r)}: event flag {show(s.iat[r])}; expected 0 or 1 (1 = failed at this reading)"
        )
    return values.astype(np.int8)


def _time_key(s: pd.Series) -> np.ndarray:
    """Times as int64 (nanoseconds since the epoch, UTC, for timestamps): exact order and equality."""
    if not pd.api.types.is_datetime64_any_dtype(s):
        return s.to_numpy(np.int64)
    if s.dt.tz is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    return s.to_numpy("datetime64[ns]").astype(np.int64)


def _handle_duplicates(
    df: pd.DataFrame, schema: SensorSchema, where: _Where, report: RepairReport
) -> pd.DataFrame:
    asset, time = schema.asset_column, schema.time_column
    key = pd.DataFrame({"a": df[asset].to_numpy(), "t": _time_key(df[time])})
    dup_any = key.duplicated(keep=False).to_numpy()
    if not dup_any.any():
        return df
    if schema.repair.duplicates == "error":
        r = int(np.argmax(dup_any))
        same = np.flatnonzero(
            dup_any
            & (key["a"] == key["a"].iat[r]).to_numpy()
            & (key["t"] == key["t"].iat[r]).to_numpy()
        )
        raise MaintenanceDataError(
            f"{where(time, df[asset].iat[r], r)}: time {df[time].iat[r]} appears in rows {same.tolist()}; "
            "expected one reading per asset and time (repair.duplicates: keep_last keeps the last)"
        )
    drop = key.duplicated(keep="last").to_numpy()
    # the kept (last) reading takes the place of the first one: a re-sent reading is a
    # correction, not an out-of-order reading
    first_pos = (
        key.assign(p=np.arange(len(key))).groupby(["a", "t"])["p"].transform("min").to_numpy()
    )
    n_assets = key.loc[drop, "a"].nunique()
    report.duplicate_rows_dropped += int(drop.sum())
    report.notes.append(
        f"dropped {int(drop.sum())} duplicate reading(s) in {n_assets} asset(s), keeping the last of each"
    )
    kept = df.loc[~drop]
    return kept.iloc[np.argsort(first_pos[~drop], kind="stable")]


def _handle_order(
    df: pd.DataFrame, schema: SensorSchema, where: _Where, report: RepairReport
) -> pd.DataFrame:
    asset, time = schema.asset_column, schema.time_column
    t = pd.Series(_time_key(df[time]), index=df.index)
    prev = t.groupby(df[asset], sort=False).shift()
    back = (t < prev).to_numpy()
    if back.any():
        if schema.repair.unsorted == "error":
            i = int(np.argmax(back))
            pos = pd.Series(np.arange(len(df)), index=df.index)
            prev_pos = int(pos.groupby(df[asset], sort=False).shift().iat[i])
            prev_row, prev_time = int(df["__row"].iat[prev_pos]), df[time].iat[prev_pos]
            raise MaintenanceDataError(
                f"{where(time, df[asset].iat[i], int(df['__row'].iat[i]))}: time {df[time].iat[i]} comes "
                f"after {prev_time} ({where.row(prev_row)}); expected each asset's readings in "
                "increasing time order (repair.unsorted: sort sorts them)"
            )
        file_pos = df.groupby(asset, sort=False).cumcount()
        time_pos = t.groupby(df[asset], sort=False).rank(method="first").astype(np.int64) - 1
        moved = int((file_pos != time_pos).sum())
        n_assets = int(df.loc[back, asset].nunique())
        report.assets_sorted += n_assets
        report.rows_moved += moved
        report.notes.append(f"sorted {n_assets} asset(s) by time ({moved} reading(s) moved)")
    order = np.lexsort((_time_key(df[time]), pd.factorize(df[asset], sort=True)[0]))
    return df.iloc[order]


def _handle_nans(
    df: pd.DataFrame, schema: SensorSchema, numeric: list[str], where: _Where, report: RepairReport
) -> pd.DataFrame:
    asset = schema.asset_column
    nan = df[numeric].isna().to_numpy()
    if not nan.any():
        return df

    def first_nan(mask: np.ndarray) -> tuple[int, str]:
        rows = np.flatnonzero(mask.any(axis=1))
        i = rows[np.argmin(df["__row"].to_numpy()[rows])]
        return int(i), numeric[int(np.argmax(mask[i]))]

    policy = schema.repair.nan
    if policy == "error":
        i, col = first_nan(nan)
        raise MaintenanceDataError(
            f"{where(col, df[asset].iat[i], int(df['__row'].iat[i]))}: NaN; expected a number "
            "(repair.nan: ffill or drop_row repairs it)"
        )
    if policy == "drop_row":
        rows = nan.any(axis=1)
        report.nan_rows_dropped += int(rows.sum())
        report.notes.append(
            f"dropped {int(rows.sum())} reading(s) with NaN in {int(nan.any(axis=0).sum())} column(s)"
        )
        return df.loc[~rows]
    filled = df[numeric].groupby(df[asset], sort=False).ffill()
    left = filled.isna().to_numpy()
    if left.any():
        i, col = first_nan(left)
        raise MaintenanceDataError(
            f"{where(col, df[asset].iat[i], int(df['__row'].iat[i]))}: NaN with no earlier reading of this "
            "asset to forward-fill from (repair.nan: drop_row drops such readings)"
        )
    n = int(nan.sum())
    report.nan_cells_filled += n
    report.notes.append(f"forward-filled {n} NaN value(s) from each asset's previous reading")
    df = df.copy()
    df[numeric] = filled
    return df
