"""App spec of the lung-nodule detector (LUNA16 protocol), discovered by ``pipelines``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from apps.medical.config import MedicalConfig, demo_config
from apps.medical.data import (
    ensure_dataset,
    load_prepared,
    load_raw_scan,
    read_truth,
    split_series,
)
from apps.medical.distillation import distill
from apps.medical.evaluation import PROTOCOL, evaluate_scans, froc_metrics
from apps.medical.predictor import NoduleDetector
from core.spec import AppSpec, EvalResult, TrainResult


def _split(cfg: MedicalConfig) -> tuple[Path, Any, list[str], list[str]]:
    root = ensure_dataset(cfg.data)
    truth = read_truth(root)
    train, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    return root, truth, train, held


def _protocol(cfg: MedicalConfig, n_held: int) -> str:
    split = (
        f"{n_held} series held out by series UID (seeded split, fraction "
        f"{cfg.data.heldout_fraction})"
        if cfg.data.heldout_fraction > 0
        else f"the {n_held} TRAINING series themselves (demo: measures memorisation, not "
        "generalisation)"
    )
    return PROTOCOL.format(split=split)


def evaluate(predictor: NoduleDetector, cfg: MedicalConfig) -> EvalResult:
    """FROC/CPM of ``predictor`` on the held-out series of ``cfg``'s dataset, with the FROC
    curve and overlays of the top findings of the first held-out scan as figures."""
    from apps.medical.froc import plot_froc
    from apps.medical.plots import plot_findings

    root, truth, _, held = _split(cfg)
    scans = [load_raw_scan(root, u) for u in held]
    result, cands = evaluate_scans(predictor.detect_volume, scans, truth.subset(held))
    figures = {"froc": plot_froc(result, labels=["held-out"])}
    if scans:
        first = scans[0]
        figures["top_findings"] = plot_findings(
            first.array,
            first.affine,
            cands[cands["seriesuid"] == first.series_uid],
            top=4,
            truth=truth.annotations,
            window_hu=cfg.window_hu,
            title="top findings, first held-out scan",
        )
    status = result.candidates[["seriesuid", "coordX", "coordY", "coordZ", "probability", "status"]]
    return EvalResult(
        metrics=froc_metrics(result),
        protocol=_protocol(cfg, len(held)),
        figures=figures,
        tables={"candidates": status, "nodules": result.nodules},
    )


def train(cfg: MedicalConfig, run: Any = None) -> TrainResult:
    """Stage 1 on crops of the training series, stage 2 on its false positives there, then
    LUNA16 evaluation on the held-out series."""
    from apps.medical.training import fit_detector, fit_fp_reduction
    from core.tracking import fingerprint_paths

    root, truth, train_uids, held = _split(cfg)
    scans = load_prepared(cfg, root, train_uids)
    tr_truth = truth.subset(train_uids)
    from core.tracking import lightning_logger

    logger = lightning_logger(run)
    detector = fit_detector(cfg, scans, tr_truth, logger=logger)
    fp_logger = lightning_logger(run)
    if fp_logger is not None:
        fp_logger._prefix = "fp_reduction"  # stage-2 curves apart from stage 1's
    fp = (
        fit_fp_reduction(cfg, detector, scans, tr_truth, logger=fp_logger)
        if cfg.fp_reduction.enabled
        else None
    )
    predictor = NoduleDetector(cfg, detector, fp)
    evaluation = evaluate(predictor, cfg)
    series_dirs = [root / "dicom" / u for u in truth.seriesuids if (root / "dicom" / u).is_dir()]
    fingerprint = fingerprint_paths([*series_dirs, root / "annotations.csv"])
    example = pd.DataFrame({"series_path": [str(root / "dicom" / held[0])]})
    limits = [
        "trained and evaluated on synthetic phantoms unless data.root points at real CT",
        "candidates limited to the (dilated) threshold lung mask",
    ]
    if cfg.data.heldout_fraction <= 0:
        limits.append("demo: evaluated on its own training series (overfits by design)")
    return TrainResult(
        predictor=predictor,
        evaluation=evaluation,
        input_example=example,
        data_fingerprint=fingerprint,
        extra={"known_limits": limits},
    )


SPEC = AppSpec(
    name="medical",
    description="lung-nodule detection on chest CT (two-stage DGA/MoE detector, LUNA16 FROC)",
    config_cls=MedicalConfig,
    train=train,
    evaluate=evaluate,
    predictor_cls=NoduleDetector,
    primary_metric="cpm",
    guard_metrics={"sensitivity_at_4fp": ("max", 0.02)},
    demo_config=demo_config,
    distill=distill,
    summary_metrics=("sensitivity_at_1fp", "sensitivity_at_4fp", "cpm"),
)


def demo_score_input(out_dir: Path, cfg: MedicalConfig) -> Path:
    """A CSV of series folders to batch-score, with one missing folder to show a reject."""
    root, truth, _, held = _split(cfg)
    paths = [str(root / "dicom" / u) for u in held]
    paths.append(str(Path(out_dir) / "no_such_series"))
    path = Path(out_dir) / "medical_input.csv"
    pd.DataFrame({"series_path": paths}).to_csv(path, index=False)
    return path
