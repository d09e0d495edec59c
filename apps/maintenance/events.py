"""Failure / maintenance events, and cutting each asset's history into runs with RUL labels.

An asset's life is a sequence of *runs*: it runs, then fails (a ``failure`` event) or is
maintained before failing (a ``maintenance`` event, e.g. preventive), and after maintenance it
starts a new run with reset health. A run ends at its closing event; a reading at exactly an
event's time belongs to the run that the event closes. Runs closed by a failure get an exact
RUL at every reading (failure time - reading time); runs closed by maintenance, and the last
open run of each asset, are right-censored: their RUL is unknown and left NaN, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from apps.maintenance.errors import MaintenanceDataError, show
from apps.maintenance.schema import SensorSchema, SensorTable, _parse_time, _time_key, _Where

EVENT_KINDS = ("failure", "maintenance")
RUN_OUTCOMES = ("failure", "maintenance", "open")


@dataclass
class LabelledRuns:
    """``frame``: the sensor table plus ``run_id`` (fleet-wide), ``run_index`` (per asset),
    ``rul`` (float, in cycles or ``schema.time_unit``; NaN in censored runs) and ``run_failed``.
    ``runs``: one row per run with readings: ``run_id, asset, run_index, start, end,
    n_readings, outcome, failure_time``."""

    frame: pd.DataFrame
    runs: pd.DataFrame


def load_events(
    source: str | Path | pd.DataFrame, schema: SensorSchema, kind_column: str = "event"
) -> pd.DataFrame:
    """Read and check an events table: the schema's asset and time columns plus ``kind_column``
    (``failure`` or ``maintenance``). Returns columns ``[asset, time, kind_column]`` sorted by
    asset, time, failure before maintenance."""
    if isinstance(source, pd.DataFrame):
        frame, name, csv = source, "<events frame>", False
    else:
        path = Path(source)
        if not path.exists():
            raise MaintenanceDataError(f"events table {path} not found")
        csv = not path.name.lower().endswith((".parquet", ".pq"))
        frame = pd.read_csv(path) if csv else pd.read_parquet(path)
        name = str(path)
    where = _Where(name, csv)
    asset, time = schema.asset_column, schema.time_column
    missing = [c for c in (asset, time, kind_column) if c not in frame.columns]
    if missing:
        raise MaintenanceDataError(
            f"{name}: missing column(s) {missing}; it has {list(frame.columns)}"
        )
    df = frame[[asset, time, kind_column]].reset_index(drop=True).copy()
    nulls = df[asset].isna().to_numpy()
    if nulls.any():
        raise MaintenanceDataError(
            f"{name}, column {asset!r}, {where.row(int(np.argmax(nulls)))}: missing asset id"
        )
    df[time] = _parse_time(df, schema, where)
    kind = df[kind_column].astype(str).str.strip().str.lower()
    bad = (~kind.isin(EVENT_KINDS) | df[kind_column].isna()).to_numpy()
    if bad.any():
        r = int(np.argmax(bad))
        raise MaintenanceDataError(
            f"{where(kind_column, df[asset].iat[r], r)}: event {show(df[kind_column].iat[r])}; expected one of {list(EVENT_KINDS)}"
        )
    df[kind_column] = kind
    dup = (
        df.assign(_t=_time_key(df[time]))
        .duplicated([asset, "_t", kind_column], keep="first")
        .to_numpy()
    )
    if dup.any():
        r = int(np.argmax(dup))
        raise MaintenanceDataError(
            f"{where(time, df[asset].iat[r], r)}: {kind.iat[r]} event at {df[time].iat[r]} is listed twice"
        )
    order = np.lexsort(
        (
            (kind == "maintenance").to_numpy(),
            _time_key(df[time]),
            pd.factorize(df[asset], sort=True)[0],
        )
    )
    return df.iloc[order].reset_index(drop=True)


def events_from_flags(table: SensorTable, kind_column: str = "event") -> pd.DataFrame:
    """Failure events from the schema's 0/1 ``event_column`` (one per flagged reading)."""
    schema = table.schema
    if schema.event_column is None:
        raise MaintenanceDataError("events_from_flags: the schema has no event_column")
    f = table.frame
    rows = f[f[schema.event_column] == 1]
    return pd.DataFrame(
        {
            schema.asset_column: rows[schema.asset_column].to_numpy(),
            schema.time_column: rows[schema.time_column].to_numpy(),
            kind_column: "failure",
        }
    )


