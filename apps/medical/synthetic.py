"""Synthetic chest CT written as REAL DICOM series, with LUNA16-format annotations.

Why: tests and demos need CT series with known truth (nodule centres in world mm, the lung
field) that exercise the same reader as real data: shuffled file names, InstanceNumber
running opposite to z, varied pixel spacing / slice thickness / stored pixel
representation / rescale, and out-of-field padding. Anatomy is drawn in world millimetres
(body wall, lungs with texture and a dependent-density gradient, heart, aorta, vessel
trees, trachea and bronchi, spine, ribs, sternum) and sampled on each series' grid; nodules
(solid, part-solid, ground-glass, juxta-pleural; 3-30 mm) are drawn with supersampled
partial volume so that even a 3 mm nodule raises its voxel above lung.

Everything is deterministic given ``seed`` (UIDs too: ``generate_uid`` with entropy sources).

CLI::

    python -m apps.medical.synthetic --out data_samples/medical --n-series 3 --size small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from apps.medical.errors import MedicalDataError
from apps.medical.geometry import make_affine

GENERATOR_VERSION = "1"
NODULE_KINDS = ("solid", "part_solid", "ground_glass", "juxta_pleural")
# matrix size and slice-count range per size; slice thickness choices in mm
SIZES = {
    "tiny": {"matrix": 64, "slices": (20, 28), "thickness": (5.0, 6.0, 7.5)},
    "small": {"matrix": 128, "slices": (40, 64), "thickness": (2.5, 3.0, 4.0, 5.0)},
    "medium": {"matrix": 256, "slices": (80, 128), "thickness": (1.25, 1.5, 2.0, 2.5)},
    "large": {"matrix": 512, "slices": (150, 260), "thickness": (1.0, 1.25, 2.0)},
}
# (pixel representation, rescale slope, intercept, padded field of view)
STORAGE_VARIANTS = (
    ("int16", 1.0, -1024.0, True),
    ("uint16", 1.0, -1024.0, False),
    ("int16", 0.5, -1024.0, False),
    ("int16", 1.0, 0.0, True),
)
PADDING_STORED = -2000
SIZE_BINS_MM = (
    (3.0, 6.0),
    (6.0, 12.0),
    (10.0, 20.0),
    (15.0, 30.0),
)  # LIDC's PixelPaddingValue (stored units)


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. ``size``: one of :data:`SIZES`."""

    size: str = "small"
    n_nodules: tuple[int, int] = (1, 4)
    n_excluded: tuple[int, int] = (1, 3)
    noise_hu: tuple[float, float] = (10.0, 22.0)
    diameter_mm: tuple[float, float] | None = None  # override every nodule's size range

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise MedicalDataError(f"size={self.size!r}; expected one of {sorted(SIZES)}")


@dataclass(frozen=True)
class Finding:
    """A nodule (``annotations.csv``) or an excluded finding (``annotations_excluded.csv``)."""

    kind: str
    centre_xyz: tuple[float, float, float]  # world LPS mm
    diameter_mm: float


@dataclass(eq=False)
class Phantom:
    """One synthetic series before DICOM encoding, with its ground truth."""

    hu: np.ndarray = field(repr=False)  # [Z, Y, X] float32
    lung_mask: np.ndarray = field(repr=False)  # [Z, Y, X] bool, anatomical lung field
    nodule_mask: np.ndarray = field(repr=False)  # [Z, Y, X] bool, union of nodules
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # (x, y, z) LPS mm
    direction: np.ndarray = field(repr=False)
    slice_thickness: float
    nodules: list[Finding]
    excluded: list[Finding]
    series_uid: str
    study_uid: str
    frame_uid: str
    storage: tuple = STORAGE_VARIANTS[0]
    padded_fov: bool = False

    @property
    def affine(self) -> np.ndarray:
        return make_affine(self.spacing, self.origin, self.direction)


# ----------------------------------------------------------------------------- shapes


