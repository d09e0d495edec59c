"""Evaluation figures (matplotlib, Agg canvas: no display needed, safe in threads/CI)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from apps.fraud.metrics import ArrayLike, average_precision, label_score_arrays


def pr_curve_figure(
    y: ArrayLike,
    scores: ArrayLike,
    *,
    label: str = "model",
    title: str = "Precision-recall (test)",
    threshold: float | None = None,
) -> Figure:
    """Step precision-recall curve with its average precision and the chance level (fraud
    rate); ``threshold`` (chosen on validation) is marked as a point."""
    y_arr, s_arr = label_score_arrays(y, scores)
    order = np.argsort(-s_arr, kind="mergesort")
    s_sorted, y_sorted = s_arr[order], y_arr[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / max(tps[-1], 1.0)
    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ap = average_precision(y_arr, s_arr)
    ax.step(np.r_[0.0, recall], np.r_[1.0, precision], where="post", label=f"{label} (AP {ap:.3f})")
    ax.axhline(
        y_arr.mean(),
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"chance ({y_arr.mean():.4f})",
    )
    if threshold is not None:
        alert = s_arr >= threshold
        tp = float((alert & (y_arr == 1)).sum())
        p = tp / alert.sum() if alert.any() else 1.0
        ax.plot([tp / y_arr.sum()], [p], "o", color="C3", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
            FigureCanvasAgg(fig)
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def pr_curves_figure(
    y: ArrayLike,
    curves: dict[str, ArrayLike],
    *,
    title: str = "Precision-recall (test)",
    thresholds: dict[str, float] | None = None,
) -> Figure:
    """Several models' precision-recall curves on the same labels, on one plot (e.g. the
    backbone and the LightGBM baseline), each with its average precision; ``thresholds``
    (chosen on validation) are marked as points."""
    names = list(curves)
    if not names:
        raise ValueError("pr_curves_figure needs at least one curve")
    first = names[0]
    fig = pr_curve_figure(
        y, curves[first], label=first, title=title, threshold=(thresholds or {}).get(first)
    )
    ax = fig.axes[0]
    for i, name in enumerate(names[1:], start=1):
        y_arr, s_arr = label_score_arrays(y, curves[name])
        order = np.argsort(-s_arr, kind="mergesort")
        s_sorted, y_sorted = s_arr[order], y_arr[order]
        last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
        tps = np.cumsum(y_sorted)[last]
        precision, recall = tps / (last + 1), tps / max(tps[-1], 1.0)
        ap = average_precision(y_arr, s_arr)
        ax.step(
            np.r_[0.0, recall],
            np.r_[1.0, precision],
            where="post",
            color=f"C{i}",
            label=f"{name} (AP {ap:.3f})",
        )
        thr = (thresholds or {}).get(name)
        if thr is not None:
            alert = s_arr >= thr
            tp = float((alert & (y_arr == 1)).sum())
            p = tp / alert.sum() if alert.any() else 1.0
            ax.plot([tp / y_arr.sum()], [p], "s", color=f"C{i}")
    ax.legend(loc="upper right", fontsize=8)
    return fig
