"""Each unit's drift from its own start of life, as extra input channels.

C-MAPSS engines start "with different degrees of initial wear and manufacturing variation"
(the dataset's readme), and it shows: on FD001's training units the spread of each sensor's
mean over a unit's first 20 readings is 2.8-10.7x what measurement noise alone would give, and
that baseline correlates with the unit's life (|r| up to 0.3). A model that sees only the last
``window`` readings cannot tell a unit that started high from one that has drifted high, which
is the mid-life case (true RUL 50-100) where most of the test error sits.

``add_drift_channels`` adds, for every kept sensor ``s``, a channel ``s_drift`` = the reading
minus the mean of the unit's first ``readings`` readings. It is *causal*: before a unit has
``readings`` readings the baseline is the mean of those it has so far, so the value at reading t
depends only on readings <= t, and scoring a truncated history gives the same channels as the
same prefix of a longer one (C-MAPSS test units are truncated at the end, never the start).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.windows import unit_time_order

DRIFT_SUFFIX = "_drift"


def drift_names(columns: Sequence[str]) -> list[str]:
    return [f"{c}{DRIFT_SUFFIX}" for c in columns]


def add_drift_channels(
    frame: pd.DataFrame,
    columns: Sequence[str],
    readings: int,
    unit_column: str = "unit",
    time_column: str = "time",
) -> pd.DataFrame:
    """A copy of ``frame`` with ``<col>_drift`` columns added (see module docstring). Rows keep
    their order; each unit's readings are taken in time order whatever order the rows come in."""
    if readings < 1:
        raise MaintenanceDataError(f"unit_baseline_readings={readings}: expected >= 1")
    for col in (unit_column, time_column):
        if col not in frame.columns:
            raise MaintenanceDataError(f"unit baseline: input lacks column {col!r}")
    cols = list(columns)
    out = frame.copy()
    if len(frame) == 0:
        for name in drift_names(cols):
            out[name] = np.zeros(0, np.float64)
        return out
    order = unit_time_order(frame, unit_column, time_column)
    f = frame.iloc[order]
    values_RC = f[cols].to_numpy(np.float64)
    unit = f[unit_column].to_numpy()
    starts = np.r_[True, unit[1:] != unit[:-1]]
    unit_idx = np.cumsum(starts) - 1
    first_row = np.flatnonzero(starts)[unit_idx]
    pos = np.arange(len(f)) - first_row  # 0-based reading number within the unit
    # running sum of each unit's first `readings` readings: readings past that add nothing
    early_RC = np.where((pos < readings)[:, None], values_RC, 0.0)
    csum_RC = np.cumsum(early_RC, axis=0)
    # the running sum just before each unit's first row (0 for the first unit)
    before_RC = np.vstack([np.zeros((1, len(cols))), csum_RC])[first_row]
    baseline_RC = (csum_RC - before_RC) / np.minimum(pos + 1, readings)[:, None]
    drift = np.empty_like(values_RC)
    drift[order] = values_RC - baseline_RC
    out[drift_names(cols)] = drift
    return out