class _Grid:
    """World coordinates of voxel centres, broadcastable ``[Z,1,1]``, ``[1,Y,1]``, ``[1,1,X]``."""

    def __init__(self, shape: tuple[int, int, int], spacing, origin) -> None:
        self.shape = shape
        self.spacing = spacing
        self.origin = origin
        nz, ny, nx = shape
        self.z = (origin[2] + spacing[0] * np.arange(nz, dtype=np.float32))[:, None, None]
        self.y = (origin[1] + spacing[1] * np.arange(ny, dtype=np.float32))[None, :, None]
        self.x = (origin[0] + spacing[2] * np.arange(nx, dtype=np.float32))[None, None, :]
        self.w = float(np.mean(spacing[1:]))  # soft-edge width: about one in-plane voxel

    def soft(self, signed_mm: np.ndarray) -> np.ndarray:
        """Occupancy in [0, 1] from a signed distance (negative inside)."""
        return np.clip(0.5 - signed_mm / self.w, 0.0, 1.0).astype(np.float32)


def _ellipse_sd(g: _Grid, cx, cy, ax, ay) -> np.ndarray:
    """Approximate signed distance (mm) to an axial ellipse (same for all z)."""
    rho = np.sqrt(((g.x - cx) / ax) ** 2 + ((g.y - cy) / ay) ** 2)
    return (rho - 1.0) * min(ax, ay)


