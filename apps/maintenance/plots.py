"""Figures for reports and MLflow: RUL trajectories with alarms, lead-time distribution.

Figures are built with the object API on an Agg canvas (no pyplot state, no display needed),
so they are safe in tests, servers and worker processes; the caller saves or logs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from apps.maintenance.errors import MaintenanceDataError, show

if TYPE_CHECKING:
    from apps.maintenance.alarms import AlarmPolicy


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_rul_trajectories(
    traj: pd.DataFrame,
    units: Sequence[object] | None = None,
    policy: AlarmPolicy | None = None,
    max_units: int = 4,
    time_label: str = "cycle",
    unit: str = "unit",
    time: str = "time",
    pred: str = "rul_pred",
    true: str = "rul_true",
) -> Figure:
    """Predicted vs true RUL over time for a few units (default: the first ``max_units``), one
    panel each; with ``policy`` the first alarm is marked by a vertical line and the policy
    threshold by a dotted horizontal line."""
    missing = [c for c in (unit, time, pred, true) if c not in traj.columns]
    if missing:
        raise MaintenanceDataError(f"plot_rul_trajectories: missing column(s) {missing}")
    chosen = list(units) if units is not None else list(pd.unique(traj[unit]))[:max_units]
    if not chosen:
        raise MaintenanceDataError("plot_rul_trajectories: no units to plot")
    ncols = min(2, len(chosen))
    nrows = int(np.ceil(len(chosen) / ncols))
    fig = _figure(5.0 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, u in zip(axes, chosen, strict=False):
        g = traj[traj[unit] == u].sort_values(time)
        if g.empty:
            raise MaintenanceDataError(f"plot_rul_trajectories: unit {show(u)} not in the frame")
        ax.plot(g[time], g[true], color="black", lw=1.5, label="true RUL")
        ax.plot(g[time], g[pred], color="tab:blue", lw=1.2, label="predicted RUL")
        if policy is not None:
            ax.axhline(
                policy.horizon,
                color="tab:orange",
                ls=":",
                lw=1,
                label=f"threshold {policy.horizon:g}",
            )
            first = policy.first_alarm(g[pred].to_numpy())
            if first is not None:
                ax.axvline(
                    g[time].iloc[first],
                    color="tab:red",
                    ls="--",
                    lw=1.2,
                    label=f"alarm (k={policy.k})",
                )
        if pd.api.types.is_datetime64_any_dtype(g[time]):
            locator = AutoDateLocator(maxticks=6)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.set_title(f"unit {u}")
        ax.set_xlabel(time_label)
        ax.set_ylabel("RUL")
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    return fig


def plot_lead_time_histogram(
    lead_times: pd.DataFrame | np.ndarray | Sequence[float],
    bins: int = 20,
    time_label: str = "cycles",
) -> Figure:
    """Histogram of lead times (a per-unit table from ``lead_time_metrics`` or an array).
    Missed failures (lead 0) are included and their count is given in the title."""
    if isinstance(lead_times, pd.DataFrame):
        values = lead_times["lead_time"].to_numpy(np.float64)
    else:
        values = np.asarray(lead_times, dtype=np.float64)
    if values.size == 0:
        raise MaintenanceDataError("plot_lead_time_histogram: no lead times")
    fig = _figure(6.0, 3.5)
    ax = fig.subplots()
    ax.hist(values, bins=bins, color="tab:blue", edgecolor="white")
    ax.axvline(
        float(np.median(values)),
        color="black",
        ls="--",
        lw=1,
        label=f"median {np.median(values):.1f}",
    )
    ax.set_xlabel(f"lead time ({time_label})")
    ax.set_ylabel("failures")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"lead time, {values.size} failures, {int((values == 0).sum())} missed (lead 0)")
    ax.legend(fontsize=8)
    return fig
