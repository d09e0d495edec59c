"""NoduleDetector: plain-file round trip, per-series rejects, safe outputs."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from apps.medical.errors import MedicalDataError
from apps.medical.predictor import (
    NoduleDetector,
    build_detector,
    build_fp_model,
    path_inside,
    safe_name,
)
from tests.apps.medical.tiny import tiny_config, tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("medical_pred"), n_series=2, seed=11)


def _predictor(cfg) -> NoduleDetector:
    torch.manual_seed(0)
    return NoduleDetector(cfg, build_detector(cfg), build_fp_model(cfg))


def test_save_load_round_trip_gives_identical_predictions(data, tmp_path):
    cfg = tiny_config(data)
    pred = _predictor(cfg)
    frame = pd.DataFrame({"series_path": [str(p) for p in sorted((data / "dicom").iterdir())]})
    before = pred.predict(frame)
    pred.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.yaml",
        "detector.pt",
        "fp_reduction.pt",
    ]
    after = NoduleDetector.load(tmp_path / "model").predict(frame)
    assert len(before) > 2 and before["reject_reason"].isna().all()
    pd.testing.assert_frame_equal(before, after)
    assert list(before.columns) == [
        "seriesuid",
        "coordX",
        "coordY",
        "coordZ",
        "probability",
        "series_path",
        "reject_reason",
    ]


def test_bad_series_is_reported_and_others_still_scored(data, tmp_path):
    good = sorted((data / "dicom").iterdir())
    broken = tmp_path / "broken"
    shutil.copytree(good[0], broken)
    files = sorted(broken.glob("*.dcm"))
    from apps.medical.dicom_io import load_series

    vol = load_series(broken)
    # remove a middle slice (by position): the series now has a gap
    import pydicom

    mid_z = vol.origin[2] + vol.spacing[0] * (vol.shape[0] // 2)
    for f in files:
        if (
            abs(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) - mid_z)
            < 1e-3
        ):
            f.unlink()
    frame = pd.DataFrame(
        {"series_path": [str(good[1]), str(broken), str(tmp_path / "missing"), None]}
    )
    out = _predictor(tiny_config(data)).predict(frame)
    rejected = out[out["reject_reason"].notna()]
    assert len(rejected) == 3  # one row per bad input
    assert rejected[["coordX", "coordY", "coordZ", "probability"]].isna().all().all()
    assert "DicomSeriesError" in rejected.iloc[0]["reject_reason"]
    scored = out[out["reject_reason"].isna()]
    assert len(scored) >= 1 and (scored["series_path"] == str(good[1])).all()
    assert np.isfinite(scored[["coordX", "coordY", "coordZ"]].to_numpy()).all()


def test_outputs_carry_no_patient_identity_and_sr_stays_in_its_folder(data, tmp_path):
    pred = _predictor(tiny_config(data))
    pred.sr_dir = tmp_path / "sr"
    frame = pd.DataFrame({"series_path": [str(sorted((data / "dicom").iterdir())[0])]})
    out = pred.predict(frame)
    text = out.to_csv(index=False)
    assert "Synthetic" not in text and "KEEL-SYNTH" not in text
    written = list((tmp_path / "sr").iterdir())
    assert len(written) == 1 and written[0].name == safe_name(out["seriesuid"].iloc[0], ".dcm")
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    with pytest.raises(MedicalDataError):
        path_inside(tmp_path, "../escape.dcm")


def test_fuse_scores_is_the_weighted_geometric_mean() -> None:
    from apps.medical.model import fuse_scores

    p1, p2 = np.array([0.9, 0.04, 0.5, 0.0]), np.array([0.1, 0.81, 0.5, 0.7])
    np.testing.assert_allclose(fuse_scores(p1, p2, 0.5), [0.3, 0.18, 0.5, 0.0])
    np.testing.assert_allclose(fuse_scores(p1, p2, 0.25), p1**0.75 * p2**0.25)
    np.testing.assert_array_equal(fuse_scores(p1, p2, 1.0), p2)
    np.testing.assert_array_equal(fuse_scores(p1, p2, 0.0), p1)
    with pytest.raises(ValueError, match="score_weight"):
        fuse_scores(p1, p2, 1.5)


def test_stage2_weight_blends_the_two_stages_in_detect(data):
    """weight 0 gives stage 1's probabilities, 1 stage 2's, 0.5 their geometric mean; the
    candidates' positions never change."""
    from apps.medical.data import load_raw_scan, prepare, read_truth
    from apps.medical.model import score_candidates

    cfg = tiny_config(data)
    pred = _predictor(cfg)
    scan = prepare(cfg, load_raw_scan(data, read_truth(data).seriesuids[0]))
    cfg.fp_reduction.enabled = False
    stage1 = pred.detect(scan)
    assert len(stage1) > 2
    pts = stage1[["z", "y", "x"]].to_numpy()
    p2 = score_candidates(pred.fp_model, scan.image, pts, cfg.fp_reduction.crop_zyx)
    cfg.fp_reduction.enabled = True
    by_pos = ["z", "y", "x"]
    for w, expected in ((0.0, stage1["probability"]), (1.0, p2), (0.5, None)):
        cfg.fp_reduction.score_weight = w
        out = pred.detect(scan).sort_values(by_pos).reset_index(drop=True)
        ref = stage1.assign(probability=expected if expected is not None else 0.0)
        if expected is None:
            ref = stage1.assign(probability=np.sqrt(stage1["probability"].to_numpy() * p2))
        ref = ref.sort_values(by_pos).reset_index(drop=True)
        np.testing.assert_allclose(out[by_pos].to_numpy(), ref[by_pos].to_numpy())
        np.testing.assert_allclose(out["probability"], ref["probability"], rtol=1e-6)


def test_choose_score_weight_keeps_stage1_order_when_stage2_knows_nothing(data):
    """A stage 2 that scores every candidate alike (zeroed head) ties them all when used
    alone (w=1), so any fusion with w < 1 keeps stage 1's perfect ranking and wins on the
    validation CPM; ties go to the first weight listed (0.5 before 0)."""
    from apps.medical.data import load_raw_scan, prepare, read_truth
    from apps.medical.training import choose_score_weight

    cfg = tiny_config(data)
    truth = read_truth(data)
    uids = list(truth.seriesuids)
    scans = [prepare(cfg, load_raw_scan(data, u)) for u in uids]
    fp = build_fp_model(cfg)
    with torch.no_grad():
        fp.head.weight.zero_()
        fp.head.bias.zero_()
    frames = []
    for u in uids:
        nod = truth.annotations[truth.annotations["seriesuid"] == u]
        assert len(nod) >= 1
        xyz = nod[["coordX", "coordY", "coordZ"]].to_numpy()
        far = xyz + np.array([400.0, 400.0, 0.0])  # outside every nodule's radius
        pts = np.vstack([xyz, far, far + 50.0])
        prob = np.r_[np.full(len(xyz), 0.9), np.full(len(xyz), 0.3), np.full(len(xyz), 0.2)]
        frames.append(
            pd.DataFrame(
                {
                    "seriesuid": u,
                    "coordX": pts[:, 0],
                    "coordY": pts[:, 1],
                    "coordZ": pts[:, 2],
                    "probability": prob,
                    "z": 1.0,
                    "y": 1.0,
                    "x": 1.0,
                }
            )
        )
    cfg.fp_reduction.score_weight_grid = (1.0, 0.5, 0.0)
    assert choose_score_weight(cfg, fp, scans, frames, truth) == 0.5
    cfg.fp_reduction.score_weight_grid = (1.0,)
    assert choose_score_weight(cfg, fp, scans, frames, truth) == 1.0