def _segment_occupancy(g: _Grid, p0, p1, r0, r1, shell: float = 0.0):
    """Soft occupancy of a tapered capsule p0->p1 (world xyz), limited to its bounding box.

    Returns (slices, occupancy) so that callers blend only the box.
    """
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    rmax = max(r0, r1) + shell + 2 * g.w
    lo, hi = np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax
    idx = []
    for axis, world_axis in ((0, 2), (1, 1), (2, 0)):
        a = int(np.floor((lo[world_axis] - g.origin[world_axis]) / g.spacing[axis]))
        b = int(np.ceil((hi[world_axis] - g.origin[world_axis]) / g.spacing[axis])) + 1
        a, b = max(a, 0), min(b, g.shape[axis])
        if a >= b:
            return None, None
        idx.append(slice(a, b))
    z, y, x = g.z[idx[0]], g.y[:, idx[1]], g.x[:, :, idx[2]]
    d = p1 - p0
    length2 = float(d @ d) or 1e-6
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt(
        (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    )
    radius = r0 + (r1 - r0) * t + shell
    return tuple(idx), g.soft(dist - radius)


def _blend(
    hu: np.ndarray, idx, occ: np.ndarray, value: float, where: np.ndarray | None = None
) -> None:
    if idx is None:
        return
    if where is not None:
        occ = occ * where[idx]
    hu[idx] += occ * (value - hu[idx])


# ----------------------------------------------------------------------------- anatomy


def _sample_geometry(rng: np.random.Generator, cfg: SyntheticConfig, index: int) -> dict:
    size = SIZES[cfg.size]
    n = size["matrix"]
    fov = float(rng.uniform(320.0, 400.0))
    ps = round(fov / n, 4)
    thickness = float(rng.choice(size["thickness"]))
    overlap = index % 4 == 1  # one series in 4: overlapping reconstruction (spacing < thickness)
    dz = round(thickness * (0.8 if overlap else 1.0), 4)
    nz = int(rng.integers(size["slices"][0], size["slices"][1] + 1))
    origin = (
        round(-(n - 1) / 2 * ps + float(rng.uniform(-10, 10)), 4),
        round(-(n - 1) / 2 * ps + float(rng.uniform(-15, 5)), 4),
        round(float(rng.uniform(-350.0, -150.0)), 2),
    )
    return {
        "shape": (nz, n, n),
        "spacing": (dz, ps, ps),
        "origin": origin,
        "thickness": thickness,
        "fov": ps * n,
    }


def _lung_field(
    g: _Grid, a_in: float, b_in: float, bx: float, by: float, lungs: dict
) -> np.ndarray:
    """Soft occupancy of both lungs: axial ellipses narrowing to the apex, cut by a dome."""
    z_top, z_bot, z_mid = lungs["z_top"], lungs["z_bot"], lungs["z_mid"]
    half = z_top - z_mid
    s = np.sqrt(np.clip(1.0 - ((g.z - z_mid) / half) ** 2, 0.0, 1.0)) ** 0.7
    s = np.where(g.z < z_mid, 1.0, s).astype(np.float32)
    s = np.maximum(s, 1e-3)
    occ = np.zeros(g.shape, np.float32)
    for side in (-1.0, 1.0):
        cx = bx + side * 0.5 * a_in
        cy = by + 0.05 * b_in
        lx, ly = 0.45 * a_in, 0.85 * b_in
        rho = np.sqrt(((g.x - cx) / (lx * s)) ** 2 + ((g.y - cy) / (ly * s)) ** 2)
        sd = (rho - 1.0) * (min(lx, ly) * s)
        dome = z_bot + lungs["dome"] * (1.0 - np.minimum(rho, 1.0) ** 2)
        sd = np.maximum(sd, dome - g.z)  # below the diaphragm dome: outside
        sd = np.maximum(sd, g.z - z_top)
        sd = np.maximum(sd, 0.06 * a_in - side * (g.x - bx))  # mediastinal midline gap
        occ = np.maximum(occ, g.soft(sd))
    return occ


def _random_point_in(mask: np.ndarray, rng: np.random.Generator, g: _Grid) -> np.ndarray | None:
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return None
    z, y, x = np.unravel_index(int(rng.choice(idx)), mask.shape)
    return np.array([g.x[0, 0, x], g.y[0, y, 0], g.z[z, 0, 0]], np.float32) + rng.uniform(
        -0.5, 0.5, 3
    ).astype(np.float32) * np.array([g.spacing[2], g.spacing[1], g.spacing[0]], np.float32)


def _vessel_tree(g, hu, lung_occ, lung_bin, rng, hilum, n_branches) -> None:
    """Branching tapered tubes from the hilum towards random lung points (blood ~ +40 HU)."""
    segments = []
    starts = [(np.asarray(hilum, np.float32), float(rng.uniform(3.0, 4.5)))]
    for _ in range(n_branches):
        p, r = starts[int(rng.integers(len(starts)))]
        target = _random_point_in(lung_bin, rng, g)
        if target is None:
            return
        pts = [p]
        for k in range(1, 4):
            q = p + (target - p) * (k / 3.0) + rng.normal(0, 6.0, 3).astype(np.float32) * (k < 3)
            pts.append(q.astype(np.float32))
        radii = np.linspace(r, 0.7, len(pts))
        for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:], strict=True):
            segments.append((a, b, float(ra), float(rb)))
        starts.append((pts[1], float(radii[1])))
        starts.append((pts[2], float(radii[2])))
    for a, b, ra, rb in segments:
        idx, occ = _segment_occupancy(g, a, b, ra, rb)
        _blend(hu, idx, occ, float(rng.uniform(30.0, 50.0)), where=lung_occ)


def _airways(g, hu, rng, top_xyz, carina_xyz, hila) -> None:
    """Trachea -> main bronchi -> lobar bronchi: soft-tissue wall, air lumen."""
    tubes = [(top_xyz, carina_xyz, float(rng.uniform(8.0, 10.0)), None)]
    for h in hila:
        tubes.append((carina_xyz, h, 6.0, None))
        for _ in range(3):
            direction = rng.normal(0, 1, 3).astype(np.float32)
            direction[0] = abs(direction[0]) * np.sign(h[0] - carina_xyz[0])  # lateral
            direction /= np.linalg.norm(direction)
            end = h + direction * float(rng.uniform(30.0, 50.0))
            tubes.append((h, end, 3.5, 1.5))
    for p0, p1, r0, r1 in tubes:
        r1 = r0 if r1 is None else r1
        idx, occ = _segment_occupancy(g, p0, p1, r0, r1, shell=1.5)
        _blend(hu, idx, occ, 20.0)
    for p0, p1, r0, r1 in tubes:
        r1 = r0 if r1 is None else r1
        idx, occ = _segment_occupancy(g, p0, p1, r0, r1)
        _blend(hu, idx, occ, -1000.0)


