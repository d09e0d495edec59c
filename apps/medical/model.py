"""Two-stage nodule detector on the Keel backbone.

Stage 1 (:class:`NoduleHeatmapModel`): a CT crop -> 3-D patch tokens (``PatchEmbed3d``,
sincos positions in the global grid frame) -> backbone (DGA with top-k keeps ~512 tokens
per window affordable) -> per token a nodule logit and an offset of the nodule centre
inside the patch. Over a whole scan, overlapping windows are merged by max on the global
token grid (:func:`sliding_window_heatmap`), local maxima become points (patch centre +
offset, optionally snapped to the intensity centroid of the blob) and a greedy NMS in world
mm keeps distinct ones (:func:`detect_scan`).

Stage 2 (:class:`FPReductionModel`): a small crop around each candidate -> tokens + CLS ->
backbone -> one probability. Trained on jittered nodule crops against stage-1 false
positives and random lung points, so it learns exactly the confusions stage 1 makes.
The final candidate probability is the stage-2 score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from apps.medical.candidates import local_maxima, nms_world
from apps.medical.geometry import index_to_world, split_affine
from apps.medical.preprocess import PreparedScan
from core.adapters import PatchEmbed3d
from core.backbone import BackboneOutput
from core.engine import TaskModule

# ----------------------------------------------------------------------------- models


class NoduleHeatmapModel(TaskModule):
    """Per-patch-token nodule logit + centre offset (in patch units) for a crop ``[B,1,Z,Y,X]``.

    Batch: ``image`` [B,1,Z,Y,X]; for training also ``target_BT`` (0/1), ``weight_BT``
    (0 ignores a token, e.g. near an excluded finding) and ``offset_BT3``.
    """

    def __init__(
        self,
        backbone_config: Any,
        optim_config: Any = None,
        patch_zyx: Sequence[int] = (4, 4, 4),
        pos_weight: float = 4.0,
        offset_weight: float = 1.0,
    ) -> None:
        super().__init__(
            backbone_config,
            optim_config,
            patch_zyx=list(patch_zyx),
            pos_weight=pos_weight,
            offset_weight=offset_weight,
        )
        d = self.backbone_config.d_model
        self.patch_zyx = tuple(int(p) for p in patch_zyx)
        self.embed = PatchEmbed3d(1, self.patch_zyx, d, max_patches=1 << 16)
        self.head = nn.Linear(d, 4)
        self.pos_weight = float(pos_weight)
        self.offset_weight = float(offset_weight)

    def tokens(self, batch: dict[str, Any]) -> tuple[torch.Tensor, None]:
        offset = tuple(int(v) for v in batch.get("grid_offset", (0, 0, 0)))
        return self.embed(batch["image"], offset=offset), None

    def head_forward(self, out: BackboneOutput, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        h_BT4 = self.head(out.last_hidden).float()
        return {"logit_BT": h_BT4[..., 0], "offset_BT3": torch.tanh(h_BT4[..., 1:]) * 1.5}

    def loss(self, preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        target, weight = batch["target_BT"].float(), batch["weight_BT"].float()
        pw = torch.tensor(self.pos_weight, device=target.device)
        bce = F.binary_cross_entropy_with_logits(
            preds["logit_BT"], target, weight=weight, pos_weight=pw, reduction="sum"
        ) / weight.sum().clamp_min(1.0)
        if self.offset_weight <= 0:
            return bce
        pos = (target > 0.5).float()
        off = F.smooth_l1_loss(preds["offset_BT3"], batch["offset_BT3"], reduction="none").sum(-1)
        return bce + self.offset_weight * (off * pos).sum() / pos.sum().clamp_min(1.0)


class FPReductionModel(TaskModule):
    """Crop around a candidate -> CLS token -> nodule logit. Batch: ``image`` (+ ``y``)."""

    def __init__(
        self, backbone_config: Any, optim_config: Any = None, patch_zyx: Sequence[int] = (4, 4, 4)
    ) -> None:
        super().__init__(backbone_config, optim_config, patch_zyx=list(patch_zyx))
        d = self.backbone_config.d_model
        self.embed = PatchEmbed3d(1, tuple(int(p) for p in patch_zyx), d, cls_token=True)
        self.head = nn.Linear(d, 1)

    def tokens(self, batch: dict[str, Any]) -> tuple[torch.Tensor, None]:
        return self.embed(batch["image"]), None

    def head_forward(self, out: BackboneOutput, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(out.last_hidden[:, 0]).squeeze(-1).float()

    def loss(self, preds: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(preds, batch["y"].float())


# ----------------------------------------------------------------------------- crops


def extract_crop(
    image: np.ndarray, start_zyx: Sequence[int], size_zyx: Sequence[int]
) -> np.ndarray:
    """``image[start:start+size]`` with zero padding where the box leaves the volume."""
    out = np.zeros(tuple(int(s) for s in size_zyx), dtype=np.float32)
    src, dst = [], []
    for s, n, L in zip(start_zyx, size_zyx, image.shape, strict=True):
        a, b = max(int(s), 0), min(int(s) + int(n), L)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - int(s), b - int(s)))
    out[tuple(dst)] = image[tuple(src)]
    return out


def token_centres(
    start_zyx: Sequence[int], crop_zyx: Sequence[int], patch_zyx: Sequence[int]
) -> np.ndarray:
    """Voxel centres ``[T, 3]`` (z-major token order) of the patches of a crop at ``start``."""
    axes = [
        s + np.arange(c // p) * p + (p - 1) / 2.0
        for s, c, p in zip(start_zyx, crop_zyx, patch_zyx, strict=True)
    ]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)


def heatmap_targets(
    start_zyx: Sequence[int],
    crop_zyx: Sequence[int],
    patch_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    nodules_zyx: np.ndarray,
    excluded_zyx: np.ndarray,
    pos_radius_mm: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target_T, weight_T, offset_T3) for a crop: a token is positive when the nearest
    nodule centre is inside its patch or within ``pos_radius_mm`` of its centre; offsets are
    ``(nodule - patch centre) / patch`` to that nodule; tokens near an excluded finding (and
    not positive) get weight 0 (LUNA16 neither rewards nor penalises them)."""
    c = token_centres(start_zyx, crop_zyx, patch_zyx)
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    p = np.asarray(patch_zyx, dtype=np.float64)
    T = len(c)
    target, weight, offset = (
        np.zeros(T, np.float32),
        np.ones(T, np.float32),
        np.zeros((T, 3), np.float32),
    )
    if len(nodules_zyx):
        d_vox = nodules_zyx[None, :, :] - c[:, None, :]  # [T, N, 3]
        d_mm = np.linalg.norm(d_vox * sp, axis=-1)
        inside = np.all(np.abs(d_vox) <= p / 2.0, axis=-1)
        near = d_mm.argmin(axis=1)
        pos = (d_mm.min(axis=1) <= pos_radius_mm) | inside.any(axis=1)
        target[pos] = 1.0
        offset[pos] = np.clip(d_vox[np.arange(T), near][pos] / p, -1.5, 1.5)
    if len(excluded_zyx):
        d_mm = np.linalg.norm((excluded_zyx[None] - c[:, None]) * sp, axis=-1).min(axis=1)
        weight[(d_mm <= pos_radius_mm) & (target < 0.5)] = 0.0
    return target, weight, offset


