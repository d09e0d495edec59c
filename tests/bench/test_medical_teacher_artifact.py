"""The committed medical distillation teacher (bench/artifacts/medical_teacher) loads with
today's code, has the architecture its README states, and scores a volume."""

from __future__ import annotations

from pathlib import Path

import torch

from apps.medical.predictor import NoduleDetector
from bench.scale_bench import count_active_params

ARTIFACT = Path(__file__).resolve().parents[2] / "bench" / "artifacts" / "medical_teacher"


def test_committed_teacher_loads_with_its_stated_size_and_scores_a_window():
    teacher = NoduleDetector.load(ARTIFACT)
    det = teacher.detector.eval()
    assert count_active_params(det) == 557_297  # the README's and scale.json's figure
    assert sum(p.numel() for p in det.parameters()) == 1_054_961
    assert teacher.fp_model is None  # stage 1 only, as the bench distils it
    crop = tuple(int(c) for c in teacher.config.detector.crop_zyx)
    torch.manual_seed(0)
    vol = torch.rand(1, 1, *crop)
    with torch.inference_mode():
        feats = det.features_of(vol)
        logits = det({"features": feats})
    assert logits.shape == (1, *crop)
    assert torch.isfinite(logits).all()


def test_scoring_profile_times_against_the_committed_teacher_by_default():
    from bench.medical_scoring_profile import build_parser

    args = build_parser().parse_args(["--data", "npz"])
    assert Path(args.teacher_dir) == ARTIFACT
    assert (ARTIFACT / "detector.pt").is_file() and (ARTIFACT / "config.yaml").is_file()
