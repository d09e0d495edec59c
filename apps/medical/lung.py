"""Lung-field segmentation from HU by thresholding and connected components (no model).

Used to restrict candidate search to the lungs and to check the synthetic generator. It
imports only numpy/scipy, so it is cheap to use outside MONAI pipelines
(:class:`apps.medical.transforms.LungMaskd` wraps it for dictionaries).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from apps.medical.errors import MedicalDataError


def lung_mask(
    hu_ZYX: np.ndarray,
    spacing_zyx: Sequence[float],
    threshold_hu: float = -320.0,
    min_fraction: float = 0.2,
    max_components: int = 2,
    min_volume_ml: float = 20.0,
    closing_mm: float = 10.0,
    workers: int | None = None,
) -> np.ndarray:
    """Boolean lung field: air below ``threshold_hu``, connected components (6-neighbour),
    dropping those touching the in-plane image border (air around the body; the z faces are
    allowed because a scan may cut through the lungs), keeping the largest
    ``max_components`` with at least ``min_fraction`` of the largest's volume. Then, slice
    by slice and per 2-D component (so the two lungs are never bridged), a morphological
    closing with a disc of ``closing_mm`` takes back juxta-pleural nodules (which notch the
    pleura), and holes are filled so vessels and nodules inside the lungs are included.

    The slice-by-slice part is most of the cost, and scipy's labelling and distance
    transforms release the GIL for much of it, so slices run on ``workers`` threads
    (default: the usable cores, at most 8); each slice is computed exactly as in a serial
    loop. On a 200x240x240 grid (2 cores): 1.07 s serial with ``binary_fill_holes``,
    0.62 s with :func:`fill_holes_2d`, 0.43 s on 2 threads.
    """
    hu = np.asarray(hu_ZYX)
    if hu.ndim != 3:
        raise MedicalDataError(f"lung_mask: expected a [Z, Y, X] HU array, got shape {hu.shape}")
    labels, n = ndimage.label(hu < threshold_hu)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    sizes[0] = 0
    border = np.unique(
        np.concatenate(
            [
                labels[:, 0, :].ravel(),
                labels[:, -1, :].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    sizes[border] = 0
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    order = np.argsort(sizes)[::-1][:max_components]
    keep = [
        int(i)
        for i in order
        if sizes[i] > 0
        and sizes[i] >= min_fraction * sizes[order[0]]
        and sizes[i] * voxel_ml >= min_volume_ml
    ]
    mask = np.isin(labels, keep)
    spacing_yx = (float(spacing_zyx[1]), float(spacing_zyx[2]))

    def finish_slice(z: int) -> None:
        if mask[z].any():
            if closing_mm > 0:
                mask[z] = _close_components_2d(mask[z], spacing_yx, closing_mm)
            mask[z] = fill_holes_2d(mask[z])

    n_workers = workers if workers is not None else min(8, _usable_cores())
    if n_workers <= 1:
        for z in range(mask.shape[0]):
            finish_slice(z)
    else:  # each task writes only its own slice
        with ThreadPoolExecutor(n_workers) as pool:
            list(pool.map(finish_slice, range(mask.shape[0])))
    return mask


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # honours taskset / container CPU sets (Linux)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fill_holes_2d(mask_YX: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` (4-connected background) by one labelling of the
    background instead of its iterated dilation, which was the slowest step of the mask:
    a hole is a background component that does not touch the image border."""
    labels, n = ndimage.label(~mask_YX)
    if n == 0:
        return mask_YX.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    outside[0] = True  # label 0 is the mask itself
    return mask_YX | ~outside[labels]


def _close_components_2d(
    mask_YX: np.ndarray, spacing_yx: tuple[float, float], radius_mm: float
) -> np.ndarray:
    """Closing (dilate then erode by a disc, via distance transforms) of each 2-D component
    on its own, so that closing never fuses two separate components."""
    labels, n = ndimage.label(mask_YX)
    out = mask_YX.copy()
    pad = [int(np.ceil(radius_mm / s)) + 2 for s in spacing_yx]
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        (y0, y1), (x0, x1) = ((box[0].start, box[0].stop), (box[1].start, box[1].stop))
        # pad with zeros beyond the image edge too, so the erosion sees background there
        comp = np.pad(labels[y0:y1, x0:x1] == i, ((pad[0], pad[0]), (pad[1], pad[1])))
        dilated = ndimage.distance_transform_edt(~comp, sampling=spacing_yx) <= radius_mm
        closed = ndimage.distance_transform_edt(dilated, sampling=spacing_yx) > radius_mm
        closed = closed[pad[0] : pad[0] + (y1 - y0), pad[1] : pad[1] + (x1 - x0)]
        out[y0:y1, x0:x1] |= closed
    return out