def random_lung_points(lung: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` voxel indices drawn uniformly from the lung mask (the whole volume if empty)."""
    idx = np.flatnonzero(lung.ravel()) if lung.any() else np.arange(lung.size)
    pick = rng.choice(idx, size=n, replace=len(idx) < n)
    return np.stack(np.unravel_index(pick, lung.shape), axis=1)


# ----------------------------------------------------------------------------- inference


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``[0, length)``: ``0, stride, ...`` plus a last one ending at
    ``length`` (``length`` and ``crop`` are multiples of the patch, so all stay aligned)."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return starts


@torch.no_grad()
def sliding_window_heatmap(
    model: NoduleHeatmapModel,
    image_ZYX: np.ndarray,
    crop_zyx: Sequence[int],
    stride_zyx: Sequence[int],
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """``(prob_G, offset_G3)`` on the global token grid ``ceil(max(shape, crop) / patch)``.

    The volume is zero-padded at the far end to a multiple of the patch (and at least one
    window); windows start on patch boundaries, so each window's tokens are tokens of the
    global grid. Overlaps merge by max; each token keeps the offset of its best window.
    """
    p = model.patch_zyx
    crop = tuple(int(c) for c in crop_zyx)
    shape = tuple(
        max(int(math.ceil(n / pp)) * pp, c)
        for n, pp, c in zip(image_ZYX.shape, p, crop, strict=True)
    )
    padded = np.zeros(shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in image_ZYX.shape)] = image_ZYX
    grid = tuple(s // pp for s, pp in zip(shape, p, strict=True))
    prob = np.full(grid, -1.0, dtype=np.float32)
    offset = np.zeros((*grid, 3), dtype=np.float32)
    starts = [
        (a, b, c)
        for a in window_starts(shape[0], crop[0], int(stride_zyx[0]))
        for b in window_starts(shape[1], crop[1], int(stride_zyx[1]))
        for c in window_starts(shape[2], crop[2], int(stride_zyx[2]))
    ]
    wg = tuple(c // pp for c, pp in zip(crop, p, strict=True))
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        x = np.stack(
            [padded[a : a + crop[0], b : b + crop[1], c : c + crop[2]] for a, b, c in chunk]
        )
        out = model({"image": torch.from_numpy(x[:, None]).to(device)})
        pr = torch.sigmoid(out["logit_BT"]).cpu().numpy().reshape(len(chunk), *wg)
        off = out["offset_BT3"].cpu().numpy().reshape(len(chunk), *wg, 3)
        for k, (a, b, c) in enumerate(chunk):
            box = (
                slice(a // p[0], a // p[0] + wg[0]),
                slice(b // p[1], b // p[1] + wg[1]),
                slice(c // p[2], c // p[2] + wg[2]),
            )
            better = pr[k] > prob[box]
            prob[box] = np.where(better, pr[k], prob[box])
            offset[box] = np.where(better[..., None], off[k], offset[box])
    return prob, offset


def refine_to_centroid(
    image: np.ndarray, zyx: np.ndarray, spacing_zyx: Sequence[float], search_mm: float = 6.0
) -> np.ndarray:
    """Snap a point to the intensity centroid of the bright blob nearest to it.

    Within a box of ``2 * search_mm`` around the point: the brightest (lightly smoothed)
    voxel within ``search_mm``, then the connected component above half-way between the
    box's median (lung background) and that peak, and its (value - level)-weighted centroid.
    Gives sub-voxel centres for small nodules, which a patch-level offset cannot. Returns
    the input point when the blob is not compact (fills over half the box: a wall, a vessel).
    """
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    r = np.ceil(2 * search_mm / sp).astype(int)
    c = np.round(zyx).astype(int)
    lo = np.maximum(c - r, 0)
    hi = np.minimum(c + r + 1, image.shape)
    if np.any(hi - lo < 3):
        return zyx
    sub = ndimage.gaussian_filter(
        image[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], 0.6
    )
    grid = np.indices(sub.shape).reshape(3, -1).T + lo
    d = np.linalg.norm((grid - zyx) * sp, axis=1).reshape(sub.shape)
    cand = np.where(d <= search_mm, sub, -np.inf)
    peak = np.unravel_index(int(np.argmax(cand)), sub.shape)
    bg = float(np.median(sub))
    level = bg + 0.5 * (float(sub[peak]) - bg)
    if sub[peak] - bg < 0.03:
        return zyx
    labels, _ = ndimage.label(sub > level)
    comp = labels == labels[peak]
    if comp.sum() > 0.5 * comp.size:
        return zyx
    w = (sub - level) * comp
    return (np.indices(sub.shape).reshape(3, -1) * w.ravel()).sum(axis=1) / w.sum() + lo


def detect_scan(
    model: NoduleHeatmapModel,
    scan: PreparedScan,
    crop_zyx: Sequence[int],
    stride_zyx: Sequence[int],
    threshold: float,
    nms_radius_mm: float,
    max_candidates: int = 100,
    refine: bool = True,
    batch_size: int = 8,
    tta_flips: bool = False,
) -> pd.DataFrame:
    """Stage-1 candidates of one prepared scan: ``seriesuid, coordX/Y/Z (world mm),
    probability`` plus ``z, y, x`` (voxel index on the prepared grid, for stage 2).
    A :class:`apps.medical.dense.DenseHeatmapModel` is scored voxel-wise instead."""
    from apps.medical.dense import DenseHeatmapModel, detect_scan_dense

    if isinstance(model, DenseHeatmapModel):
        return detect_scan_dense(
            model,
            scan,
            crop_zyx,
            stride_zyx,
            threshold,
            nms_radius_mm,
            max_candidates,
            refine,
            batch_size,
            tta_flips,
        )
    if tta_flips:
        raise ValueError("detector.tta_flips needs detector.kind='dense' (the token head has none)")
    prob, offset = sliding_window_heatmap(model, scan.image, crop_zyx, stride_zyx, batch_size)
    p = np.asarray(model.patch_zyx, dtype=np.float64)
    tok, val = local_maxima(prob.astype(np.float64), (1, 1, 1), threshold)
    spacing, _, _ = split_affine(scan.affine)
    pts, vals = [], []
    shape = np.asarray(scan.image.shape)
    for t, v in zip(tok[: 20 * max(max_candidates, 1)], val, strict=False):
        zyx = t * p + (p - 1) / 2.0 + offset[tuple(t)] * p
        zyx = np.clip(zyx, 0, shape - 1)
        if not scan.lung[tuple(np.round(zyx).astype(int))]:
            continue
        if refine:
            zyx = refine_to_centroid(scan.image, zyx, spacing)
        pts.append(zyx)
        vals.append(v)
    zyx_all = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
    xyz = index_to_world(scan.affine, zyx_all) if len(zyx_all) else np.empty((0, 3))
    keep = nms_world(xyz, np.asarray(vals), nms_radius_mm, limit=max_candidates or None)
    return pd.DataFrame(
        {
            "seriesuid": [scan.seriesuid] * len(keep),
            "coordX": xyz[keep, 0] if len(keep) else np.empty(0),
            "coordY": xyz[keep, 1] if len(keep) else np.empty(0),
            "coordZ": xyz[keep, 2] if len(keep) else np.empty(0),
            "probability": np.asarray(vals, dtype=np.float64)[keep] if len(keep) else np.empty(0),
            "z": zyx_all[keep, 0] if len(keep) else np.empty(0),
            "y": zyx_all[keep, 1] if len(keep) else np.empty(0),
            "x": zyx_all[keep, 2] if len(keep) else np.empty(0),
        }
    )


def crops_at(image: np.ndarray, points_zyx: np.ndarray, crop_zyx: Sequence[int]) -> np.ndarray:
    """``[N, 1, *crop]`` crops centred on voxel points (rounded)."""
    half = np.asarray(crop_zyx) // 2
    out = [extract_crop(image, np.round(pt).astype(int) - half, crop_zyx) for pt in points_zyx]
    return np.stack(out)[:, None] if out else np.zeros((0, 1, *crop_zyx), np.float32)


def stage1_candidates(cfg: Any, detector: Any, scan: Any) -> pd.DataFrame:
    """Stage-1 candidates of one prepared scan with ``cfg`` (a ``MedicalConfig``)'s detector
    settings: the call inference, stage-2 mining and validation all share."""
    dc = cfg.detector
    return detect_scan(
        detector,
        scan,
        dc.crop_zyx,
        dc.infer_stride_zyx or dc.stride_zyx,
        dc.threshold,
        dc.nms_radius_mm,
        dc.max_candidates,
        cfg.refine_centroid,
        dc.scoring_batch_size,
        dc.tta_flips,
    )


def fuse_scores(p1: np.ndarray, p2: np.ndarray, weight: float) -> np.ndarray:
    """Final candidate probability ``p1 ** (1 - weight) * p2 ** weight`` (stage 1, stage 2).

    Geometric, so a candidate needs both stages' support; ``weight`` 1 is stage 2 alone and
    0 stage 1 alone (exactly, with no 0 ** 0 surprises: those ends skip the power)."""
    p1 = np.asarray(p1, dtype=np.float64)
    p2 = np.asarray(p2, dtype=np.float64)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fp_reduction.score_weight must lie in [0, 1], got {weight}")
    if weight == 1.0:
        return p2.copy()
    if weight == 0.0:
        return p1.copy()
    return np.clip(p1, 0.0, 1.0) ** (1.0 - weight) * np.clip(p2, 0.0, 1.0) ** weight


@torch.no_grad()
def score_candidates(
    model: FPReductionModel,
    image: np.ndarray,
    points_zyx: np.ndarray,
    crop_zyx: Sequence[int],
    batch_size: int = 64,
) -> np.ndarray:
    """Stage-2 probability for each candidate point."""
    model.eval()
    x = crops_at(image, points_zyx, crop_zyx)
    device = next(model.parameters()).device
    out = [
        torch.sigmoid(model({"image": torch.from_numpy(x[i : i + batch_size]).to(device)}))
        .cpu()
        .numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
