"""Probability map -> nodule candidates in world mm (LUNA16 submission rows).

A detector (voxel-wise segmentation or one score per 3-D patch token) yields a map on some
grid; LUNA16 scores points in world millimetres. This module finds local maxima, removes
near-duplicates with a greedy 3-D non-maximum suppression in millimetres (so anisotropic
voxels are handled), and maps the survivors through the grid's affine (index ``(z, y, x)``
-> LPS ``(x, y, z)``; see :mod:`apps.medical.geometry`). A patch grid gets its affine from
:func:`patch_grid_affine`.

At most ``max_candidates`` (default 100, LUNA16's per-scan cap) are returned per scan,
highest probability first; submitting more is pointless because the evaluation drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from apps.medical.errors import CandidateError
from apps.medical.froc import CANDIDATE_COLUMNS, MAX_CANDIDATES_PER_SCAN
from apps.medical.geometry import index_to_world


def patch_grid_affine(
    voxel_affine: np.ndarray,
    patch_size_zyx: Sequence[int],
    offset_zyx: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Affine of a patch-token grid: patch ``(a, b, c)`` -> world centre of its voxels.

    Patch ``a`` along z covers voxels ``[off + a*pz, off + (a+1)*pz)``, whose centre index is
    ``off + a*pz + (pz-1)/2`` (``off``: where the patch grid starts, e.g. a crop origin).
    """
    pz, py, px = (int(p) for p in patch_size_zyx)
    if min(pz, py, px) < 1:
        raise CandidateError(f"patch_size_zyx={tuple(patch_size_zyx)}; expected positive integers")
    scale = np.eye(4)
    scale[:3, :3] = np.diag([pz, py, px])
    scale[:3, 3] = np.asarray(offset_zyx, dtype=np.float64) + (np.array([pz, py, px]) - 1) / 2.0
    return np.asarray(voxel_affine, dtype=np.float64) @ scale


