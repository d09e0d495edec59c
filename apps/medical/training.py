"""Crop sampling and the two training stages (used by ``spec.train``, the estimator, the bench).

Stage 1 crops: ``crops_per_nodule`` jittered crops around each nodule (positives) plus
``neg_crops_per_scan`` crops centred on random lung voxels (negatives; any nodule inside one
is still labelled). Stage 2 samples: jittered crops at nodules vs. stage-1 false positives
on the TRAINING scans (hard negatives) and random lung points. Nothing from held-out
series is used to train or to choose a threshold.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from apps.medical.config import MedicalConfig
from apps.medical.data import Truth, findings_zyx
from apps.medical.model import (
    FPReductionModel,
    NoduleHeatmapModel,
    crops_at,
    extract_crop,
    fuse_scores,
    heatmap_targets,
    random_lung_points,
    score_candidates,
    stage1_candidates,
)
from apps.medical.preprocess import PreparedScan
from core.engine import build_trainer
from core.sharding import single_device_copy


class ArrayDataset(Dataset):
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
    cfg: MedicalConfig,
    scans: Sequence[PreparedScan],
    truth: Truth,
    logger: Any = None,
    extra_fit_scans: Sequence[PreparedScan] = (),
) -> NoduleHeatmapModel:
    """Stage 1 on ``scans`` (training series only). ``detector.kind="dense"`` trains the
    voxel heat map (:func:`fit_dense_detector`), which also picks ``nms_radius_mm`` on a
    validation part of ``scans`` when ``data.val_fraction`` and ``detector.nms_grid_mm`` are set.
    ``extra_fit_scans`` (dense only): more training series that only train, never validate."""
    dc = cfg.detector
    if dc.kind == "dense":
        return fit_dense_detector(cfg, scans, truth, logger, extra_fit_scans)
    if extra_fit_scans:
        raise ValueError("extra_fit_scans needs detector.kind='dense'")
    rng = np.random.default_rng(cfg.seed)
    samples = detector_samples(cfg, scans, truth, rng)
    torch.manual_seed(cfg.seed)
    model = NoduleHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.pos_weight, dc.offset_weight)
    if cfg.pretrain.enabled:
        pretrain_detector(model, samples["image"], cfg)
    loader = DataLoader(
        ArrayDataset(samples),
        batch_size=dc.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    trainer = build_trainer(_trainer_cfg(dc.trainer, cfg.seed), logger=logger)
    trainer.fit(model, train_dataloaders=loader)
    return single_device_copy(model).cpu().eval()


def _stage1_of(
    cfg: MedicalConfig,
    detector: Any,
    scan: PreparedScan,
    candidates: Mapping[str, pd.DataFrame] | None,
) -> pd.DataFrame:
    """The scan's stage-1 candidates: from ``candidates`` (by series UID) when there, else run."""
    if candidates is not None and scan.seriesuid in candidates:
        return candidates[scan.seriesuid]
    return stage1_candidates(cfg, detector, scan)