def _bones(g, hu, rng, bx, by, a_in, b_in, tf, tm) -> None:
    """Spine (vertebral bodies, discs, canal), ribs (slanted bands), sternum."""
    sy = by + b_in - 22.0  # vertebral body centre, posterior (+y in LPS)
    pitch = float(rng.uniform(22.0, 28.0))
    phase = float(rng.uniform(0, pitch))
    r_xy = np.sqrt((g.x - bx) ** 2 + (g.y - sy) ** 2)
    disc = (np.abs(((g.z - phase) % pitch) - pitch / 2) > pitch / 2 - 2.5).astype(np.float32)
    body = g.soft(r_xy - 17.0)
    cortex = g.soft(np.abs(r_xy - 16.0) - 1.5) * (1 - disc)
    hu += body * ((300.0 * (1 - disc) + 80.0 * disc) - hu)
    hu += cortex * (750.0 - hu)
    canal = g.soft(np.sqrt((g.x - bx) ** 2 + (g.y - sy - 26.0) ** 2) - 7.0)
    arch = g.soft(np.abs(np.sqrt((g.x - bx) ** 2 + (g.y - sy - 26.0) ** 2) - 10.0) - 2.5)
    hu += arch * (1 - disc) * (600.0 - hu)
    hu += canal * (15.0 - hu)
    # ribs: bands around the cavity, z falling towards the front
    ar, br = a_in + 7.0, b_in + 7.0
    theta = np.abs(np.arctan2(g.x - bx, g.y - by))  # 0 posterior (spine) .. pi anterior
    radial = (np.sqrt(((g.x - bx) / ar) ** 2 + ((g.y - by) / br) ** 2) - 1.0) * min(ar, br)
    z_rel = g.z + 30.0 * theta / np.pi - phase
    dz = np.abs(((z_rel + pitch / 2) % pitch) - pitch / 2)
    rib_sd = np.maximum(np.abs(radial) - 4.0, dz - 5.0)
    rib_sd = np.maximum(rib_sd, theta - 0.8 * np.pi)
    rib_sd = np.maximum(rib_sd, 0.12 - theta)  # no rib over the spine itself
    rib = g.soft(rib_sd)
    hu += rib * (650.0 - hu)
    sternum = g.soft(np.maximum(np.abs(g.x - bx) - 15.0, np.abs(g.y - (by - b_in - 7.0)) - 5.0))
    hu += sternum * (400.0 - hu)


def _nodule_occupancy(g: _Grid, centre, radius: float, rng: np.random.Generator, lobulation: float):
    """Supersampled (3^3 per voxel) occupancy of a lobulated sphere, in its bounding box."""
    ss = 3
    rmax = radius * (1 + lobulation) + 1e-3
    idx = []
    for axis, world_axis in ((0, 2), (1, 1), (2, 0)):
        a = int(np.floor((centre[world_axis] - rmax - g.origin[world_axis]) / g.spacing[axis]))
        b = int(np.ceil((centre[world_axis] + rmax - g.origin[world_axis]) / g.spacing[axis])) + 1
        idx.append(slice(max(a, 0), min(b, g.shape[axis])))
    sub = (np.arange(ss, dtype=np.float32) + 0.5) / ss - 0.5
    coords = []
    for axis, world_axis in ((0, 2), (1, 1), (2, 0)):
        centres = g.origin[world_axis] + g.spacing[axis] * np.arange(
            idx[axis].start, idx[axis].stop
        )
        coords.append((centres[:, None] + sub[None, :] * g.spacing[axis]).ravel())
    z, y, x = np.meshgrid(*coords, indexing="ij")
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    lobe = 1.0 + lobulation * np.cos(3 * np.arctan2(dy, dx) + p1) * np.sin(
        2 * np.arccos(dz / dist) + p2
    )
    inside = (dist < radius * lobe).astype(np.float32)
    shape = tuple(s.stop - s.start for s in idx)
    occ = inside.reshape(shape[0], ss, shape[1], ss, shape[2], ss).mean(axis=(1, 3, 5))
    return tuple(idx), occ