def local_maxima(
    prob_ZYX: np.ndarray, radius_vox: Sequence[int], threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(zyx [N, 3] int, values [N])`` of voxels that equal the maximum of their box
    neighbourhood (half-sizes ``radius_vox``) and reach ``threshold``; sorted by value desc.
    Plateaus give several maxima: :func:`nms_world` removes the duplicates."""
    size = tuple(2 * int(r) + 1 for r in radius_vox)
    peak = ndimage.maximum_filter(prob_ZYX, size=size, mode="constant", cval=-np.inf)
    is_max = (prob_ZYX == peak) & (prob_ZYX >= threshold)
    zyx = np.argwhere(is_max)
    values = prob_ZYX[is_max]  # argwhere and boolean indexing share C order
    order = np.argsort(-values, kind="stable")
    return zyx[order], values[order]


def nms_world(
    points_xyz: np.ndarray, scores: np.ndarray, radius_mm: float, limit: int | None = None
) -> np.ndarray:
    """Greedy NMS: indices of kept points, best first; a point is dropped when a kept
    higher-scoring point lies within ``radius_mm`` (Euclidean, world mm)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: list[int] = []
    kept_xyz = np.empty((0, 3))
    r2 = radius_mm * radius_mm
    for i in order:
        if limit is not None and len(kept) >= limit:
            break
        p = points_xyz[i]
        if len(kept) and np.min(np.sum((kept_xyz - p) ** 2, axis=1)) < r2:
            continue
        kept.append(int(i))
        kept_xyz = np.vstack([kept_xyz, p])
    return np.asarray(kept, dtype=np.int64)


def _refine(prob_ZYX: np.ndarray, zyx: np.ndarray) -> np.ndarray:
    """Sub-voxel peak position: per axis, the vertex of a parabola through the log
    probabilities at -1, 0, +1 (exact for a Gaussian-shaped peak), clamped to +/- 0.5 voxel;
    a plain parabola where a neighbour is <= 0, no shift at the image border."""
    out = zyx.astype(np.float64)
    shape = prob_ZYX.shape
    for n, c in enumerate(zyx):
        for axis in range(3):
            if c[axis] == 0 or c[axis] == shape[axis] - 1:
                continue
            lo, hi = c.copy(), c.copy()
            lo[axis] -= 1
            hi[axis] += 1
            f = np.array(
                [prob_ZYX[tuple(lo)], prob_ZYX[tuple(c)], prob_ZYX[tuple(hi)]], dtype=np.float64
            )
            if np.all(f > 0):
                f = np.log(f)
            curvature = f[0] - 2 * f[1] + f[2]
            if curvature < 0:
                out[n, axis] += float(np.clip(0.5 * (f[0] - f[2]) / curvature, -0.5, 0.5))
    return out


def probability_map_to_candidates(
    prob_ZYX: np.ndarray,
    affine: np.ndarray,
    seriesuid: str,
    threshold: float = 0.1,
    nms_radius_mm: float = 5.0,
    max_candidates: int = MAX_CANDIDATES_PER_SCAN,
    refine: bool = False,
    pre_nms_limit: int = 20000,
) -> pd.DataFrame:
    """LUNA16 rows ``seriesuid, coordX, coordY, coordZ, probability`` from a probability map.

    ``affine``: index ``(z, y, x)`` -> LPS ``(x, y, z)`` of the map's grid (a volume's
    ``.affine``, a MetaTensor's affine after resampling, or :func:`patch_grid_affine`).
    Candidates are the local maxima of the 26-neighbourhood reaching ``threshold`` (the best
    ``pre_nms_limit`` of them); greedy NMS then keeps points at least ``nms_radius_mm``
    apart in world mm. ``refine``: sub-voxel peak position (parabola through the log probabilities).
    """
    prob = np.asarray(prob_ZYX)
    if prob.ndim == 4 and prob.shape[0] == 1:
        prob = prob[0]
    if prob.ndim != 3:
        raise CandidateError(
            f"probability map of shape {prob.shape}; expected [Z, Y, X] (or [1, Z, Y, X])"
        )
    if not np.all(np.isfinite(prob)):
        bad = tuple(int(v) for v in np.argwhere(~np.isfinite(prob))[0])
        raise CandidateError(f"probability map has a non-finite value at voxel (z, y, x)={bad}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise CandidateError(
            f"affine of shape {affine.shape}; expected 4x4 (index zyx -> world xyz)"
        )
    if nms_radius_mm < 0:
        raise CandidateError(f"nms_radius_mm={nms_radius_mm}; expected >= 0")
    zyx, values = local_maxima(prob.astype(np.float64), (1, 1, 1), threshold)
    zyx, values = zyx[:pre_nms_limit], values[:pre_nms_limit]
    coords = _refine(prob, zyx) if refine and len(zyx) else zyx.astype(np.float64)
    xyz = index_to_world(affine, coords) if len(coords) else np.empty((0, 3))
    keep = nms_world(
        xyz, values, nms_radius_mm, limit=max_candidates if max_candidates > 0 else None
    )
    frame = pd.DataFrame(
        {
            "seriesuid": [str(seriesuid)] * len(keep),
            "coordX": xyz[keep, 0] if len(keep) else np.empty(0),
            "coordY": xyz[keep, 1] if len(keep) else np.empty(0),
            "coordZ": xyz[keep, 2] if len(keep) else np.empty(0),
            "probability": values[keep].astype(np.float64) if len(keep) else np.empty(0),
        }
    )
    return frame[CANDIDATE_COLUMNS]


def concat_candidates(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One submission frame from per-scan frames (empty frames allowed)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(
            {c: pd.Series(dtype=str if c == "seriesuid" else float) for c in CANDIDATE_COLUMNS}
        )
    return pd.concat([f[CANDIDATE_COLUMNS] for f in frames], ignore_index=True)
