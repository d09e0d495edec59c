"""Causal denoising of the input sensors, per unit, before windowing.

C-MAPSS sensors carry measurement noise several times larger than the wear drift over a
window; smoothing each (normalised) sensor along its unit's own history lets the model see the
drift. The smoothing is *causal*: the value at a unit's reading t is computed from that unit's
readings at times <= t only, so a window ending at t still reads nothing after t, and scoring a
truncated history gives the same features as the same prefix of a longer one.

Kinds:

* ``ewm``: exponentially weighted mean, ``s_0 = x_0``, ``s_t = alpha * x_t + (1 - alpha) * s_{t-1}``
  (pandas ``ewm(adjust=False)``);
* ``mean``: trailing mean over the last ``window`` readings (fewer at the start of a unit);
* ``none``: off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.windows import unit_time_order
from core.configio import YamlConfig

SMOOTHING_KINDS = ("none", "ewm", "mean")


@dataclass
class InputSmoothingConfig(YamlConfig):
    """``kind``: ``none`` | ``ewm`` (weight ``alpha`` of the newest reading) | ``mean`` (trailing
    mean of the last ``window`` readings). Checked again when applied (``--set`` edits fields)."""

    kind: str = "none"
    alpha: float = 0.3
    window: int = 5

    def __post_init__(self) -> None:
        check_smoothing(self.to_dict())


def check_smoothing(spec: dict[str, Any]) -> None:
    kind = spec.get("kind", "none")
    if kind not in SMOOTHING_KINDS:
        raise MaintenanceDataError(
            f"input_smoothing.kind={kind!r}: expected one of {SMOOTHING_KINDS}"
        )
    if kind == "ewm" and not 0.0 < float(spec.get("alpha", 0.3)) <= 1.0:
        raise MaintenanceDataError(
            f"input_smoothing.alpha={spec.get('alpha')}: expected 0 < alpha <= 1"
        )
    if kind == "mean" and int(spec.get("window", 5)) < 1:
        raise MaintenanceDataError(f"input_smoothing.window={spec.get('window')}: expected >= 1")


def causal_smooth_inputs(
    frame: pd.DataFrame,
    columns: Sequence[str],
    spec: dict[str, Any],
    unit_column: str = "unit",
    time_column: str = "time",
) -> pd.DataFrame:
    """A copy of ``frame`` with ``columns`` smoothed causally within each unit (see module
    docstring). Rows keep their order; the recurrence runs in time order inside each unit,
    whatever order the rows come in."""
    check_smoothing(spec)
    kind = spec.get("kind", "none")
    out = frame.copy()
    if kind == "none" or len(frame) == 0:
        return out
    for col in (unit_column, time_column):
        if col not in frame.columns:
            raise MaintenanceDataError(f"input smoothing: input lacks column {col!r}")
    cols = list(columns)
    order = unit_time_order(frame, unit_column, time_column)
    f = frame.iloc[order]
    g = f[cols].astype(np.float64).groupby(f[unit_column].to_numpy(), sort=False)
    if kind == "ewm":
        smooth = g.transform(lambda s: s.ewm(alpha=float(spec["alpha"]), adjust=False).mean())
    else:
        smooth = g.transform(lambda s: s.rolling(int(spec["window"]), min_periods=1).mean())
    values = np.empty((len(frame), len(cols)), np.float64)
    values[order] = smooth.to_numpy(np.float64)
    out[cols] = values
    return out