def _place(rng, g, lung_bin, dist_mm, radius, z_limits, taken, juxta: bool) -> np.ndarray | None:
    """A centre inside the lungs: clear of the pleura (or touching it when ``juxta``)."""
    if juxta:
        ok = (dist_mm > 0.45 * radius) & (dist_mm < 0.85 * radius)
    else:
        ok = dist_mm > radius + 2.0
    ok &= (g.z >= z_limits[0] + radius) & (g.z <= z_limits[1] - radius)
    for _ in range(40):
        p = _random_point_in(ok, rng, g)
        if p is None:
            return None
        if all(np.linalg.norm(p - q) > radius + r + 8.0 for q, r in taken):
            return p
    return None


def _draw_nodules(g, hu, rng, cfg, index, lung_bin, dist_mm, z_limits, taken):
    """Nodules of the four kinds, sizes cycling through :data:`SIZE_BINS_MM`; returns the
    findings and the union mask (occupancy >= 0.5, plus each centre voxel)."""
    nodule_mask = np.zeros(g.shape, bool)
    nodules: list[Finding] = []
    n_nod = int(rng.integers(cfg.n_nodules[0], cfg.n_nodules[1] + 1))
    for j in range(n_nod):
        kind = NODULE_KINDS[(index + j) % len(NODULE_KINDS)]
        lo, hi = SIZE_BINS_MM[(2 * index + j) % len(SIZE_BINS_MM)]
        lo, hi = {  # kinds bound the bin: ground-glass and part-solid nodules are larger
            "solid": (lo, hi),
            "part_solid": (max(lo, 8.0), max(hi, 12.0)),
            "ground_glass": (max(lo, 6.0), max(hi, 10.0)),
            "juxta_pleural": (max(lo, 4.0), min(hi, 20.0)),
        }[kind]
        diameter = float(rng.uniform(lo, hi))
        if cfg.diameter_mm is not None:
            diameter = float(rng.uniform(*cfg.diameter_mm))
        diameter = float(np.clip(diameter, 3.0, 30.0))
        centre = None
        for _ in range(4):  # shrink when the lungs have no room for it
            juxta = kind == "juxta_pleural"
            centre = _place(rng, g, lung_bin, dist_mm, diameter / 2, z_limits, taken, juxta)
            if centre is not None:
                break
            diameter = max(3.0, diameter * 0.7)
        if centre is None:
            continue
        r = diameter / 2
        taken.append((centre, r))
        lobulation = 0.0 if kind == "ground_glass" else 0.08
        idx, occ = _nodule_occupancy(g, centre, r, rng, lobulation=lobulation)
        solid_hu = float(rng.uniform(10.0, 60.0))
        if kind in ("solid", "juxta_pleural"):
            _blend(hu, idx, occ, solid_hu)
        else:
            _blend(hu, idx, occ, float(rng.uniform(-650.0, -450.0)))
            if kind == "part_solid":
                core = r * float(rng.uniform(0.35, 0.6))
                cidx, cocc = _nodule_occupancy(g, centre, core, rng, 0.05)
                _blend(hu, cidx, cocc, solid_hu)
        nodule_mask[idx] |= occ >= 0.5
        centre_zyx = np.rint((centre[::-1] - np.asarray(g.origin)[::-1]) / np.asarray(g.spacing))
        nodule_mask[tuple(centre_zyx.astype(int))] = True
        nodules.append(Finding(kind, tuple(round(float(v), 4) for v in centre), round(diameter, 4)))
    return nodules, nodule_mask


