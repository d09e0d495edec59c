"""``NoduleDetector``: folders of DICOM series in, LUNA16 candidate rows out.

Saved as plain files only (``config.yaml`` + ``detector.pt`` / ``fp_reduction.pt``
state_dicts loaded with ``weights_only=True``), so loading a registered model runs no
stored code. Outputs never carry patient names or IDs: rows hold the series UID, world
coordinates and probabilities; error messages name files relative to their series folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from apps.medical.config import MedicalConfig
from apps.medical.data import prepare
from apps.medical.errors import MedicalDataError
from apps.medical.model import (
    FPReductionModel,
    NoduleHeatmapModel,
    fuse_scores,
    score_candidates,
    stage1_candidates,
)
from apps.medical.preprocess import PreparedScan, Scan
from core import safepath

OUTPUT_COLUMNS = [
    "seriesuid",
    "coordX",
    "coordY",
    "coordZ",
    "probability",
    "series_path",
    "reject_reason",
]


def safe_name(text: str, suffix: str = "") -> str:
    """A file name that cannot leave its folder: only ``[0-9A-Za-z._-]``, no leading dot."""
    return safepath.safe_name(text, suffix)


def path_inside(folder: Path, name: str) -> Path:
    """``folder / name`` after checking the resolved path stays directly under ``folder``."""
    try:
        return safepath.safe_child(folder, name)
    except safepath.UnsafePathError as err:
        raise MedicalDataError(str(err)) from err


class NoduleDetector:
    """Two-stage detector (stage-1 heat map + stage-2 FP reduction) over whole scans.

    ``predict(frame)``: for every ``series_path`` (a folder with one or more DICOM series,
    or a single ``.npz`` scan), one row per candidate (``seriesuid, coordX, coordY, coordZ``
    in world LPS mm, ``probability``, ``series_path``, ``reject_reason`` None); a series or
    path that cannot be read gives ONE row with ``reject_reason`` and null coordinates, and
    the other rows are still scored. ``sr_dir``: when set, a DICOM SR of each series'
    findings is written there (file ``<seriesuid>.dcm``, sanitised).
    """

    input_columns = ["series_path"]

    def __init__(
        self,
        config: MedicalConfig,
        detector: NoduleHeatmapModel,
        fp_model: FPReductionModel | None = None,
        sr_dir: str | Path | None = None,
    ) -> None:
        self.config = config
        self.detector = detector.eval()
        self.fp_model = fp_model.eval() if fp_model is not None else None
        self.sr_dir = Path(sr_dir) if sr_dir is not None else None

    @property
    def thresholds(self) -> dict[str, float]:
        return {
            "detector_threshold": self.config.detector.threshold,
            "sr_threshold": self.config.sr_threshold,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _atomic(path / "config.yaml", lambda p: Path(p).write_text(self.config.to_yaml()))
        _atomic(path / "detector.pt", lambda p: torch.save(self.detector.state_dict(), p))
        if self.fp_model is not None:
            _atomic(path / "fp_reduction.pt", lambda p: torch.save(self.fp_model.state_dict(), p))

    @classmethod
    def load(cls, path: Path) -> NoduleDetector:
        path = Path(path)
        cfg = MedicalConfig.from_yaml(path / "config.yaml")
        det = build_detector(cfg)
        det.load_state_dict(torch.load(path / "detector.pt", weights_only=True, map_location="cpu"))
        fp = None
        if (path / "fp_reduction.pt").is_file():
            fp = build_fp_model(cfg)
            fp.load_state_dict(
                torch.load(path / "fp_reduction.pt", weights_only=True, map_location="cpu")
            )
        return cls(cfg, det, fp)

    # ------------------------------------------------------------------ scoring
    def detect(self, scan: PreparedScan) -> pd.DataFrame:
        """Candidates of one prepared scan (world mm; final probability = stage-2 score)."""
        cands = stage1_candidates(self.config, self.detector, scan)
        if self.fp_model is not None and self.config.fp_reduction.enabled and len(cands):
            fc = self.config.fp_reduction
            pts = cands[["z", "y", "x"]].to_numpy()
            p2 = score_candidates(self.fp_model, scan.image, pts, fc.crop_zyx)
            cands["probability"] = fuse_scores(
                cands["probability"].to_numpy(), p2, float(fc.score_weight)
            )
            cands = cands.sort_values("probability", ascending=False, kind="stable")
        return cands.reset_index(drop=True)

    def detect_volume(self, scan: Scan) -> pd.DataFrame:
        dev = next(self.detector.parameters()).device
        device = "cuda" if dev.type == "cuda" else None  # GPU: resample there too
        return self.detect(prepare(self.config, scan, device))[
            ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
        ]

    def _score_path(self, raw: Any) -> list[pd.DataFrame]:
        text = "" if raw is None or (isinstance(raw, float) and np.isnan(raw)) else str(raw)
        if not text:
            return [_reject(text, "", "series_path is empty")]
        path = Path(text)
        if path.suffix == ".npz" and path.is_file():
            from apps.medical.preprocess import load_scan_npz

            return [self._score_one(text, lambda: (load_scan_npz(path), None))]
        try:
            from apps.medical.dicom_io import find_series

            groups = find_series(path)
        except (MedicalDataError, OSError) as err:
            return [_reject(text, "", f"{type(err).__name__}: {err}")]
        if not groups:
            return [_reject(text, "", f"no DICOM image series found under {path.name or text}")]
        return [
            self._score_one(text, lambda files=files: _load_dicom(files), uid)
            for uid, files in sorted(groups.items())
        ]

    def _score_one(self, text: str, load: Any, uid: str = "") -> pd.DataFrame:
        try:
            scan, files = load()
            cands = self.detect_volume(scan)
        except (MedicalDataError, ValueError, OSError) as err:
            return _reject(text, uid, f"{type(err).__name__}: {err}")
        if self.sr_dir is not None and files is not None:
            self.write_sr(cands, scan, files)
        cands = cands.copy()
        cands["series_path"] = text
        cands["reject_reason"] = None
        return cands

    def write_sr(self, cands: pd.DataFrame, scan: Scan, files: list[Path]) -> Path:
        import pydicom

        from apps.medical.sr import write_sr

        assert self.sr_dir is not None
        self.sr_dir.mkdir(parents=True, exist_ok=True)
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        out = path_inside(self.sr_dir, safe_name(scan.series_uid, ".dcm"))
        return write_sr(cands, scan, sources, out, threshold=self.config.sr_threshold)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        if "series_path" not in frame:
            raise MedicalDataError(
                f"input lacks column 'series_path'; got columns {list(frame.columns)}"
            )
        parts = [p for raw in frame["series_path"].tolist() for p in self._score_path(raw)]
        parts = [p for p in parts if len(p)]
        if not parts:
            return _empty()
        out = pd.concat(parts, ignore_index=True)[OUTPUT_COLUMNS]
        for c in ("coordX", "coordY", "coordZ", "probability"):
            out[c] = out[c].astype(np.float64)
        out["reject_reason"] = out["reject_reason"].astype(object)
        return out


def _load_dicom(files: list[Path]) -> tuple[Scan, list[Path]]:
    from apps.medical.dicom_io import load_series

    vol = load_series(files)
    return Scan(array=vol.array, affine=vol.affine, series_uid=vol.series_uid), files


def _reject(text: str, uid: str, reason: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "seriesuid": [uid],
            "coordX": [np.nan],
            "coordY": [np.nan],
            "coordZ": [np.nan],
            "probability": [np.nan],
            "series_path": [text],
            "reject_reason": [reason[:500]],
        }
    )


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            c: pd.Series(
                dtype=object if c in ("seriesuid", "series_path", "reject_reason") else float
            )
            for c in OUTPUT_COLUMNS
        }
    )


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def build_detector(cfg: MedicalConfig) -> NoduleHeatmapModel:
    """The stage-1 model of ``cfg.detector.kind`` (``token`` or ``dense``), untrained."""
    dc = cfg.detector
    if dc.kind == "dense":
        from apps.medical.dense import DenseHeatmapModel

        return DenseHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.stem_channels)
    return NoduleHeatmapModel(dc.backbone, dc.optim, dc.patch_zyx, dc.pos_weight, dc.offset_weight)


def build_fp_model(cfg: MedicalConfig) -> FPReductionModel:
    fc = cfg.fp_reduction
    return FPReductionModel(fc.backbone, fc.optim, fc.patch_zyx)
