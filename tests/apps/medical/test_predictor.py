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
