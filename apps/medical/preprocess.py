"""CT volume -> model input: resample to a common spacing, HU window, lung mask (numpy only).

Same steps as the MONAI dict transforms in :mod:`apps.medical.transforms`
(``ResampleToSpacingd`` -> ``LungMaskd`` -> ``HUWindowd``), written on numpy/scipy so the
predictor and the GPU bench run where MONAI and pydicom are not installed. The output keeps
an exact index ``(z, y, x)`` -> LPS ``(x, y, z)`` affine (direction cosines kept, only voxel
sizes change), so every candidate found on the resampled grid maps back to world mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from apps.medical.errors import MedicalDataError
from apps.medical.geometry import split_affine
from apps.medical.lung import lung_mask


@dataclass(eq=False)
class Scan:
    """A CT series in HU with its affine (duck-types the reader's ``CTVolume``)."""

    array: np.ndarray = field(repr=False)  # [Z, Y, X] HU
    affine: np.ndarray = field(repr=False)  # index (z, y, x) -> LPS (x, y, z)
    series_uid: str


@dataclass(eq=False)
class PreparedScan:
    """Model-ready volume on the common grid.

    ``image``: float32 ``[Z, Y, X]`` in [0, 1] (HU window), 0 outside the dilated lung
    field; ``lung``: bool mask of the dilated lung field (where candidates may lie);
    ``affine``: index -> LPS mm of this resampled grid.
    """

    image: np.ndarray = field(repr=False)
    lung: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    seriesuid: str


def resample(
    hu_ZYX: np.ndarray, affine: np.ndarray, spacing_zyx: Sequence[float], order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Resample to ``spacing_zyx`` mm keeping voxel 0's centre and the direction cosines.

    New voxel ``i`` sits at old fractional index ``i * new / old`` on each axis; the grid
    covers the old extent (``floor((n - 1) * old / new) + 1`` voxels). Linear by default.
    """
    old, _, _ = split_affine(affine)
    scale = np.asarray(spacing_zyx, dtype=np.float64) / np.asarray(old)
    shape = tuple(
        int(np.floor((n - 1) / s + 1e-6)) + 1 for n, s in zip(hu_ZYX.shape, scale, strict=True)
    )
    if np.allclose(scale, 1.0):
        out = np.asarray(hu_ZYX, dtype=np.float32)
    else:
        out = ndimage.affine_transform(
            np.asarray(hu_ZYX, dtype=np.float32),
            scale,
            output_shape=shape,
            order=order,
            mode="nearest",
        )
    new_affine = np.asarray(affine, dtype=np.float64).copy()
    new_affine[:3, :3] = new_affine[:3, :3] * scale[None, :]
    return out.astype(np.float32, copy=False), new_affine


def resample_torch(
    hu_ZYX: np.ndarray, affine: np.ndarray, spacing_zyx: Sequence[float], device: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resample` (linear, edge values beyond the border) computed with
    ``grid_sample`` on ``device``: the same grid and affine, equal up to float32 rounding.
    Used for whole-scan inference on a GPU, where scipy's single-threaded interpolation of
    a 512x512x300 volume would cost more than the network."""
    import torch
    import torch.nn.functional as F

    old, _, _ = split_affine(affine)
    scale = np.asarray(spacing_zyx, dtype=np.float64) / np.asarray(old)
    shape = tuple(
        int(np.floor((n - 1) / s + 1e-6)) + 1 for n, s in zip(hu_ZYX.shape, scale, strict=True)
    )
    x = torch.as_tensor(np.asarray(hu_ZYX, dtype=np.float32)).to(device)[None, None]
    axes = [
        (torch.arange(m, device=device, dtype=torch.float64) * s / max(n - 1, 1) * 2 - 1).float()
        for m, s, n in zip(shape, scale, hu_ZYX.shape, strict=True)
    ]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([xx, yy, zz], dim=-1)[None]  # grid_sample wants (x, y, z) = (W, H, D)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    new_affine = np.asarray(affine, dtype=np.float64).copy()
    new_affine[:3, :3] = new_affine[:3, :3] * scale[None, :]
    return out[0, 0].cpu().numpy(), new_affine


def dilate_mm(mask_ZYX: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float, device: str):
    """``distance_transform_edt(~mask, sampling) <= radius_mm`` as a convolution with the
    voxel ball of that radius on ``device`` (identical sets: a voxel is kept when a mask
    voxel lies within ``radius_mm`` of it)."""
    import torch
    import torch.nn.functional as F

    sp = np.asarray(spacing_zyx, dtype=np.float64)
    r = np.floor(radius_mm / sp + 1e-9).astype(int)
    zz, yy, xx = np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij")
    ball = ((zz * sp[0]) ** 2 + (yy * sp[1]) ** 2 + (xx * sp[2]) ** 2) <= radius_mm**2 + 1e-9
    k = torch.as_tensor(ball.astype(np.float32), device=device)[None, None]
    m = torch.as_tensor(mask_ZYX.astype(np.float32)).to(device)[None, None]
    out = F.conv3d(m, k, padding=tuple(int(v) for v in r))[0, 0] > 0.5
    return out.cpu().numpy()


def prepare_scan(
    scan: Scan,
    spacing_zyx: Sequence[float],
    window_hu: tuple[float, float] = (-1000.0, 400.0),
    use_lung_mask: bool = True,
    lung_margin_mm: float = 8.0,
    device: str | None = None,
) -> PreparedScan:
    """Resample, lung-mask (dilated by ``lung_margin_mm`` so juxta-pleural nodules stay in)
    and window one scan. When no lung field is found (not a chest CT, a tiny crop) the mask
    falls back to the whole volume rather than silently hiding everything. ``device``
    (e.g. ``"cuda"``): resampling and the margin dilation run there in torch (same grid,
    same sets); the connected-component lung mask stays on the CPU (numpy/scipy)."""
    hu = np.asarray(scan.array)
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise MedicalDataError(
            f"series {scan.series_uid}: expected a [Z, Y, X] volume with >= 2 voxels per axis, "
            f"got shape {hu.shape}"
        )
    if device is not None:
        img, affine = resample_torch(hu, scan.affine, spacing_zyx, device)
    else:
        img, affine = resample(hu, scan.affine, spacing_zyx)
    lung = np.ones(img.shape, dtype=bool)
    if use_lung_mask:
        m = lung_mask(img, spacing_zyx)
        if m.any():
            if lung_margin_mm > 0 and device is not None:
                m = dilate_mm(m, spacing_zyx, lung_margin_mm, device)
            elif lung_margin_mm > 0:
                dist = ndimage.distance_transform_edt(~m, sampling=spacing_zyx)
                m = dist <= lung_margin_mm
            lung = m
    lo, hi = window_hu
    x = np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    x[~lung] = 0.0
    return PreparedScan(image=x, lung=lung, affine=affine, seriesuid=str(scan.series_uid))


def save_scan_npz(scan: Scan, path: str | Path) -> Path:
    """Plain ``.npz`` (``hu`` int16, ``affine``, ``seriesuid``) for machines without pydicom."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(
        tmp,
        hu=np.clip(np.round(scan.array), -32768, 32767).astype(np.int16),
        affine=np.asarray(scan.affine, dtype=np.float64),
        seriesuid=np.array(str(scan.series_uid)),
    )
    tmp.replace(path)
    return path


def load_scan_npz(path: str | Path) -> Scan:
    with np.load(Path(path), allow_pickle=False) as z:
        return Scan(
            array=z["hu"].astype(np.float32), affine=z["affine"], series_uid=str(z["seriesuid"])
        )
