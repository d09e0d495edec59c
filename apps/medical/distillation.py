"""Distil a (registered) two-stage nodule detector into the student described by a config.

Same protocol as :func:`apps.medical.spec.train`: crops from the TRAINING series only
(split by series UID), LUNA16 FROC/CPM on the held-out series via
:func:`apps.medical.spec.evaluate`. Each stage is distilled from the teacher's stage:

* stage 1 (heat map): per-token nodule logits ``logit_BT`` on the same crops; soft target
  = tempered two-class KL per token (``logits_key="logit_BT"``, ``kind="binary"``); the
  centre-offset regression is learned from the task loss only (weight ``1 - alpha``).
* stage 2 (FP reduction): the student's OWN stage-1 false positives on the training series
  (what its pipeline will see at scoring time) plus jittered nodule crops; soft target =
  the teacher's FP-reduction logit (binary KL). Skipped when the student config disables
  stage 2 or the teacher has none.

A dense (per-voxel) detector (``detector.kind="dense"``, both sides) is distilled on the
same random crops its own training uses (:func:`apps.medical.training.dense_crop_loader`):
soft target = the teacher's voxel logits (tempered two-class KL per voxel), summed over each
crop's voxels (``position_reduction="sum"``) so it has the scale of the CenterNet focal loss
(a sum over voxels divided by the few centre voxels); the NMS radius is then chosen on the
validation part of the training series, as :func:`apps.medical.training.fit_dense_detector`
does.

Teacher and student must use the same crop sizes per stage, and the same patch sizes
(same tokens) except for a dense student without hidden-state matching, whose per-voxel
target does not depend on its tokens.
No MLflow here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from apps.medical.config import MedicalConfig
from apps.medical.data import (
    ensure_dataset,
    load_prepared,
    read_truth,
    split_series,
)
from apps.medical.errors import MedicalDataError
from apps.medical.model import FPReductionModel, NoduleHeatmapModel
from apps.medical.predictor import NoduleDetector
from apps.medical.preprocess import PreparedScan
from apps.medical.training import ArrayDataset, detector_samples, fp_samples
from core.distill import DistillConfig, count_active_params, distill_fit
from core.spec import TrainResult


def stage_distill_configs(
    cfg: DistillConfig | dict | None = None,
) -> tuple[DistillConfig, DistillConfig]:
    """(stage 1, stage 2) configs: ``cfg``'s alpha / temperature, each stage's logits."""
    d = cfg if isinstance(cfg, DistillConfig) else DistillConfig.from_dict(dict(cfg or {}))
    kind = "binary" if d.kind == "auto" else d.kind
    return (
        dataclasses.replace(d, kind=kind, logits_key="logit_BT"),
        dataclasses.replace(d, kind=kind),
    )


def _check_teacher(teacher: NoduleDetector, cfg: MedicalConfig, d1: DistillConfig) -> None:
    if not isinstance(teacher, NoduleDetector):
        raise MedicalDataError(
            f"the teacher must be a NoduleDetector, got {type(teacher).__name__}"
        )
    tc = teacher.config
    kinds = {tc.detector.kind, cfg.detector.kind}
    if kinds - {"token", "dense"} or len(kinds) != 1:
        raise MedicalDataError(
            f"teacher detector.kind={tc.detector.kind!r} but the student config has"
            f" {cfg.detector.kind!r}: both must be 'token' or both 'dense'"
        )
    pairs = [
        ("detector.crop_zyx", tc.detector.crop_zyx, cfg.detector.crop_zyx),
        ("spacing_zyx", tc.spacing_zyx, cfg.spacing_zyx),
        ("window_hu", tc.window_hu, cfg.window_hu),
    ]
    # A dense student learns the teacher's per-voxel map, which has the crop's shape
    # whatever the patch, so it may use coarser tokens (fewer, cheaper); per-token targets
    # (the token detector) and hidden-state matching need the same tokens on both sides.
    if cfg.detector.kind != "dense" or d1.hidden_weight > 0:
        pairs.append(("detector.patch_zyx", tc.detector.patch_zyx, cfg.detector.patch_zyx))
    if cfg.fp_reduction.enabled and teacher.fp_model is not None:
        pairs += [
            ("fp_reduction.crop_zyx", tc.fp_reduction.crop_zyx, cfg.fp_reduction.crop_zyx),
            ("fp_reduction.patch_zyx", tc.fp_reduction.patch_zyx, cfg.fp_reduction.patch_zyx),
        ]
    for name, t, s in pairs:
        if tuple(float(v) for v in t) != tuple(float(v) for v in s):
            raise MedicalDataError(
                f"teacher {name}={tuple(t)} but the student config has {tuple(s)}: teacher and"
                " student must read the same crops and tokens"
            )


def _trainer_cfg(tc: Any, seed: int) -> Any:
    return dataclasses.replace(tc, seed=seed if tc.seed is not None else None)


def _distill_token_detector(
    cfg: MedicalConfig,
    teacher: NoduleDetector,
    scans: list[Any],
    truth: Any,
    d1: DistillConfig,
    logger: Any,
) -> NoduleHeatmapModel:
    dc = cfg.detector
    samples = detector_samples(cfg, scans, truth, np.random.default_rng(cfg.seed))
    torch.manual_seed(cfg.seed)
    det = NoduleHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.pos_weight, dc.offset_weight)
    loader = DataLoader(
        ArrayDataset(samples),
        batch_size=dc.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return distill_fit(
        det, teacher.detector, loader, None, _trainer_cfg(dc.trainer, cfg.seed), d1, logger
    )


def teacher_centres(
    teacher: NoduleDetector, scans: Sequence[PreparedScan], per_scan: int
) -> list[np.ndarray]:
    """Per scan, the prepared-grid ``zyx`` of the teacher's ``per_scan`` best stage-1
    candidates (its own threshold and NMS radius): where an unlabeled scan's crops are
    centred, so the transfer set holds what the teacher calls nodules (true ones and its
    hardest mimics) and not only background. Needs a dense teacher."""
    from apps.medical.dense import candidates_from_heatmap, sliding_window_dense

    tc = teacher.config.detector
    if tc.kind != "dense":
        raise MedicalDataError("unlabeled transfer-set scans need a dense teacher")
    if per_scan < 1:
        raise MedicalDataError(f"per_scan={per_scan}: expected >= 1 centre per unlabeled scan")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = teacher.detector.to(device).eval()
    out = []
    with torch.inference_mode():
        for s in scans:
            prob = sliding_window_dense(
                model,
                s.image,
                tc.crop_zyx,
                tc.infer_stride_zyx or tc.stride_zyx,
                tc.scoring_batch_size,
                tc.tta_flips,
            )
            c = candidates_from_heatmap(prob, s, tc.threshold, tc.nms_radius_mm, per_scan)
            out.append(c[["z", "y", "x"]].to_numpy(np.float64).reshape(-1, 3))
    teacher.detector.cpu()
    return out


def distill_dense_detector(
    cfg: MedicalConfig,
    teacher: NoduleDetector,
    scans: list[Any],
    truth: Any,
    d1: DistillConfig,
    logger: Any = None,
    unlabeled_scans: Sequence[PreparedScan] = (),
    centres_per_unlabeled_scan: int = 6,
) -> Any:
    """Stage 1 of a dense student against the teacher's dense heat map, on the crops and
    schedule (``train_minutes`` or epochs) that :func:`fit_dense_detector` would use, so a
    scratch student of the same config gets the same budget. Mutates
    ``cfg.detector.nms_radius_mm`` (chosen on the validation part), as training does.

    ``unlabeled_scans``: a transfer set (series without truth; never validation or
    held-out series): they join the crop pool with zero task-loss weight, positives drawn
    near the teacher's ``centres_per_unlabeled_scan`` best candidates (:func:`teacher_centres`),
    so the student learns the teacher's map on more scans than are labelled. The step
    budget stays the scratch student's (same crops per epoch, same epochs)."""
    from apps.medical.dense import DenseHeatmapModel
    from apps.medical.training import (
        dense_crop_loader,
        dense_trainer_config,
        split_validation,
        tune_nms_radius,
    )

    dc = cfg.detector
    fit_scans, val_scans = split_validation(scans, cfg.data.val_fraction, cfg.data.split_seed)
    torch.manual_seed(cfg.seed)
    student = DenseHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.stem_channels)
    if tuple(student.bank.sigmas) != tuple(teacher.detector.bank.sigmas):
        raise MedicalDataError(
            f"teacher filter-bank scales {teacher.detector.bank.sigmas} differ from the"
            f" student's {student.bank.sigmas}: both read the same precomputed features"
        )
    unlabeled = []
    if unlabeled_scans:
        centres = teacher_centres(teacher, unlabeled_scans, centres_per_unlabeled_scan)
        unlabeled = list(zip(unlabeled_scans, centres, strict=True))
    loader = dense_crop_loader(cfg, fit_scans, truth, student.bank, unlabeled)
    tc, extra = dense_trainer_config(cfg)
    dense_cfg = dataclasses.replace(d1, position_reduction="sum")
    student = distill_fit(student, teacher.detector, loader, None, tc, dense_cfg, logger, extra)
    if val_scans and dc.nms_grid_mm:
        dc.nms_radius_mm = tune_nms_radius(cfg, student, val_scans, truth)
    return student


