"""Notebook-friendly scikit-learn-style wrapper around the two-stage detector.

>>> det = LungNoduleDetector("demo", detector={"trainer": {"max_epochs": 2}})
>>> det.fit("data_samples/medical").predict(["data_samples/medical/dicom/<uid>"])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from apps.medical.config import MedicalConfig


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


class LungNoduleDetector:
    """``config``: a :class:`MedicalConfig`, a config name (``"demo"``), a YAML path, or None
    (defaults); ``**overrides``: nested dict updates of that config. ``__init__`` only
    stores them; ``fit`` builds and trains; fitted state ends in ``_`` (``predictor_``,
    ``config_``, ``train_series_``)."""

    def __init__(self, config: MedicalConfig | str | Path | None = None, **overrides: Any) -> None:
        self.config = config
        self.overrides = overrides

    def _resolve_config(self) -> MedicalConfig:
        c = self.config
        if c is None:
            base = MedicalConfig()
        elif isinstance(c, MedicalConfig):
            base = c
        elif Path(str(c)).suffix in (".yaml", ".yml"):
            base = MedicalConfig.from_yaml(c)
        else:
            base = MedicalConfig.named(str(c))
        return MedicalConfig.from_dict(_merge(base.to_dict(), self.overrides))

    def fit(self, data_dir: str | Path | None = None) -> LungNoduleDetector:
        """Train on the training series of ``data_dir`` (a LUNA16-style folder; default: the
        config's ``data.root``). Returns self."""
        from apps.medical.data import (
            ensure_dataset,
            load_prepared,
            read_truth,
            split_series,
        )
        from apps.medical.predictor import NoduleDetector
        from apps.medical.training import fit_detector, fit_fp_reduction

        cfg = self._resolve_config()
        if data_dir is not None:
            cfg.data.root = str(Path(data_dir).resolve())
            cfg.data.generate = None
        root = ensure_dataset(cfg.data)
        truth = read_truth(root)
        train, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
        scans = load_prepared(cfg, root, train)
        tr = truth.subset(train)
        det = fit_detector(cfg, scans, tr)
        fp = fit_fp_reduction(cfg, det, scans, tr) if cfg.fp_reduction.enabled else None
        self.config_ = cfg
        self.train_series_ = train
        self.heldout_series_ = held
        self.predictor_ = NoduleDetector(cfg, det, fp)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "predictor_"):
            raise RuntimeError("LungNoduleDetector is not fitted; call fit(data_dir) first")

    def predict(self, series_paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
        """Candidate rows (LUNA16 columns + ``series_path``, ``reject_reason``)."""
        self._check_fitted()
        paths = [series_paths] if isinstance(series_paths, (str, Path)) else list(series_paths)
        return self.predictor_.predict(pd.DataFrame({"series_path": [str(p) for p in paths]}))

    def score(self, data_dir: str | Path | None = None) -> dict[str, float]:
        """LUNA16 FROC metrics on the held-out series (``cpm``, ``sensitivity_at_4fp``...)."""
        from apps.medical.spec import evaluate

        self._check_fitted()
        cfg = copy.deepcopy(self.config_)
        if data_dir is not None:
            cfg.data.root, cfg.data.generate = str(Path(data_dir).resolve()), None
        return evaluate(self.predictor_, cfg).metrics

    def to_sr(
        self,
        series_path: str | Path,
        out_path: str | Path,
        threshold: float | None = None,
        include_patient_identity: bool = False,
    ) -> Path:
        """Detect on one DICOM series folder and write its findings as a DICOM SR."""
        import pydicom

        from apps.medical.dicom_io import find_series, load_series
        from apps.medical.preprocess import Scan
        from apps.medical.sr import write_sr

        self._check_fitted()
        groups = find_series(series_path)
        if len(groups) != 1:
            from apps.medical.errors import DicomSeriesError

            raise DicomSeriesError(
                f"{Path(series_path).name}: expected exactly one series, found {len(groups)}"
            )
        files = next(iter(groups.values()))
        vol = load_series(files)
        scan = Scan(array=vol.array, affine=vol.affine, series_uid=vol.series_uid)
        cands = self.predictor_.detect_volume(scan)
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        thr = self.config_.sr_threshold if threshold is None else threshold
        return write_sr(cands, scan, sources, out_path, thr, include_patient_identity)