def _draw_excluded(g, hu, rng, cfg, lung_bin, dist_mm, z_limits, taken) -> list[Finding]:
    """Findings LUNA16 would exclude: micro-nodules (< 3 mm) and calcified granulomas."""
    excluded: list[Finding] = []
    for _ in range(int(rng.integers(cfg.n_excluded[0], cfg.n_excluded[1] + 1))):
        granuloma = bool(rng.random() < 0.5)
        diameter = float(rng.uniform(3.0, 6.0) if granuloma else rng.uniform(1.5, 2.8))
        centre = _place(rng, g, lung_bin, dist_mm, diameter / 2 + 4.0, z_limits, taken, False)
        if centre is None:
            continue
        taken.append((centre, diameter / 2))
        idx, occ = _nodule_occupancy(g, centre, diameter / 2, rng, 0.0)
        _blend(hu, idx, occ, float(rng.uniform(300.0, 700.0)) if granuloma else 50.0)
        kind = "calcified_granuloma" if granuloma else "micro_nodule"
        excluded.append(Finding(kind, tuple(round(float(v), 4) for v in centre), -1.0))
    return excluded


def make_phantom(seed: int, index: int = 0, config: SyntheticConfig | None = None) -> Phantom:
    """Draw one synthetic chest CT (``index``-th series of a dataset generated with ``seed``)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng([seed, index])
    geo = _sample_geometry(rng, cfg, index)
    g = _Grid(geo["shape"], geo["spacing"], geo["origin"])
    fov = geo["fov"]
    bx, by = float(rng.uniform(-6, 6)), float(rng.uniform(-8, 4))
    a = float(rng.uniform(0.36, 0.42)) * fov
    b = a * float(rng.uniform(0.68, 0.78))
    tf, tm = float(rng.uniform(6.0, 16.0)), float(rng.uniform(6.0, 11.0))
    a_in, b_in = a - tf - tm - 12.0, b - tf - tm - 12.0
    z_first, z_last = geo["origin"][2], geo["origin"][2] + (geo["shape"][0] - 1) * geo["spacing"][0]
    height = float(rng.uniform(200.0, 260.0))
    z_mid = (z_first + z_last) / 2 + float(rng.uniform(-15.0, 15.0))
    lungs = {
        "z_top": z_mid + height / 2,
        "z_bot": z_mid - height / 2,
        "z_mid": z_mid,
        "dome": float(rng.uniform(30.0, 50.0)),
    }

    hu = np.full(geo["shape"], -1000.0, np.float32)
    body = g.soft(_ellipse_sd(g, bx, by, a, b))
    hu += body * (-100.0 - hu)  # subcutaneous fat
    hu += g.soft(_ellipse_sd(g, bx, by, a - tf, b - tf)) * (45.0 - hu)  # muscle
    hu += g.soft(_ellipse_sd(g, bx, by, a - tf - tm, b - tf - tm)) * (35.0 - hu)  # cavity
    _bones(g, hu, rng, bx, by, a_in, b_in, tf, tm)

    lung_occ = _lung_field(g, a_in, b_in, bx, by, lungs)
    heart_c = (bx + 0.15 * a_in, by - 0.3 * b_in, lungs["z_bot"] + 0.3 * height)
    heart_sd = (
        np.sqrt(
            ((g.x - heart_c[0]) / (0.36 * a_in)) ** 2
            + ((g.y - heart_c[1]) / (0.5 * b_in)) ** 2
            + ((g.z - heart_c[2]) / (0.22 * height)) ** 2
        )
        - 1.0
    ) * (0.36 * a_in)
    heart = g.soft(heart_sd)
    aorta = g.soft(np.sqrt((g.x - bx - 0.14 * a_in) ** 2 + (g.y - by - b_in + 50.0) ** 2) - 12.0)
    spine_clear = g.soft(np.sqrt((g.x - bx) ** 2 + (g.y - by - b_in + 10.0) ** 2) - 34.0)
    lung_occ *= (1 - heart) * (1 - aorta) * (1 - spine_clear)
    lung_bin = lung_occ >= 0.5

    noise = ndimage.gaussian_filter(rng.normal(0, 1, geo["shape"]).astype(np.float32), 2.0)
    noise /= noise.std() + 1e-6
    dependent = np.clip((g.y - by) / b_in, 0.0, 1.0) ** 2
    parenchyma = -865.0 + 22.0 * noise + 60.0 * dependent
    hu += lung_occ * (parenchyma - hu)
    hu += heart * (40.0 - hu)
    hu += aorta * (40.0 - hu)

    hila = []
    for side in (-1.0, 1.0):
        hila.append(
            np.array([bx + side * 0.22 * a_in, by - 0.05 * b_in, z_mid + 0.1 * height], np.float32)
        )
    for h in hila:
        _vessel_tree(g, hu, lung_occ, lung_bin, rng, h, int(rng.integers(12, 20)))
    carina = np.array([bx, by + 0.05 * b_in, z_mid + 0.2 * height], np.float32)
    top = np.array([bx, by + 0.02 * b_in, max(z_last, lungs["z_top"]) + 20.0], np.float32)
    _airways(g, hu, rng, top, carina, hila)

    # nodules and excluded findings
    dist_mm = ndimage.distance_transform_edt(lung_bin, sampling=geo["spacing"]).astype(np.float32)
    z_limits = (z_first, z_last)
    taken: list[tuple[np.ndarray, float]] = []
    nodules, nodule_mask = _draw_nodules(g, hu, rng, cfg, index, lung_bin, dist_mm, z_limits, taken)
    excluded = _draw_excluded(g, hu, rng, cfg, lung_bin, dist_mm, z_limits, taken)

    sigma = float(rng.uniform(*cfg.noise_hu))
    grain = ndimage.gaussian_filter(rng.normal(0, 1, geo["shape"]).astype(np.float32), 0.6)
    hu += grain * (sigma / (grain.std() + 1e-6))
    np.clip(hu, -1024.0, 3071.0, out=hu)

    def uid(tag: str) -> str:
        return generate_uid(
            entropy_srcs=["keel-synthetic", GENERATOR_VERSION, str(seed), str(index), tag]
        )

    storage = STORAGE_VARIANTS[index % len(STORAGE_VARIANTS)]
    return Phantom(
        hu=hu,
        lung_mask=lung_bin,
        nodule_mask=nodule_mask,
        spacing=geo["spacing"],
        origin=geo["origin"],
        direction=np.eye(3),
        slice_thickness=geo["thickness"],
        nodules=nodules,
        excluded=excluded,
        series_uid=uid("series"),
        study_uid=uid("study"),
        frame_uid=uid("frame"),
        storage=storage,
        padded_fov=storage[3],
    )


# ----------------------------------------------------------------------------- DICOM


def stored_slices(phantom: Phantom) -> np.ndarray:
    """The stored pixel values ``[Z, Y, X]`` (int16 or uint16) of a phantom's series."""
    rep, slope, intercept, padded = phantom.storage
    stored = np.rint((phantom.hu - intercept) / slope)
    if rep == "uint16":
        stored = np.clip(stored, 0, 4095).astype(np.uint16)
    else:
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
    if padded:
        nz, ny, nx = stored.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        outside = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > (min(ny, nx) / 2) ** 2
        stored[:, outside] = PADDING_STORED
    return stored