@dataclasses.dataclass
class DistillOutput:
    predictor: NoduleDetector
    train_uids: list[str]
    heldout_uids: list[str]
    student_active_params: int
    teacher_active_params: int


def distill_fit_predictor(
    cfg: MedicalConfig,
    teacher: NoduleDetector,
    distill_cfg: DistillConfig | dict | None = None,
    logger: Any = None,
    scans: Sequence[PreparedScan] | None = None,
    unlabeled_scans: Sequence[PreparedScan] = (),
) -> DistillOutput:
    """Distil both stages of ``teacher`` into ``cfg``'s student, on the training series only.

    ``scans``: the training series already prepared on ``cfg``'s grid (in the order of the
    split's training UIDs), for callers that hold them, since preparing them again costs
    more than a short distillation run; checked against the split. ``unlabeled_scans``:
    a transfer set for a dense student's stage 1 (:func:`distill_dense_detector`); none of
    them may be a held-out series.
    """
    d1, d2 = stage_distill_configs(distill_cfg)
    _check_teacher(teacher, cfg, d1)
    root = ensure_dataset(cfg.data)
    truth = read_truth(root)
    train_uids, held = split_series(
        truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed
    )
    if scans is None:
        scans = load_prepared(cfg, root, train_uids)
    elif [s.seriesuid for s in scans] != list(train_uids):
        raise MedicalDataError(
            f"distill_fit_predictor: the {len(scans)} prepared scans given are not the "
            f"{len(train_uids)} training series of the split (heldout_fraction="
            f"{cfg.data.heldout_fraction}, split_seed={cfg.data.split_seed}) in order"
        )
    tr_truth = truth.subset(train_uids)

    leaked = sorted({s.seriesuid for s in unlabeled_scans} & set(held))
    if leaked:
        raise MedicalDataError(
            f"unlabeled transfer-set scans include held-out series {leaked[:3]}: the held-out"
            " series must stay unseen"
        )
    if unlabeled_scans and cfg.detector.kind != "dense":
        raise MedicalDataError("unlabeled transfer-set scans are wired for a dense student only")
    if cfg.detector.kind == "dense":
        det = distill_dense_detector(
            cfg, teacher, scans, tr_truth, d1, logger, unlabeled_scans=unlabeled_scans
        )
    else:
        det = _distill_token_detector(cfg, teacher, scans, tr_truth, d1, logger)
    fp = None
    teacher_params = count_active_params(teacher.detector)
    if cfg.fp_reduction.enabled and teacher.fp_model is not None:
        fc = cfg.fp_reduction
        device = "cuda" if torch.cuda.is_available() else "cpu"
        fp_data = fp_samples(
            cfg, det.to(device), scans, tr_truth, np.random.default_rng(cfg.seed + 1)
        )
        det.cpu()
        torch.manual_seed(cfg.seed + 1)
        fp = FPReductionModel(fc.backbone, fc.optim, fc.patch_zyx)
        if logger is not None:
            fp._log_hyperparams = False  # stage 1 already logged the run's hyperparameters
        loader = DataLoader(
            ArrayDataset(fp_data, flip=True),
            batch_size=fc.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed + 1),
        )
        fp = distill_fit(
            fp, teacher.fp_model, loader, None, _trainer_cfg(fc.trainer, cfg.seed + 1), d2, logger
        )
        teacher_params += count_active_params(teacher.fp_model)
    student_params = count_active_params(det) + (count_active_params(fp) if fp else 0)
    return DistillOutput(
        NoduleDetector(cfg, det, fp), train_uids, held, student_params, teacher_params
    )


