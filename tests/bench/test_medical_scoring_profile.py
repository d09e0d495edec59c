"""bench.medical_scoring_profile: student specs, the student reshaping the scale bench
shares, the filter-bank check and one model's profile on a tiny CPU detector."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from apps.medical.config import MedicalConfig
from apps.medical.dense import DenseHeatmapModel, occupied_window_starts
from apps.medical.preprocess import PreparedScan
from bench.medical_scoring_profile import _student_spec, bank_check, profile_model
from bench.scale_bench import dense_student_summary, reshape_dense_student


def test_student_specs_parse_and_bad_ones_are_refused():
    assert _student_spec("d32,s8,p4") == {"d": 32, "stem": 8, "patch": 4}
    assert _student_spec("d32,s16,p4,k0") == {"d": 32, "stem": 16, "patch": 4, "top_k": 0}
    for bad in ("d32,s8", "d32,s8,p4,k5", "x3,s8,p4", "d32,s8,pp"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected like"):
            _student_spec(bad)


def test_reshape_dense_student_changes_only_what_is_asked():
    det = MedicalConfig.named("synthetic_bench").detector
    before = dense_student_summary(det)
    reshape_dense_student(det)
    assert dense_student_summary(det) == before
    reshape_dense_student(det, stem=8, patch=6, full_attention=True)
    after = dense_student_summary(det)
    assert after == {**before, "stem_channels": 8, "patch_zyx": [6, 6, 6], "attention_top_k": None}
    with pytest.raises(SystemExit, match="must divide the crop"):
        reshape_dense_student(det, patch=5)  # 36 is not a multiple of 5


def _tiny_detector() -> DenseHeatmapModel:
    backbone = {
        "d_model": 16, "n_layers": 1, "ffn_hidden": 32, "n_dense_layers": 1, "moe": None,
        "attention": {"n_heads": 2, "gated": True, "top_k": 4},
    }  # fmt: skip
    cfg = MedicalConfig.from_dict({"detector": {"backbone": backbone}}).detector
    torch.manual_seed(0)
    return DenseHeatmapModel(cfg.backbone, None, (4, 4, 4), stem_channels=4, sigmas_vox=(1.0,))


def test_bank_check_and_one_model_profile_on_cpu():
    img = np.zeros((16, 20, 24), np.float32)
    img[2:14, 3:12, 4:20] = np.random.default_rng(0).random((12, 9, 16)).astype(np.float32)
    scan = PreparedScan(img, img > 0, np.eye(4), "1.2.3")
    model = _tiny_detector()
    check = bank_check(model.bank, img, "cpu")
    assert check["max_abs_diff"] == 0.0  # on the CPU the bank is the eager reference
    assert check["bank_ms"] > 0 and check["max_abs_value"] > 0
    dc = SimpleNamespace(crop_zyx=(8, 8, 8), stride_zyx=(8, 8, 8), infer_stride_zyx=None)
    row = profile_model("tiny", model, [scan], dc, 4, "cpu")
    want = len(occupied_window_starts(torch.from_numpy(img), (8, 8, 8), (8, 8, 8)))
    assert row["windows_per_scan"] == want
    assert row["scans_per_s_loop"] > 0 and row["scans_per_s_batched"] > 0
    parts = row["ms_per_4_windows"]
    assert set(parts) == {"forward", "stem_embed", "backbone", "decoder"}
    assert all(v > 0 for v in parts.values())