def _slice_dataset(
    phantom: Phantom, k: int, pixels: np.ndarray, n_slices: int, seed: int, index: int
) -> Dataset:
    rep, slope, intercept, padded = phantom.storage
    sop_uid = generate_uid(
        entropy_srcs=["keel-synthetic", GENERATOR_VERSION, str(seed), str(index), "sop", str(k)]
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "KEEL_SYNTH_" + GENERATOR_VERSION
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "Keel synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = f"KEEL-SYNTH-{seed}-{index}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{phantom.slice_thickness:g}"
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = phantom.study_uid
    ds.SeriesInstanceUID = phantom.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = index + 1
    ds.InstanceNumber = n_slices - k  # scanners count head->feet: opposite to z; never trust it
    pos = np.asarray(phantom.origin) + k * phantom.spacing[0] * phantom.direction[:, 2]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.ImageOrientationPatient = [
        f"{v:g}" for v in np.concatenate([phantom.direction[:, 0], phantom.direction[:, 1]])
    ]
    ds.FrameOfReferenceUID = phantom.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{pos[2]:.4f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [f"{phantom.spacing[1]:g}", f"{phantom.spacing[2]:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if rep == "uint16" else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0 if rep == "uint16" else 1
    if padded:
        ds.add_new(0x00280120, "SS", PADDING_STORED)  # PixelPaddingValue
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1600"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_series(phantom: Phantom, folder: str | Path, seed: int = 0, index: int = 0) -> list[Path]:
    """Write a phantom as a DICOM series in ``folder`` (replaced atomically as a whole).

    File names are a random permutation of ``000001.dcm..`` so they are NOT slice order.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stored = stored_slices(phantom)
    n = stored.shape[0]
    perm = np.random.default_rng([seed, index, 7]).permutation(n)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    try:
        for k in range(n):
            ds = _slice_dataset(phantom, k, stored[k], n, seed, index)
            ds.save_as(tmp / f"{perm[k] + 1:06d}.dcm", enforce_file_format=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(folder.glob("*.dcm"))


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def luna_frames(phantoms: Sequence[Phantom]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``(annotations, annotations_excluded, seriesuids)`` in LUNA16 format."""
    cols = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    ann = [(p.series_uid, *f.centre_xyz, f.diameter_mm) for p in phantoms for f in p.nodules]
    exc = [(p.series_uid, *f.centre_xyz, f.diameter_mm) for p in phantoms for f in p.excluded]
    return (
        pd.DataFrame(ann, columns=cols),
        pd.DataFrame(exc, columns=cols),
        [p.series_uid for p in phantoms],
    )


def generate_dataset(
    out: str | Path, n_series: int = 3, size: str = "small", seed: int = 0
) -> dict:
    """Write ``n_series`` synthetic series plus LUNA16 CSVs and a manifest under ``out``.

    Layout: ``dicom/<SeriesInstanceUID>/*.dcm``, ``annotations.csv``,
    ``annotations_excluded.csv``, ``seriesuids.csv`` (no header, as LUNA16), ``manifest.json``.
    Series folders listed in a previous manifest are removed first so the folder stays
    consistent with the CSVs; nothing else is touched.
    """
    if n_series < 1:
        raise MedicalDataError(f"n_series={n_series}; expected >= 1")
    cfg = SyntheticConfig(size=size)
    out = Path(out)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    old = out / "manifest.json"
    if old.is_file():
        for entry in json.loads(old.read_text()).get("series", []):
            stale = out / "dicom" / str(entry.get("seriesuid", ""))
            if entry.get("seriesuid") and stale.is_dir():
                shutil.rmtree(stale)
    phantoms = []
    manifest = {
        "generator": "apps.medical.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "series": [],
    }
    for i in range(n_series):
        ph = make_phantom(seed, i, cfg)
        write_series(ph, out / "dicom" / ph.series_uid, seed, i)
        phantoms.append(ph)
        manifest["series"].append(
            {
                "seriesuid": ph.series_uid,
                "shape_zyx": list(ph.hu.shape),
                "spacing_zyx": list(ph.spacing),
                "origin_xyz": list(ph.origin),
                "slice_thickness": ph.slice_thickness,
                "storage": {
                    "pixels": ph.storage[0],
                    "slope": ph.storage[1],
                    "intercept": ph.storage[2],
                    "padded_fov": ph.storage[3],
                },
                "nodules": [asdict(f) for f in ph.nodules],
                "excluded": [asdict(f) for f in ph.excluded],
            }
        )
    ann, exc, uids = luna_frames(phantoms)
    _write_text_atomic(out / "annotations.csv", ann.to_csv(index=False, float_format="%.4f"))
    _write_text_atomic(
        out / "annotations_excluded.csv", exc.to_csv(index=False, float_format="%.4f")
    )
    _write_text_atomic(out / "seriesuids.csv", "".join(u + "\n" for u in uids))
    _write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-series", type=int, default=3)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = generate_dataset(args.out, args.n_series, args.size, args.seed)
    n_nod = sum(len(s["nodules"]) for s in manifest["series"])
    print(f"wrote {len(manifest['series'])} series ({n_nod} nodules) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "Finding",
    "Phantom",
    "SyntheticConfig",
    "generate_dataset",
    "luna_frames",
    "make_phantom",
    "stored_slices",
    "write_series",
]