def label_runs(
    table: SensorTable, events: pd.DataFrame, kind_column: str = "event"
) -> LabelledRuns:
    """Split each asset's readings into runs at its events and label RUL (see module docstring).

    ``events`` as returned by :func:`load_events`. Raises when an event names an asset without
    readings, or a failure closes a run without any reading (its lead time could not be scored,
    and a failure must never silently disappear from the metrics).
    """
    schema = table.schema
    asset, time = schema.asset_column, schema.time_column
    f = table.frame.copy()
    known = set(f[asset].unique().tolist())
    unknown = ~events[asset].isin(known).to_numpy()
    if unknown.any():
        r = int(np.argmax(unknown))
        raise MaintenanceDataError(
            f"events, row {r}: asset {show(events[asset].iat[r])} has no readings in {table.report.source}"
        )
    t_all = _time_key(f[time])
    run_index = np.zeros(len(f), dtype=np.int64)
    rul = np.full(len(f), np.nan)
    run_rows = []
    unit = (
        schema.time_delta.astype("timedelta64[ns]").astype(np.int64)
        if schema.time_kind == "timestamp"
        else 1
    )
    ev_by_asset = {a: g for a, g in events.groupby(asset, sort=False)}
    for a, idx in f.groupby(asset, sort=False).indices.items():
        t = t_all[idx]
        ev = ev_by_asset.get(a)
        if ev is None:
            ev = events.iloc[:0]
        ev = ev.iloc[
            np.lexsort(((ev[kind_column] == "maintenance").to_numpy(), _time_key(ev[time])))
        ]
        ev_t = _time_key(ev[time])
        ev_kind = ev[kind_column].to_numpy()
        j = np.searchsorted(
            ev_t, t, side="left"
        )  # readings at an event's time belong to the run it closes
        run_index[idx] = j
        counts = np.bincount(j, minlength=len(ev_t) + 1)
        for k in range(len(ev_t) + 1):
            outcome = ev_kind[k] if k < len(ev_t) else "open"
            if counts[k] == 0:
                if outcome == "failure":
                    raise MaintenanceDataError(
                        f"events: failure of asset {show(a)} at {ev[time].iat[k]} closes a run with no readings "
                        "(nothing to predict from; drop the event or add the readings)"
                    )
                continue
            rows = idx[j == k]
            fail_t = ev_t[k] if outcome == "failure" else None
            if fail_t is not None:
                rul[rows] = (fail_t - t_all[rows]) / unit
            run_rows.append(
                {
                    "asset": a,
                    "run_index": k,
                    "start": f[time].iat[rows[0]],
                    "end": f[time].iat[rows[-1]],
                    "n_readings": len(rows),
                    "outcome": outcome,
                    "failure_time": ev[time].iat[k] if fail_t is not None else None,
                }
            )
    f["run_index"] = run_index
    runs = pd.DataFrame(run_rows)
    runs.insert(0, "run_id", np.arange(len(runs), dtype=np.int64))
    key = pd.MultiIndex.from_arrays([runs["asset"], runs["run_index"]])
    f["run_id"] = runs["run_id"].to_numpy()[
        key.get_indexer(pd.MultiIndex.from_arrays([f[asset], f["run_index"]]))
    ]
    f["rul"] = rul
    f["run_failed"] = ~np.isnan(rul)
    return LabelledRuns(frame=f, runs=runs)
