"""Distilling a two-stage nodule detector into a smaller student (``distillation.py``)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.medical.data import ensure_dataset, load_raw_scan, prepare, read_truth, split_series
from apps.medical.distillation import distill, distill_fit_predictor, stage_distill_configs
from apps.medical.errors import MedicalDataError
from apps.medical.predictor import NoduleDetector
from apps.medical.training import detector_samples, fit_detector, fit_fp_reduction
from core.spec import TrainResult
from tests.apps.medical.tiny import tiny_config, tiny_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher_setup(tmp_path_factory):
    root = tiny_dataset(tmp_path_factory.mktemp("med_distill"))
    cfg = tiny_config(root)
    cfg.detector.trainer.max_epochs = 3
    truth = read_truth(ensure_dataset(cfg.data))
    train, _ = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    scans = [prepare(cfg, load_raw_scan(root, u)) for u in train]
    det = fit_detector(cfg, scans, truth.subset(train))
    fp = fit_fp_reduction(cfg, det, scans, truth.subset(train))
    return cfg, NoduleDetector(cfg, det, fp), scans, truth.subset(train)


def _student(cfg):
    s = copy.deepcopy(cfg)
    for stage in (s.detector, s.fp_reduction):
        stage.backbone.d_model = 8
        stage.backbone.n_layers = 1
        stage.backbone.ffn_hidden = 16
        stage.backbone.moe = None
        stage.backbone.attention.n_heads = 2
    return s


def test_stage_configs() -> None:
    d1, d2 = stage_distill_configs({"alpha": 0.6})
    assert (d1.logits_key, d1.kind, d1.alpha) == ("logit_BT", "binary", 0.6)
    assert (d2.logits_key, d2.kind) == ("logits", "binary")


def test_shipped_distill_config_keeps_its_temperature() -> None:
    """``apps/medical/configs/distill.yaml`` (the ``--distill-config`` the docs name): the
    validation-chosen temperature 0.5 reaches both stages' teacher terms, and its alpha is
    the one the recorded headline figure (``bench/results/scale.json``) trained with."""
    from pathlib import Path

    from core.distill import DistillConfig

    root = Path(__file__).parents[3]
    d1, d2 = stage_distill_configs(
        DistillConfig.from_yaml(root / "apps/medical/configs/distill.yaml")
    )
    headline = json.loads((root / "bench/results/scale.json").read_text())
    details = headline["medical_student_retention"]["details"]
    assert (d1.temperature, d2.temperature) == (0.5, 0.5) == (details["temperature"],) * 2
    assert d1.alpha == d2.alpha == details["alpha"] == 0.3


def test_student_heatmap_tracks_teacher(teacher_setup) -> None:
    cfg, teacher, scans, truth = teacher_setup
    scfg = _student(cfg)
    scfg.detector.trainer.max_epochs = 10
    scfg.detector.optim.warmup_steps = 0
    scfg.detector.optim.lr = 5e-3
    samples = detector_samples(cfg, scans, truth, np.random.default_rng(123))
    batch = {"image": torch.from_numpy(samples["image"])}
    with torch.no_grad():
        t_logit = teacher.detector.eval()(batch)["logit_BT"]
    before = {k: v.clone() for k, v in teacher.detector.state_dict().items()}
    out = distill_fit_predictor(scfg, teacher, {"alpha": 1.0})
    torch.manual_seed(scfg.seed)
    from apps.medical.model import NoduleHeatmapModel

    dc = scfg.detector
    init = NoduleHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx).eval()
    with torch.no_grad():
        i_logit = init(batch)["logit_BT"]
        s_logit = out.predictor.detector.eval()(batch)["logit_BT"]
    gap_init = float((i_logit - t_logit).pow(2).mean().sqrt())
    gap = float((s_logit - t_logit).pow(2).mean().sqrt())
    assert gap < 0.8 * gap_init, (gap_init, gap)
    assert out.predictor.fp_model is not None
    assert out.student_active_params * 4 < out.teacher_active_params
    for k, v in teacher.detector.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_spec_hook_and_crop_mismatch(teacher_setup) -> None:
    cfg, teacher, _, _ = teacher_setup
    res = distill(_student(cfg), teacher, distill_cfg={"alpha": 0.5})
    assert isinstance(res, TrainResult)
    assert math.isfinite(res.evaluation.metrics["cpm"])
    assert 0 <= res.evaluation.metrics["cpm"] <= 1
    bad = _student(cfg)
    bad.detector.patch_zyx = (2, 2, 2)
    with pytest.raises(MedicalDataError, match="detector.patch_zyx"):
        distill_fit_predictor(bad, teacher)
    # prepared scans handed in must be the split's training series, in order
    with pytest.raises(MedicalDataError, match="not the .* training series"):
        distill_fit_predictor(_student(cfg), teacher, scans=[])


def _dense(cfg):
    d = copy.deepcopy(cfg)
    d.detector.kind = "dense"
    d.detector.stem_channels = 4
    d.detector.samples_per_epoch = 16
    d.detector.nms_grid_mm = ()
    d.fp_reduction.enabled = False
    return d


def test_dense_student_voxel_logits_track_the_dense_teacher(teacher_setup) -> None:
    """The per-voxel heat map distils too: with alpha 1 the student's voxel logits move
    toward the teacher's (on crops it never trained on), the teacher is untouched, and a
    token/dense mix is refused."""
    from apps.medical.dense import DenseHeatmapModel

    cfg, token_teacher, scans, truth = teacher_setup
    tcfg = _dense(cfg)
    tcfg.detector.trainer.max_epochs = 2
    teacher = NoduleDetector(tcfg, fit_detector(tcfg, scans, truth), None)
    scfg = _dense(_student(cfg))
    scfg.detector.trainer.max_epochs = 6
    scfg.detector.optim.warmup_steps = 0
    scfg.detector.optim.lr = 5e-3
    torch.manual_seed(7)
    image = torch.rand(3, 1, 16, 16, 16)
    batch = {"features": teacher.detector.features_of(image)}
    with torch.no_grad():
        t_logit = teacher.detector.eval()(dict(batch))
    before = {k: v.clone() for k, v in teacher.detector.state_dict().items()}
    out = distill_fit_predictor(scfg, teacher, {"alpha": 1.0})
    torch.manual_seed(scfg.seed)
    dc = scfg.detector
    init = DenseHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.stem_channels).eval()
    with torch.no_grad():
        i_logit = init(dict(batch))
        s_logit = out.predictor.detector.eval()(dict(batch))
    gap_init = float((i_logit - t_logit).pow(2).mean().sqrt())
    gap = float((s_logit - t_logit).pow(2).mean().sqrt())
    assert gap < 0.8 * gap_init, (gap_init, gap)
    assert out.predictor.fp_model is None
    for k, v in teacher.detector.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(MedicalDataError, match="both must be 'token' or both 'dense'"):
        distill_fit_predictor(scfg, token_teacher)

    # coarser student tokens: the voxel target has the crop's shape whatever the patch
    coarse = _dense(_student(cfg))
    coarse.detector.patch_zyx = tuple(2 * p for p in dc.patch_zyx)
    coarse.detector.trainer.max_epochs = 1
    res = distill_fit_predictor(coarse, teacher, {"alpha": 1.0})
    with torch.no_grad():
        c_logit = res.predictor.detector.eval()(dict(batch))
    assert c_logit.shape == t_logit.shape and torch.isfinite(c_logit).all()
    # ... but hidden-state matching compares tokens, so it needs the same ones
    with pytest.raises(MedicalDataError, match="detector.patch_zyx"):
        distill_fit_predictor(
            coarse, teacher, {"alpha": 1.0, "hidden_weight": 1.0, "layer_map": {1: 1}}
        )


def test_dense_transfer_set_uses_teacher_centres_and_never_held_out_series(
    teacher_setup,
) -> None:
    """Unlabeled transfer-set scans: their crop centres are the dense teacher's best
    candidates (what ``detect`` would return first), a student distils with them, and a
    held-out series offered as unlabeled data is refused."""
    import dataclasses

    from apps.medical.dense import detect_scan_dense
    from apps.medical.distillation import teacher_centres

    cfg, _, scans, truth = teacher_setup
    tcfg = _dense(cfg)
    tcfg.detector.trainer.max_epochs = 1
    teacher = NoduleDetector(tcfg, fit_detector(tcfg, scans, truth), None)
    # unlabeled copies of the training scans under new series UIDs (no truth rows exist)
    extra = [dataclasses.replace(s, seriesuid=f"{s.seriesuid}.9") for s in scans]
    centres = teacher_centres(teacher, extra, per_scan=2)
    assert sum(len(c) for c in centres) > 0
    dc = tcfg.detector
    for s, c in zip(extra, centres, strict=True):
        want = detect_scan_dense(
            teacher.detector,
            s,
            dc.crop_zyx,
            dc.infer_stride_zyx or dc.stride_zyx,
            dc.threshold,
            dc.nms_radius_mm,
            2,
            batch_size=dc.scoring_batch_size,
        )
        assert c.shape == (len(want), 3) and len(want) <= 2
        np.testing.assert_allclose(c, want[["z", "y", "x"]].to_numpy(), atol=1e-6)
    scfg = _dense(_student(cfg))
    scfg.detector.trainer.max_epochs = 1
    out = distill_fit_predictor(scfg, teacher, {"alpha": 0.7}, unlabeled_scans=extra)
    assert all(torch.isfinite(p).all() for p in out.predictor.detector.parameters())
    root = ensure_dataset(cfg.data)
    full = read_truth(root)
    _, held = split_series(full.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    held_scan = prepare(cfg, load_raw_scan(root, held[0]))
    with pytest.raises(MedicalDataError, match="include held-out series"):
        distill_fit_predictor(scfg, teacher, {"alpha": 0.7}, unlabeled_scans=[held_scan])


def test_shipped_student_config_fits_the_bench_teacher() -> None:
    """``configs/student.yaml`` is the synthetic_bench detector with a small backbone: it
    reads the teacher's crops, grid and filter bank (so distillation accepts the pair), has
    at least 4x fewer active parameters, and keeps every key (full attention)."""
    from apps.medical.config import MedicalConfig
    from apps.medical.distillation import _check_teacher, stage_distill_configs
    from apps.medical.predictor import build_detector
    from core.distill import count_active_params

    tcfg, scfg = MedicalConfig.named("synthetic_bench"), MedicalConfig.named("student")
    teacher = NoduleDetector(tcfg, build_detector(tcfg), None)
    d1, _ = stage_distill_configs({"alpha": 0.7, "temperature": 0.5})
    _check_teacher(teacher, scfg, d1)
    ratio = count_active_params(teacher.detector) / count_active_params(build_detector(scfg))
    assert ratio >= 4.0, ratio
    assert scfg.detector.backbone.attention.top_k is None
    assert (scfg.detector.crop_zyx, scfg.spacing_zyx) == (tcfg.detector.crop_zyx, tcfg.spacing_zyx)
    # the shipped schedule is the one the recorded headline figure trained
    scale = Path(__file__).resolve().parents[3] / "bench" / "results" / "scale.json"
    headline = json.loads(scale.read_text())["medical_student_retention"]["details"]
    assert scfg.detector.trainer.max_epochs == headline["epochs_per_stage"] == 60
