"""PNG-ready figures of findings on CT slices (Agg canvas, no pyplot state: safe in servers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from apps.medical.geometry import split_affine, world_to_index

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_findings(
    hu_ZYX: np.ndarray,
    affine: np.ndarray,
    candidates: pd.DataFrame,
    top: int = 4,
    truth: pd.DataFrame | None = None,
    window_hu: tuple[float, float] = (-1000.0, 400.0),
    title: str = "",
) -> Figure:
    """One axial slice per top candidate (highest probability first), with the candidate
    (red circle, probability) and any annotated nodule on that slice (green square).
    No patient identity is drawn: only a title given by the caller and probabilities."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cands = candidates.dropna(subset=["coordX"]).sort_values("probability", ascending=False)
    cands = cands.head(max(top, 1))
    n = max(len(cands), 1)
    fig = Figure(figsize=(3.2 * n, 3.4))
    FigureCanvasAgg(fig)
    spacing, _, _ = split_affine(affine)
    aspect = spacing[1] / spacing[2]
    lo, hi = window_hu
    if not len(cands):
        ax = fig.add_subplot(1, 1, 1)
        mid = hu_ZYX.shape[0] // 2
        ax.imshow(hu_ZYX[mid], cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        ax.set_title("no candidates")
        ax.axis("off")
    for i, row in enumerate(cands.itertuples()):
        z, y, x = world_to_index(affine, [row.coordX, row.coordY, row.coordZ])
        k = int(np.clip(round(z), 0, hu_ZYX.shape[0] - 1))
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(hu_ZYX[k], cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        ax.scatter([x], [y], s=300, facecolors="none", edgecolors="red", linewidths=1.5)
        if truth is not None and len(truth):
            t = truth[truth["seriesuid"] == row.seriesuid]
            if len(t):
                idx = world_to_index(affine, t[["coordX", "coordY", "coordZ"]].to_numpy(float))
                on = np.abs(idx.reshape(-1, 3)[:, 0] - k) <= 1.0
                ax.scatter(
                    idx.reshape(-1, 3)[on, 2],
                    idx.reshape(-1, 3)[on, 1],
                    s=500,
                    marker="s",
                    facecolors="none",
                    edgecolors="lime",
                    linewidths=1.0,
                )
        ax.set_title(f"#{i + 1} p={row.probability:.2f} slice {k}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
