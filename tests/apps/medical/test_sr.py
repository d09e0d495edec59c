"""DICOM SR of findings: readable with pydicom, one finding per candidate over threshold,
no patient identity unless asked."""

from __future__ import annotations

import pandas as pd
import pydicom
import pytest

from apps.medical.dicom_io import find_series, load_series
from apps.medical.sr import read_sr_findings, write_sr
from apps.medical.synthetic import generate_dataset


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("medical_sr")
    generate_dataset(root, n_series=1, size="tiny", seed=3)
    files = next(iter(find_series(root / "dicom").values()))
    return load_series(files), [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _cands(uid: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "seriesuid": [uid] * 4,
            "coordX": [10.0, -20.5, 33.0, 1.0],
            "coordY": [5.0, 6.0, -7.0, 0.0],
            "coordZ": [-100.0, -110.0, -120.0, -130.0],
            "probability": [0.95, 0.7, 0.4, 0.51],
        }
    )


def test_sr_has_one_point_finding_per_candidate_over_threshold(series, tmp_path):
    vol, sources = series
    path = write_sr(_cands(vol.series_uid), vol, sources, tmp_path / "a.dcm", threshold=0.5)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.Modality == "SR"
    findings = read_sr_findings(path)
    assert len(findings) == 3
    assert [round(f["probability"], 2) for f in findings] == [0.95, 0.7, 0.51]
    assert findings[0]["xyz"] == [10.0, 5.0, -100.0]
    frame_uid = sources[0].FrameOfReferenceUID
    assert frame_uid in str(ds)  # SCOORD3D points live in the series' frame of reference


def test_sr_copies_no_patient_identity_by_default(series, tmp_path):
    vol, sources = series
    assert str(sources[0].PatientName) == "Synthetic^Phantom"
    anon = pydicom.dcmread(write_sr(_cands(vol.series_uid), vol, sources, tmp_path / "b.dcm"))
    assert str(anon.PatientName) == "" and str(anon.PatientID) == ""
    assert "Synthetic" not in str(anon) and "KEEL-SYNTH" not in str(anon)
    ident = pydicom.dcmread(
        write_sr(
            _cands(vol.series_uid), vol, sources, tmp_path / "c.dcm", include_patient_identity=True
        )
    )
    assert str(ident.PatientName) == "Synthetic^Phantom"
    assert str(ident.PatientID) == str(sources[0].PatientID)


def test_sr_with_no_finding_over_threshold_is_still_valid(series, tmp_path):
    vol, sources = series
    path = write_sr(_cands(vol.series_uid), vol, sources, tmp_path / "d.dcm", threshold=0.99)
    assert read_sr_findings(path) == []
    assert pydicom.dcmread(path).SOPInstanceUID