def distill(
    cfg: MedicalConfig,
    teacher: NoduleDetector,
    run: Any = None,
    distill_cfg: DistillConfig | dict | None = None,
) -> TrainResult:
    """``AppSpec.distill``: distil both stages, then the LUNA16 evaluation of ``spec.train``."""
    from apps.medical.spec import evaluate
    from core.tracking import fingerprint_paths, lightning_logger

    logger = lightning_logger(run)
    out = distill_fit_predictor(cfg, teacher, distill_cfg, logger=logger)
    evaluation = evaluate(out.predictor, cfg)
    evaluation.protocol += f" Distilled student (both stages), distillation {distill_cfg or {}}."
    root = ensure_dataset(cfg.data)
    series = [root / "dicom" / u for u in [*out.train_uids, *out.heldout_uids]]
    return TrainResult(
        predictor=out.predictor,
        evaluation=evaluation,
        input_example=pd.DataFrame({"series_path": [str(root / "dicom" / out.heldout_uids[0])]}),
        data_fingerprint=fingerprint_paths(
            [*[p for p in series if p.is_dir()], root / "annotations.csv"]
        ),
        extra={
            "known_limits": [
                "trained and evaluated on synthetic phantoms unless data.root points at real CT",
                "distilled student: stage-1 logits and stage-2 logits matched to the teacher's",
            ],
            "student_active_params": out.student_active_params,
            "teacher_active_params": out.teacher_active_params,
        },
    )
