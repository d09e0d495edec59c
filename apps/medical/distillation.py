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

Teacher and student must use the same crop and patch sizes per stage (same tokens).
No MLflow here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from apps.medical.config import MedicalConfig
from apps.medical.data import ensure_dataset, load_raw_scan, prepare, read_truth, split_series
from apps.medical.errors import MedicalDataError
from apps.medical.model import FPReductionModel, NoduleHeatmapModel
from apps.medical.predictor import NoduleDetector
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


def _check_teacher(teacher: NoduleDetector, cfg: MedicalConfig) -> None:
    if not isinstance(teacher, NoduleDetector):
        raise MedicalDataError(
            f"the teacher must be a NoduleDetector, got {type(teacher).__name__}"
        )
    tc = teacher.config
    for who, kind in (("teacher", tc.detector.kind), ("student", cfg.detector.kind)):
        if kind != "token":
            # the student below is a NoduleHeatmapModel matched on per-token logits; a dense
            # (per-voxel) detector has neither
            raise MedicalDataError(
                f"the {who} config has detector.kind={kind!r}: distillation supports the"
                " token detector only (detector.kind='token')"
            )
    pairs = [
        ("detector.crop_zyx", tc.detector.crop_zyx, cfg.detector.crop_zyx),
        ("detector.patch_zyx", tc.detector.patch_zyx, cfg.detector.patch_zyx),
        ("spacing_zyx", tc.spacing_zyx, cfg.spacing_zyx),
        ("window_hu", tc.window_hu, cfg.window_hu),
    ]
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
) -> DistillOutput:
    """Distil both stages of ``teacher`` into ``cfg``'s student, on the training series only."""
    _check_teacher(teacher, cfg)
    d1, d2 = stage_distill_configs(distill_cfg)
    root = ensure_dataset(cfg.data)
    truth = read_truth(root)
    train_uids, held = split_series(
        truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed
    )
    scans = [prepare(cfg, load_raw_scan(root, u)) for u in train_uids]
    tr_truth = truth.subset(train_uids)

    dc = cfg.detector
    samples = detector_samples(cfg, scans, tr_truth, np.random.default_rng(cfg.seed))
    torch.manual_seed(cfg.seed)
    det = NoduleHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.pos_weight, dc.offset_weight)
    loader = DataLoader(
        ArrayDataset(samples),
        batch_size=dc.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    det = distill_fit(
        det, teacher.detector, loader, None, _trainer_cfg(dc.trainer, cfg.seed), d1, logger
    )
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
