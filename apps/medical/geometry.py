"""Voxel <-> world (patient LPS, mm) mapping shared by the reader, transforms and candidates.

Arrays are indexed ``[z, y, x]`` (slice, row, column) while world points are ``(x, y, z)``
in DICOM's patient frame (LPS: +x to the patient's left, +y posterior, +z head). One 4x4
affine maps a homogeneous index ``(z, y, x, 1)`` to ``(x, y, z, 1)``; it is the same matrix
a MONAI ``MetaTensor`` of shape ``[C, Z, Y, X]`` carries, so resampling and cropping in MONAI
keep candidate coordinates mappable to world millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def make_affine(
    spacing_zyx: Sequence[float], origin_xyz: Sequence[float], direction: np.ndarray
) -> np.ndarray:
    """Affine for index ``(z, y, x)`` -> world ``(x, y, z)``.

    ``direction`` is ITK-style: its columns are the world unit vectors of the voxel x
    (column), y (row) and z (slice) axes.
    """
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    affine = np.eye(4)
    affine[:3, 0] = direction[:, 2] * sz
    affine[:3, 1] = direction[:, 1] * sy
    affine[:3, 2] = direction[:, 0] * sx
    affine[:3, 3] = np.asarray(origin_xyz, dtype=np.float64)
    return affine


def split_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Inverse of :func:`make_affine`: ``(spacing_zyx, origin_xyz, direction)``."""
    affine = np.asarray(affine, dtype=np.float64)
    cols = affine[:3, :3]
    spacing_zyx = np.linalg.norm(cols, axis=0)
    direction = np.stack(
        [cols[:, 2] / spacing_zyx[2], cols[:, 1] / spacing_zyx[1], cols[:, 0] / spacing_zyx[0]],
        axis=1,
    )
    return tuple(spacing_zyx.tolist()), tuple(affine[:3, 3].tolist()), direction


def index_to_world(affine: np.ndarray, zyx: np.ndarray | Sequence[float]) -> np.ndarray:
    """Map index coordinates ``(..., 3)`` in ``(z, y, x)`` order to world ``(x, y, z)`` mm."""
    affine = np.asarray(affine, dtype=np.float64)
    pts = np.asarray(zyx, dtype=np.float64)
    return pts @ affine[:3, :3].T + affine[:3, 3]


def world_to_index(affine: np.ndarray, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
    """Map world ``(..., 3)`` ``(x, y, z)`` mm to fractional ``(z, y, x)`` indices."""
    affine = np.asarray(affine, dtype=np.float64)
    pts = np.asarray(xyz, dtype=np.float64)
    flat = pts.reshape(-1, 3) - affine[:3, 3]
    return np.linalg.solve(affine[:3, :3], flat.T).T.reshape(pts.shape)