def fp_samples(
    cfg: MedicalConfig,
    detector: NoduleHeatmapModel,
    scans: Sequence[PreparedScan],
    truth: Truth,
    rng: np.random.Generator,
    candidates: Mapping[str, pd.DataFrame] | None = None,
) -> dict[str, np.ndarray]:
    """Stage-2 crops: jittered positives at nodules, hard negatives at stage-1 candidates
    away from every finding, random lung negatives. ``candidates`` (by series UID): stage-1
    candidates already computed for these scans (stage 1 is the costly part on a CPU)."""
    fc = cfg.fp_reduction
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
        cands = _stage1_of(cfg, detector, scan, candidates)
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
    candidates: Mapping[str, pd.DataFrame] | None = None,
    val_scans: Sequence[PreparedScan] | None = None,
) -> FPReductionModel:
    """Stage 2 on the training ``scans``. With ``fp_reduction.score_weight_grid`` set, the
    validation series choose ``fp_reduction.score_weight`` (set in ``cfg``) and stay out of
    stage 2's training: ``val_scans`` when given (then ``scans`` are the fitting series
    only), else the validation part of ``scans`` (``data.val_fraction``, the split stage 1
    uses). ``candidates``: stage-1 candidates by series UID, when the caller has them."""
    fc = cfg.fp_reduction
    rng = np.random.default_rng(cfg.seed + 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not fc.score_weight_grid:
        val_scans = []
    elif val_scans is None:
        scans, val_scans = split_validation(scans, cfg.data.val_fraction, cfg.data.split_seed)
    samples = fp_samples(cfg, detector.to(device), scans, truth, rng, candidates)
    detector.cpu()
    torch.manual_seed(cfg.seed + 1)
    model = FPReductionModel(fc.backbone, fc.optim, fc.patch_zyx)
    if logger is not None:
        # the run already holds stage 1's hyperparameters (MLflow refuses changed params);
        # stage 2's are in the logged config YAML
        model._log_hyperparams = False
    loader = DataLoader(
        ArrayDataset(samples, flip=True),
        batch_size=fc.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    trainer = build_trainer(_trainer_cfg(fc.trainer, cfg.seed + 1), logger=logger)
    trainer.fit(model, train_dataloaders=loader)
    model = single_device_copy(model).cpu().eval()
    if val_scans:
        detector.to(device)
        val_cands = [_stage1_of(cfg, detector, s, candidates) for s in val_scans]
        fc.score_weight = choose_score_weight(cfg, model, val_scans, val_cands, truth)
    detector.cpu()
    return model


def choose_score_weight(
    cfg: MedicalConfig,
    fp_model: FPReductionModel,
    val_scans: Sequence[PreparedScan],
    val_candidates: Sequence[pd.DataFrame],
    truth: Truth,
) -> float:
    """The weight of ``fp_reduction.score_weight_grid`` with the best LUNA16 CPM on the
    validation series (never the held-out ones); ties go to the first listed."""
    from apps.medical.froc import evaluate_froc

    fc = cfg.fp_reduction
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp_model.to(device)
    p2 = [
        score_candidates(fp_model, s.image, c[["z", "y", "x"]].to_numpy(), fc.crop_zyx)
        if len(c)
        else np.zeros(0)
        for s, c in zip(val_scans, val_candidates, strict=True)
    ]
    fp_model.cpu()
    uids = [s.seriesuid for s in val_scans]
    sub = truth.subset(uids)
    best, best_cpm = float(fc.score_weight), -1.0
    for w in fc.score_weight_grid:
        frames = [
            c.assign(probability=fuse_scores(c["probability"].to_numpy(), p, float(w)))
            for c, p in zip(val_candidates, p2, strict=True)
        ]
        res = evaluate_froc(
            pd.concat(frames, ignore_index=True), sub.annotations, uids, sub.excluded
        )
        cpm = float(res.metrics()["cpm"])
        print(f"[medical] validation stage-2 weight {float(w):g}: CPM {cpm:.3f}", flush=True)
        if cpm > best_cpm:
            best, best_cpm = float(w), cpm
    return best


# ----------------------------------------------------------------------------- dense stage 1


def _nodules_of(truth: Truth, scan: PreparedScan) -> tuple[np.ndarray, np.ndarray]:
    rows = truth.annotations[truth.annotations["seriesuid"] == scan.seriesuid]
    dia = rows["diameter_mm"].to_numpy(np.float64)
    return findings_zyx(truth.annotations, scan), np.where(dia > 0, dia, 10.0)


def split_validation(
    scans: Sequence[PreparedScan], fraction: float, seed: int
) -> tuple[list[PreparedScan], list[PreparedScan]]:
    """(fit, validation) scans: a seeded ``fraction`` of the TRAINING series (>= 1 when
    fraction > 0 and at least 2 scans) is kept out of training to choose post-processing."""
    scans = list(scans)
    if fraction <= 0 or len(scans) < 2:
        return scans, []
    order = np.random.default_rng(seed + 101).permutation(len(scans))
    n_val = min(max(1, int(round(fraction * len(scans)))), len(scans) - 1)
    val = set(order[:n_val].tolist())
    return [s for i, s in enumerate(scans) if i not in val], [
        s for i, s in enumerate(scans) if i in val
    ]


def dense_crop_loader(
    cfg: MedicalConfig,
    scans: Sequence[PreparedScan],
    truth: Truth,
    bank: Any,
    unlabeled: Sequence[tuple[PreparedScan, np.ndarray]] = (),
) -> DataLoader:
    """Random training crops of ``scans`` (:class:`apps.medical.dense.DenseCropDataset`),
    the filter ``bank`` run once per scan (on the GPU when there is one). ``unlabeled``:
    ``(scan, centres_zyx [N, 3])`` pairs whose truth is never read; their crops are drawn
    like the labelled ones (positives near ``centres_zyx`` instead of nodules) and carry a
    zero task-loss weight (a distillation transfer set: only the teacher term reads them)."""
    from apps.medical.dense import DenseCropDataset

    dc = cfg.detector
    if torch.cuda.is_available():
        bank.cuda()  # the dataset runs the filter bank once per scan
    centres = [np.asarray(c, np.float64).reshape(-1, 3) for _, c in unlabeled]
    dataset = DenseCropDataset(
        [*scans, *(s for s, _ in unlabeled)],
        [
            *(_nodules_of(truth, s) for s in scans),
            *((c, np.full(len(c), 10.0)) for c in centres),  # unknown: 10 mm (pos_size_power)
        ],
        [*(findings_zyx(truth.excluded, s) for s in scans), *(np.empty((0, 3)) for _ in centres)],
        dc.crop_zyx,
        cfg.spacing_zyx,
        dc.samples_per_epoch,
        dc.pos_fraction,
        dc.sigma_mm,
        seed=cfg.seed,
        bank=bank,
        pos_size_power=dc.pos_size_power,
        labelled=[True] * len(scans) + [False] * len(unlabeled),
    )
    bank.cpu()
    workers = 0
    if torch.cuda.is_available():  # keep the GPU fed; each worker reseeds (see the dataset)
        workers = max(0, min(8, (os.cpu_count() or 1) - 2))
    return DataLoader(
        dataset,
        batch_size=dc.batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=workers > 0,
    )


def dense_trainer_config(cfg: MedicalConfig) -> tuple[Any, list[Callback]]:
    """The stage-1 ``TrainerConfig`` and callbacks: ``detector.train_minutes`` (when set)
    replaces the epoch count by a wall-time budget."""
    import datetime as dt

    from lightning.pytorch.callbacks import Timer

    dc = cfg.detector
    tc = _trainer_cfg(dc.trainer, cfg.seed)
    extra: list[Callback] = []
    if dc.train_minutes:
        tc = dataclasses.replace(tc, max_epochs=100_000)  # the budget decides the length
        extra.append(TimeBudget(float(dc.train_minutes)))
        extra.append(Timer(duration=dt.timedelta(minutes=float(dc.train_minutes) * 1.05)))
    return tc, extra


def fit_dense_detector(
    cfg: MedicalConfig,
    scans: Sequence[PreparedScan],
    truth: Truth,
    logger: Any = None,
    extra_fit_scans: Sequence[PreparedScan] = (),
) -> Any:
    """Train :class:`apps.medical.dense.DenseHeatmapModel` on crops drawn on the fly from
    the training scans, then (when a validation part exists) set ``cfg.detector.nms_radius_mm``
    to the radius of ``nms_grid_mm`` with the best validation CPM. Mutates ``cfg`` on purpose:
    the chosen radius is saved with the predictor's config. ``extra_fit_scans`` join the
    fitting series after the validation split of ``scans``, so adding training data leaves
    the validation series (and their figures) comparable across runs."""
    from apps.medical.dense import DenseHeatmapModel

    dc = cfg.detector
    fit_scans, val_scans = split_validation(scans, cfg.data.val_fraction, cfg.data.split_seed)
    fit_scans += list(extra_fit_scans)
    torch.manual_seed(cfg.seed)
    model = DenseHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.stem_channels)
    loader = dense_crop_loader(cfg, fit_scans, truth, model.bank)
    tc, extra = dense_trainer_config(cfg)
    trainer = build_trainer(tc, extra_callbacks=extra, logger=logger)
    t0 = time.monotonic()
    trainer.fit(model, train_dataloaders=loader)
    loss = trainer.callback_metrics.get("train/loss_epoch")
    print(
        f"[medical] stage 1: {trainer.global_step} steps x {dc.batch_size} crops in "
        f"{time.monotonic() - t0:.0f} s, last epoch loss {float(loss) if loss is not None else float('nan'):.3f}",
        flush=True,
    )
    model = single_device_copy(model).cpu().eval()
    model.train_steps_ = int(trainer.global_step)
    if val_scans and dc.nms_grid_mm:
        dc.nms_radius_mm = tune_nms_radius(cfg, model, val_scans, truth)
    return model


def tune_nms_radius(
    cfg: MedicalConfig, model: Any, val_scans: Sequence[PreparedScan], truth: Truth
) -> float:
    """The radius of ``cfg.detector.nms_grid_mm`` with the best LUNA16 CPM on ``val_scans``
    (validation series, never the held-out ones); ties go to the first listed. That CPM is
    kept on the model as ``validation_cpm_``, so a benchmark can compare recipes on
    validation data instead of the held-out series."""
    from apps.medical.dense import candidates_from_heatmap, sliding_window_dense
    from apps.medical.froc import evaluate_froc

    dc = cfg.detector
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    maps = [
        sliding_window_dense(
            model,
            s.image,
            dc.crop_zyx,
            dc.infer_stride_zyx or dc.stride_zyx,
            dc.scoring_batch_size,
            dc.tta_flips,
        ).cpu()
        for s in val_scans
    ]
    model.cpu()
    uids = [s.seriesuid for s in val_scans]
    sub = truth.subset(uids)
    best, best_cpm = float(dc.nms_radius_mm), -1.0
    for r in dc.nms_grid_mm:
        cands = pd.concat(
            [
                candidates_from_heatmap(m, s, dc.threshold, float(r), dc.max_candidates)
                for m, s in zip(maps, val_scans, strict=True)
            ],
            ignore_index=True,
        )
        res = evaluate_froc(cands, sub.annotations, uids, sub.excluded)
        cpm = float(res.metrics()["cpm"])
        print(f"[medical] validation NMS {float(r):g} mm: CPM {cpm:.3f}", flush=True)
        if cpm > best_cpm:
            best, best_cpm = float(r), cpm
    model.validation_cpm_ = best_cpm
    return best


class TimeBudget(Callback):
    """Fit the run to a wall-time budget: from the measured step time (re-estimated every
    ``every`` steps) set the trainer's ``max_steps`` and stretch the warmup-cosine schedule
    to end there, so a budgeted run still finishes its learning-rate decay (a plain time
    limit would stop it at a high learning rate)."""

    def __init__(self, minutes: float, every: int = 50, first: int = 10) -> None:
        self.budget_s = 60.0 * float(minutes)
        self.every, self.first = int(every), int(first)
        self.t0 = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.t0 = time.monotonic()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        from core.optim import warmup_cosine_factor

        step = int(trainer.global_step)
        if step < self.first or (step != self.first and step % self.every):
            return
        elapsed = time.monotonic() - self.t0
        total = max(step + 1, int(self.budget_s * step / max(elapsed, 1e-6)))
        trainer.fit_loop.epoch_loop.max_steps = total
        oc = pl_module.optim_config
        for conf in trainer.lr_scheduler_configs:
            conf.scheduler.lr_lambdas = [
                partial(
                    warmup_cosine_factor,
                    warmup_steps=oc.warmup_steps,
                    total_steps=total,
                    min_ratio=oc.min_lr_ratio,
                )
                for _ in conf.scheduler.lr_lambdas
            ]
