"""LungNoduleDetector follows the scikit-learn estimator contract."""

from __future__ import annotations

import pydicom

from apps.medical.estimator import LungNoduleDetector
from apps.medical.sr import read_sr_findings
from tests.apps.medical.tiny import tiny_config, tiny_dataset


def test_init_stores_fit_returns_self_and_predicts(tmp_path):
    data = tiny_dataset(tmp_path / "data", n_series=2, seed=4)
    cfg = tiny_config(data, heldout_fraction=0.5)
    est = LungNoduleDetector(cfg, fp_reduction={"enabled": False})
    assert est.config is cfg and est.overrides == {"fp_reduction": {"enabled": False}}
    assert not [k for k in vars(est) if k.endswith("_")]  # nothing fitted yet
    assert est.fit(data) is est
    assert est.config_.fp_reduction.enabled is False and est.predictor_.fp_model is None
    assert len(est.train_series_) == 1 and len(est.heldout_series_) == 1
    series = data / "dicom" / est.heldout_series_[0]
    out = est.predict([series, tmp_path / "nope"])
    assert out["reject_reason"].notna().sum() == 1
    assert (out.loc[out["reject_reason"].isna(), "seriesuid"] == est.heldout_series_[0]).all()
    sr = est.to_sr(series, tmp_path / "out" / "report.dcm", threshold=0.0)
    n_cands = int(out["reject_reason"].isna().sum())
    assert len(read_sr_findings(sr)) == n_cands
    assert str(pydicom.dcmread(sr).PatientName) == ""
