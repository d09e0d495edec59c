"""Tiny real DICOM CT series for reader tests, written independently of the app's writer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-SECRET-4711"


def orthonormal_iop(angle_deg: float = 0.0, tilt_deg: float = 0.0) -> np.ndarray:
    """Row/column direction cosines rotated about z by ``angle`` and tilted about x."""
    a, t = np.deg2rad(angle_deg), np.deg2rad(tilt_deg)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a), np.cos(a), 0.0])
    rot_x = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return np.concatenate([rot_x @ row, rot_x @ col])


def make_series(
    folder: Path,
    n_slices: int = 6,
    rows: int = 8,
    cols: int = 10,
    spacing_zyx: Sequence[float] = (2.5, 0.75, 0.6),
    origin_xyz: Sequence[float] = (-10.0, -20.0, -100.0),
    iop: Sequence[float] | None = None,
    stored: Callable[[int], np.ndarray] | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    mutate: Callable[[int, Dataset], None] | None = None,
    positions_along: float = 1.0,
    seed: int = 0,
) -> list[Path]:
    """Write ``n_slices`` single-frame CT slices with shuffled file names.

    Slice ``k`` sits at ``origin + positions_along * k * dz * normal``; its stored pixels are
    ``stored(k)`` (default: ``1000 + 10*k`` everywhere, so the slice index is readable back).
    ``mutate(k, ds)`` edits a slice's dataset before it is written. InstanceNumber runs
    opposite to ``k``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop_arr = np.asarray(orthonormal_iop() if iop is None else iop, dtype=np.float64)
    normal = np.cross(iop_arr[:3], iop_arr[3:])
    series_uid, study_uid = generate_uid(), generate_uid()
    names = np.random.default_rng(seed).permutation(n_slices)
    paths = []
    for k in range(n_slices):
        pixels = (
            stored(k)
            if stored is not None
            else np.full((rows, cols), 1000 + 10 * k, dtype=np.int16)
        )
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = n_slices - k
        pos = np.asarray(origin_xyz) + positions_along * k * spacing_zyx[0] * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop_arr]
        ds.PixelSpacing = [f"{spacing_zyx[1]:g}", f"{spacing_zyx[2]:g}"]
        ds.SliceThickness = f"{spacing_zyx[0]:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if mutate is not None:
            mutate(k, ds)
        path = folder / f"IM{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
