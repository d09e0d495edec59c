"""Crop sampling and the two training stages (used by ``spec.train``, the estimator, the bench).

Stage 1 crops: ``crops_per_nodule`` jittered crops around each nodule (positives) plus
``neg_crops_per_scan`` crops centred on random lung voxels (negatives; any nodule inside one
is still labelled). Stage 2 samples: jittered crops at nodules vs. stage-1 false positives
on the TRAINING scans (hard negatives) and random lung points. Nothing from held-out
series is used to train or to choose a threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from apps.medical.config import MedicalConfig
from apps.medical.data import Truth, findings_zyx
from apps.medical.model import (
    FPReductionModel,
    NoduleHeatmapModel,
    crops_at,
    detect_scan,
    extract_crop,
    heatmap_targets,
    random_lung_points,
)
from apps.medical.preprocess import PreparedScan
from core.engine import build_trainer


class _ArrayDataset(Dataset):
    """Dict of equally long arrays; ``flip``: random axis flips of ``image`` (label-invariant)."""

    def __init__(self, arrays: dict[str, np.ndarray], flip: bool = False, seed: int = 0) -> None:
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self.n = len(next(iter(arrays.values())))
        self.flip = flip

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.arrays.items()}
        if self.flip:
            dims = [d for d in (1, 2, 3) if torch.rand(()) < 0.5]
            if dims:
                item["image"] = item["image"].flip(dims)
        return item


def detector_samples(
    cfg: MedicalConfig, scans: Sequence[PreparedScan], truth: Truth, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    dc = cfg.detector
    crop = np.asarray(dc.crop_zyx)
    images, targets, weights, offsets = [], [], [], []
    for scan in scans:
        nod = findings_zyx(truth.annotations, scan)
        exc = findings_zyx(truth.excluded, scan)
        centres = [
            n + rng.integers(-dc.jitter_vox, dc.jitter_vox + 1, 3)
            for n in nod
            for _ in range(dc.crops_per_nodule)
        ]
        centres += list(random_lung_points(scan.lung, dc.neg_crops_per_scan, rng))
        for c in centres:
            start = np.round(c).astype(int) - crop // 2
            images.append(extract_crop(scan.image, start, crop))
            t, w, o = heatmap_targets(
                start, crop, dc.patch_zyx, cfg.spacing_zyx, nod, exc, dc.pos_radius_mm
            )
            targets.append(t)
            weights.append(w)
            offsets.append(o)
    return {
        "image": np.stack(images)[:, None],
        "target_BT": np.stack(targets),
        "weight_BT": np.stack(weights),
        "offset_BT3": np.stack(offsets),
    }


def _trainer_cfg(tc: Any, seed: int) -> Any:
    return dataclasses.replace(tc, seed=seed if tc.seed is not None else None)


def pretrain_detector(
    model: NoduleHeatmapModel, images: np.ndarray, cfg: MedicalConfig
) -> list[float]:
    """Masked-token pretraining of ``model``'s embed + backbone on unlabeled crops; the
    target is the raw voxel block of each masked patch (fixed, so it cannot collapse)."""
    from core.pretrain import MaskedTokenPretrainer

    pc = cfg.pretrain
    p = model.patch_zyx
    pre = MaskedTokenPretrainer(
        model.backbone, mask_ratio=pc.mask_ratio, target_dim=int(np.prod(p)), n_prefix_tokens=0
    )
    params = list(pre.parameters()) + list(model.embed.parameters())
    opt = torch.optim.AdamW(params, lr=pc.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = torch.from_numpy(images)
    losses = []
    model.train()
    for _ in range(pc.steps):
        idx = torch.randint(0, len(x_all), (pc.batch_size,), generator=gen)
        x = x_all[idx]
        tokens = model.embed(x)
        B = x.shape[0]
        gz, gy, gx = model.embed.grid_shape(x.shape)
        blocks = (
            x.reshape(B, gz, p[0], gy, p[1], gx, p[2])
            .permute(0, 1, 3, 5, 2, 4, 6)
            .reshape(B, gz * gy * gx, -1)
        )
        pos = model.embed.position_embeddings((gz, gy, gx))
        loss, _ = pre(tokens, target_BTK=blocks, positions_BTD=pos, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def fit_detector(
    cfg: MedicalConfig, scans: Sequence[PreparedScan], truth: Truth, logger: Any = None
) -> NoduleHeatmapModel:
    dc = cfg.detector
    rng = np.random.default_rng(cfg.seed)
    samples = detector_samples(cfg, scans, truth, rng)
    torch.manual_seed(cfg.seed)
    model = NoduleHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.pos_weight, dc.offset_weight)
    if cfg.pretrain.enabled:
        pretrain_detector(model, samples["image"], cfg)
    loader = DataLoader(
        _ArrayDataset(samples),
        batch_size=dc.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    trainer = build_trainer(_trainer_cfg(dc.trainer, cfg.seed), logger=logger)
    trainer.fit(model, train_dataloaders=loader)
    return model.cpu().eval()


def fp_samples(
    cfg: MedicalConfig,
    detector: NoduleHeatmapModel,
    scans: Sequence[PreparedScan],
    truth: Truth,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    fc, dc = cfg.fp_reduction, cfg.detector
    sp = np.asarray(cfg.spacing_zyx)
    images, ys = [], []
    for scan in scans:
        nod = findings_zyx(truth.annotations, scan)
        exc = findings_zyx(truth.excluded, scan)
        radii = (
            truth.annotations[truth.annotations["seriesuid"] == scan.seriesuid][
                "diameter_mm"
            ].to_numpy()
            / 2.0
        )
        pos = [
            n + rng.integers(-fc.jitter_vox, fc.jitter_vox + 1, 3)
            for n in nod
            for _ in range(fc.crops_per_nodule)
        ]
        cands = detect_scan(
            detector,
            scan,
            dc.crop_zyx,
            dc.stride_zyx,
            dc.threshold,
            dc.nms_radius_mm,
            dc.max_candidates,
            cfg.refine_centroid,
            dc.batch_size,
        )
        pts = cands[["z", "y", "x"]].to_numpy()

        groups = ((nod, np.maximum(radii, 5.0)), (exc, np.full(len(exc), 5.0)))
        neg = [pt for pt in pts if _far(pt, groups, sp)][: fc.max_hard_neg_per_scan]
        neg += [
            pt
            for pt in random_lung_points(scan.lung, fc.random_neg_per_scan, rng)
            if _far(pt, groups, sp)
        ]
        pts_all = np.asarray(pos + neg, dtype=np.float64).reshape(-1, 3)
        if len(pts_all):
            images.append(crops_at(scan.image, pts_all, fc.crop_zyx))
            ys.append(np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(np.float32))
    return {"image": np.concatenate(images), "y": np.concatenate(ys)}


def _far(pt: np.ndarray, groups: Sequence[tuple[np.ndarray, np.ndarray]], sp: np.ndarray) -> bool:
    """True when ``pt`` is outside every finding's radius (voxel points, mm radii)."""
    for f, r in groups:
        if len(f) and np.any(np.linalg.norm((f - pt) * sp, axis=1) < r):
            return False
    return True


def fit_fp_reduction(
    cfg: MedicalConfig,
    detector: NoduleHeatmapModel,
    scans: Sequence[PreparedScan],
    truth: Truth,
    logger: Any = None,
) -> FPReductionModel:
    fc = cfg.fp_reduction
    rng = np.random.default_rng(cfg.seed + 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples = fp_samples(cfg, detector.to(device), scans, truth, rng)
    detector.cpu()
    torch.manual_seed(cfg.seed + 1)
    model = FPReductionModel(fc.backbone, fc.optim, fc.patch_zyx)
    if logger is not None:
        # the run already holds stage 1's hyperparameters (MLflow refuses changed params);
        # stage 2's are in the logged config YAML
        model._log_hyperparams = False
    loader = DataLoader(
        _ArrayDataset(samples, flip=True),
        batch_size=fc.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    trainer = build_trainer(_trainer_cfg(fc.trainer, cfg.seed + 1), logger=logger)
    trainer.fit(model, train_dataloaders=loader)
    return model.cpu().eval()
