"""Causal sliding windows over each unit's readings.

For every unit and every reading time t, the window holds the last ``W`` readings of that unit
ending at t (rows t-W+1..t, in time order). Readings after t are never in it, so a model fed
the window at t predicts only from the past. Early in a unit's life (fewer than W readings so
far) the window is left-padded with ``pad_value`` and the padding is marked in ``mask``.
Windows count readings, not clock time: a gap in a unit's readings is not filled.

Layout (``x_NWC``, ``mask_NW``) is what ``core.adapters.PatchEmbed1d`` consumes: x is
``[B, L, C]`` with L = W, and ``mask`` uses core's convention, **True marks padding**.
:func:`patch_padding_mask` gives the token mask that ``PatchEmbed1d.forward_with_mask``
derives from it (pass ``mask`` as its ``padding_mask_BL``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from apps.maintenance.errors import MaintenanceDataError, show


@dataclass
class WindowSet:
    """Windows and what each one is about.

    ``x``: [N, W, C] float32, padded steps hold ``pad_value``. ``mask``: [N, W] bool, True on
    padded steps. ``rul``: [N] float32 target at the window's last step (NaN without target).
    ``unit``/``time``: the unit and the time of the window's last step.
    """

    x: np.ndarray
    mask: np.ndarray
    rul: np.ndarray
    unit: np.ndarray
    time: np.ndarray
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.x)


def unit_time_order(frame: pd.DataFrame, unit_column: str, time_column: str) -> np.ndarray:
    """Row positions that put ``frame`` in unit order, then time order within each unit: the
    order every causal per-unit transform walks (windows, input smoothing, drift channels).
    Times are ranked first, which also orders tz-aware timestamps."""
    time_key = frame[time_column].rank(method="dense").to_numpy()
    return np.lexsort((time_key, pd.factorize(frame[unit_column], sort=True)[0]))


def build_windows(
    frame: pd.DataFrame,
    feature_columns: Sequence[str],
    window: int,
    unit_column: str = "unit",
    time_column: str = "cycle",
    target_column: str | None = "rul",
    last_only: bool = False,
    stride: int = 1,
    pad_value: float = 0.0,
) -> WindowSet:
    """Causal windows for every reading (or every ``stride``-th, always keeping each unit's last
    reading), or only each unit's last reading with ``last_only`` (the C-MAPSS test protocol).

    Rows are ordered by unit then time first (times must be unique within a unit); the window
    at t only ever contains rows of the same unit with time <= t.
    """
    if window < 1:
        raise MaintenanceDataError(f"window={window}: expected >= 1")
    if stride < 1:
        raise MaintenanceDataError(f"stride={stride}: expected >= 1")
    cols = list(feature_columns)
    needed = [unit_column, time_column, *cols] + ([target_column] if target_column else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise MaintenanceDataError(f"build_windows: missing column(s) {missing}")
    if len(frame) == 0:
        raise MaintenanceDataError("build_windows: the frame has no rows")
    order = unit_time_order(frame, unit_column, time_column)
    f = frame.iloc[order]
    unit = f[unit_column].to_numpy()
    time = f[time_column].to_numpy()
    starts = np.r_[True, unit[1:] != unit[:-1]]
    same = ~starts[1:]
    if (time[1:][same] == time[:-1][same]).any():
        i = int(np.flatnonzero((time[1:] == time[:-1]) & same)[0]) + 1
        raise MaintenanceDataError(
            f"build_windows: unit {show(unit[i])} has two readings at time {time[i]}"
        )
    values_RC = f[cols].to_numpy(dtype=np.float32)
    if not np.isfinite(values_RC).all():
        r, c = np.argwhere(~np.isfinite(values_RC))[0]
        raise MaintenanceDataError(
            f"build_windows: column {cols[c]!r}, unit {show(unit[r])}, time {time[r]}: non-finite value"
        )
    target = (
        f[target_column].to_numpy(np.float32)
        if target_column
        else np.full(len(f), np.nan, np.float32)
    )

    n_rows = len(f)
    unit_idx = np.cumsum(starts) - 1  # ordinal of each row's unit
    # one shared padded buffer: every unit gets W-1 pad rows in front of its own rows
    pad = window - 1
    padded_pos = np.arange(n_rows) + (unit_idx + 1) * pad  # row r sits here in the buffer
    n_units = int(unit_idx[-1]) + 1
    buf_PC = np.full((n_rows + pad * n_units, len(cols)), pad_value, np.float32)
    buf_mask_P = np.ones(len(buf_PC), dtype=bool)
    buf_PC[padded_pos] = values_RC
    buf_mask_P[padded_pos] = False

    last = np.r_[starts[1:], True]  # last row of each unit
    if last_only:
        keep = np.flatnonzero(last)
    else:
        # rows counted back from each unit's last row; keep every stride-th, including the last
        end_idx = np.flatnonzero(last)[unit_idx]
        keep = np.flatnonzero((end_idx - np.arange(n_rows)) % stride == 0)
    first = padded_pos[keep] - pad  # start of the window ending at row `keep`
    views_PCW = sliding_window_view(buf_PC, window, axis=0)  # [P-W+1, C, W], no copy
    x_NWC = np.ascontiguousarray(views_PCW[first].transpose(0, 2, 1))
    mask_NW = sliding_window_view(buf_mask_P, window)[first].copy()
    return WindowSet(
        x=x_NWC,
        mask=mask_NW,
        rul=target[keep],
        unit=unit[keep],
        time=time[keep],
        feature_names=tuple(cols),
    )


def patch_padding_mask(mask_NW: np.ndarray, patch_len: int, cls_token: bool = True) -> np.ndarray:
    """Token padding mask matching ``PatchEmbed1d.forward_with_mask``: a patch is padding when
    all its steps are; when ``W % patch_len != 0`` the window is left-padded to whole patches
    (as core does), so the last patch always ends at the latest step. With ``cls_token`` a
    leading False column stands for the CLS token. Returns [N, (1 +) ceil(W / patch_len)] bool,
    True = padding. (Choosing W = k * patch_len wastes no token on padding.)
    """
    if patch_len < 1:
        raise MaintenanceDataError(f"patch_len={patch_len}: expected >= 1")
    n, w = mask_NW.shape
    left = (-w) % patch_len
    full_NL = np.concatenate([np.ones((n, left), dtype=bool), mask_NW.astype(bool)], axis=1)
    patches = full_NL.reshape(n, (w + left) // patch_len, patch_len).all(axis=2)
    if cls_token:
        patches = np.concatenate([np.zeros((n, 1), dtype=bool), patches], axis=1)
    return patches
