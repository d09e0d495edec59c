"""Read a DICOM CT series (any folder layout) into one HU volume with its LPS geometry.

Why this is stricter than "sort the files and stack them": file names and InstanceNumber
are not anatomical order (LIDC-IDRI-0001's are not), a missing slice silently shifts every
nodule below it, and a scout image or a second acquisition mixed into a series corrupts the
volume without any error. So slices are ordered by ``ImagePositionPatient`` projected on
the slice normal (row cosine x column cosine), the spacing is derived from those positions,
and every irregularity is refused with a :class:`DicomSeriesError` that names the file.

Privacy: files are named relative to the series' common folder and no patient tag
(PatientName, PatientID, ...) is ever read into a message or an output.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from apps.medical.errors import DicomSeriesError
from apps.medical.geometry import index_to_world, make_affine, world_to_index

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AIR_HU = -1024.0
_HEADER_TAGS = [
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "ImageType",
]


@dataclass(frozen=True)
class DicomReadConfig:
    """Tolerances of :func:`load_series`.

    ``spacing_rel_tol``: a gap between neighbouring slices may differ from the median gap
    by this fraction (0.05 = 5 %, far below the 100 % of one missing slice).
    ``duplicate_tol_mm``: two slices closer than this along the normal are duplicates.
    ``inplane_tol_mm``: slices may drift in-plane (gantry tilt) at most this much.
    ``padding_threshold_hu``: HU at or below this is padding (LIDC pads with -2048) and
    becomes ``air_hu``, as do pixels equal to PixelPaddingValue.
    ``dtype``: ``"float32"`` or ``"int16"`` (int16 rounds; halves the memory).
    """

    spacing_rel_tol: float = 0.05
    duplicate_tol_mm: float = 0.01
    orientation_tol: float = 1e-4
    inplane_tol_mm: float = 0.1
    padding_threshold_hu: float = -2000.0
    air_hu: float = AIR_HU
    dtype: str = "float32"


@dataclass(frozen=True, eq=False)
class CTVolume:
    """One CT series as a regular grid in patient (LPS) space.

    ``array``: HU, ``[Z, Y, X]`` = (slice, row, column), slices ascending along the normal.
    ``spacing``: ``(z, y, x)`` mm, z derived from slice positions (not SliceThickness).
    ``origin``: ``(x, y, z)`` LPS mm of voxel ``[0, 0, 0]``'s centre (its slice's IPP).
    ``direction``: 3x3, columns = LPS unit vectors of the voxel x, y, z axes (ITK style).
    """

    array: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(repr=False)
    series_uid: str
    study_uid: str = ""
    sop_instance_uids: tuple[str, ...] = field(default=(), repr=False)
    slice_thickness: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4x4 mapping index ``(z, y, x, 1)`` -> LPS ``(x, y, z, 1)`` mm."""
        return make_affine(self.spacing, self.origin, self.direction)

    def voxel_to_world(self, zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Index ``(z, y, x)`` (fractional allowed, ``(..., 3)``) -> LPS ``(x, y, z)`` mm."""
        return index_to_world(self.affine, zyx)

    def world_to_voxel(self, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
        """LPS ``(x, y, z)`` mm (``(..., 3)``) -> fractional index ``(z, y, x)``."""
        return world_to_index(self.affine, xyz)

    def slice_index_of_sop(self, sop_instance_uid: str) -> int:
        """Slice index of a SOP Instance UID (LIDC XML rois reference slices this way)."""
        try:
            return self.sop_instance_uids.index(sop_instance_uid)
        except ValueError:
            raise DicomSeriesError(
                f"SOP Instance UID {sop_instance_uid} is not a slice of series {self.series_uid}"
            ) from None


# ----------------------------------------------------------------------------- discovery


def _read_header(path: Path) -> pydicom.Dataset | None:
    """Header of a DICOM file, or None when the file is not DICOM (xml, txt, ...)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        return None
    except Exception as exc:  # a file with a DICOM preamble that does not parse
        raise DicomSeriesError(f"file {path.name}: unreadable DICOM ({exc})") from exc


def find_series(root: str | Path) -> dict[str, list[Path]]:
    """Group the DICOM image files under ``root`` (any depth) by SeriesInstanceUID.

    Non-DICOM files and DICOM objects without pixel rows (DICOMDIR, SR) are skipped.
    Files are listed in sorted path order, which is NOT slice order.
    """
    root = Path(root)
    if not root.exists():
        raise DicomSeriesError(f"folder {root} does not exist; expected a folder of DICOM files")
    paths = [root] if root.is_file() else _walk(root)
    series: dict[str, list[Path]] = {}
    for path in paths:
        ds = _read_header(path)
        if ds is None or "Rows" not in ds or "SeriesInstanceUID" not in ds:
            continue
        series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return series


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


# ----------------------------------------------------------------------------- loading


def _display_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Name files relative to their common folder: enough to find them, no patient folder."""
    if len(paths) == 1:
        return {paths[0]: paths[0].name}
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return {p: str(p.resolve().relative_to(common)) for p in paths}


def _floats(ds: pydicom.Dataset, keyword: str, n: int, name: str, tag: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise DicomSeriesError(
            f"file {name}: missing or malformed {keyword} {tag}; expected {n} numbers"
            + (
                "; slice positions are needed to order slices"
                if keyword.startswith("Image")
                else ""
            )
        )
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _is_localizer(ds: pydicom.Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type or "SCOUT" in image_type


def _list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} files)" if len(names) > limit else "")


def load_series(
    source: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    config: DicomReadConfig | None = None,
) -> CTVolume:
    """Load one CT series as a :class:`CTVolume` in Hounsfield units.

    ``source``: a folder (searched recursively; give ``series_uid`` when it holds more than
    one series) or an explicit list of files of one series.
    Raises :class:`DicomSeriesError` for: a non-CT modality, localizer/scout images, mixed
    orientations, missing or duplicate slice positions, uneven spacing (a missing slice),
    sheared slices, and compressed pixel data with no decoder.
    """
    cfg = config or DicomReadConfig()
    paths = _select_series_files(source, series_uid)
    names = _display_names(paths)
    headers = []
    for p in paths:
        ds = _read_header(p)
        if ds is None:
            raise DicomSeriesError(f"file {names[p]} is not a DICOM file (no DICM preamble)")
        headers.append(ds)
    _check_series_uid(paths, headers, names)
    _check_modality(paths, headers, names)
    order, geometry = _slice_geometry(paths, headers, names, cfg)
    array = np.empty((len(order), geometry["rows"], geometry["cols"]), dtype=cfg.dtype)
    for k, i in enumerate(order):
        array[k] = _slice_hu(paths[i], names[paths[i]], k, geometry, cfg)
    first = headers[order[0]]
    thickness = first.get("SliceThickness")
    return CTVolume(
        array=array,
        spacing=geometry["spacing"],
        origin=geometry["origin"],
        direction=geometry["direction"],
        series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.get("StudyInstanceUID", "")),
        sop_instance_uids=tuple(str(headers[i].get("SOPInstanceUID", "")) for i in order),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
    )


def _select_series_files(
    source: str | Path | Sequence[str | Path], series_uid: str | None
) -> list[Path]:
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        groups = find_series(source)
        if not groups:
            raise DicomSeriesError(f"folder {source} holds no DICOM image files")
        if series_uid is not None:
            if series_uid not in groups:
                raise DicomSeriesError(
                    f"series {series_uid} not found under {source}; found: {sorted(groups)}"
                )
            return groups[series_uid]
        if len(groups) > 1:
            listing = "; ".join(f"{uid} ({len(p)} files)" for uid, p in sorted(groups.items()))
            raise DicomSeriesError(
                f"folder {source} holds {len(groups)} series: {listing}; pass series_uid"
            )
        return next(iter(groups.values()))
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DicomSeriesError(f"not a file: {_list(missing)}")
    if not paths:
        raise DicomSeriesError("no files given; expected the DICOM files of one CT series")
    return paths


def _check_series_uid(paths: list[Path], headers: list, names: dict[Path, str]) -> None:
    uids = [str(h.get("SeriesInstanceUID", "")) for h in headers]
    counts = Counter(uids)
    if len(counts) > 1:
        main_uid = counts.most_common(1)[0][0]
        odd = [names[p] for p, u in zip(paths, uids, strict=True) if u != main_uid]
        raise DicomSeriesError(
            f"files from more than one series: {_list(odd)} do not belong to series "
            f"{main_uid or '<missing SeriesInstanceUID>'}; expected one SeriesInstanceUID"
        )


def _check_modality(paths: list[Path], headers: list, names: dict[Path, str]) -> None:
    for p, h in zip(paths, headers, strict=True):
        modality = str(h.get("Modality", ""))
        if modality != "CT":
            raise DicomSeriesError(
                f"file {names[p]}: Modality is '{modality or '<missing>'}', expected 'CT' "
                "(this reader loads CT series only)"
            )
    localizers = [names[p] for p, h in zip(paths, headers, strict=True) if _is_localizer(h)]
    if localizers:
        raise DicomSeriesError(
            f"localizer/scout image(s) mixed into the series (ImageType contains LOCALIZER): "
            f"{_list(localizers)}; expected only axial CT slices, remove these files"
        )


def _slice_geometry(
    paths: list[Path], headers: list, names: dict[Path, str], cfg: DicomReadConfig
) -> tuple[list[int], dict]:
    """Slice order along the normal and the volume geometry; refuses irregular series."""
    iops = [
        _floats(h, "ImageOrientationPatient", 6, names[p], "(0020,0037)")
        for p, h in zip(paths, headers, strict=True)
    ]
    ipps = [
        _floats(h, "ImagePositionPatient", 3, names[p], "(0020,0032)")
        for p, h in zip(paths, headers, strict=True)
    ]
    pixel = [
        _floats(h, "PixelSpacing", 2, names[p], "(0028,0030)")
        for p, h in zip(paths, headers, strict=True)
    ]

    # One orientation per series: the majority one, everything else named.
    keys = [tuple(np.round(iop / cfg.orientation_tol).astype(np.int64)) for iop in iops]
    main_key = Counter(keys).most_common(1)[0][0]
    ref = iops[keys.index(main_key)]
    odd = [i for i, iop in enumerate(iops) if np.max(np.abs(iop - ref)) > 10 * cfg.orientation_tol]
    if odd:
        odd_iop = np.round(iops[odd[0]], 4).tolist()
        raise DicomSeriesError(
            f"mixed orientations: file(s) {_list([names[paths[i]] for i in odd])} have "
            f"ImageOrientationPatient {odd_iop} but {len(paths) - len(odd)} files have "
            f"{np.round(ref, 4).tolist()} (a localizer/scout or reformatted image mixed in?); "
            "expected one orientation per series"
        )
    row, col = ref[:3], ref[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(row @ col) > 1e-3
    ):
        raise DicomSeriesError(
            f"file {names[paths[0]]}: ImageOrientationPatient {ref.tolist()} is not two "
            "orthogonal unit vectors"
        )
    normal = np.cross(row, col)

    rows_cols = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(rows_cols) > 1:
        first = (int(headers[0].Rows), int(headers[0].Columns))
        odd_files = [
            names[p]
            for p, h in zip(paths, headers, strict=True)
            if (int(h.Rows), int(h.Columns)) != first
        ]
        raise DicomSeriesError(
            f"slices of different sizes: {_list(odd_files)} differ from {first} (rows, columns)"
        )
    for p, ps in zip(paths, pixel, strict=True):
        if np.max(np.abs(ps - pixel[0])) > 1e-4:
            raise DicomSeriesError(
                f"file {names[p]}: PixelSpacing {ps.tolist()} differs from "
                f"{pixel[0].tolist()} of the other slices; expected one pixel spacing"
            )

    dist = np.array([ipp @ normal for ipp in ipps])
    order = sorted(range(len(paths)), key=lambda i: (dist[i], str(paths[i])))
    if len(order) < 2:
        raise DicomSeriesError(
            f"series has {len(order)} slice ({names[paths[0]]}); a CT volume needs at least 2"
        )
    d_sorted = dist[order]
    gaps = np.diff(d_sorted)
    for k in np.flatnonzero(gaps < cfg.duplicate_tol_mm):
        a, b = order[k], order[k + 1]
        raise DicomSeriesError(
            f"duplicate slice position: files {names[paths[a]]} and {names[paths[b]]} are both "
            f"at {d_sorted[k]:.3f} mm along the slice normal; expected one slice per position "
            "(two acquisitions in one series?)"
        )
    spacing_z = float(np.median(gaps))
    tol = cfg.spacing_rel_tol * spacing_z
    for k in np.flatnonzero(np.abs(gaps - spacing_z) > tol):
        a, b = order[k], order[k + 1]
        n_missing = round(gaps[k] / spacing_z) - 1
        hint = f"; {n_missing} slice(s) missing there" if n_missing >= 1 else ""
        raise DicomSeriesError(
            f"uneven slice spacing: between slice {k} (file {names[paths[a]]}, "
            f"{d_sorted[k]:.3f} mm) and slice {k + 1} (file {names[paths[b]]}, "
            f"{d_sorted[k + 1]:.3f} mm) the gap is {gaps[k]:.3f} mm, expected "
            f"{spacing_z:.3f} +/- {tol:.3f} mm{hint}"
        )
    base = ipps[order[0]] - d_sorted[0] * normal
    for k, i in enumerate(order):
        shift = np.linalg.norm(ipps[i] - dist[i] * normal - base)
        if shift > cfg.inplane_tol_mm:
            raise DicomSeriesError(
                f"slice {k} (file {names[paths[i]]}) is shifted {shift:.3f} mm in-plane from "
                "the first slice (gantry tilt or sheared series); expected slices stacked "
                "along the slice normal"
            )
    h0 = headers[order[0]]
    return order, {
        "rows": int(h0.Rows),
        "cols": int(h0.Columns),
        # PixelSpacing is (between rows, between columns) = (y, x)
        "spacing": (spacing_z, float(pixel[0][0]), float(pixel[0][1])),
        "origin": tuple(float(v) for v in ipps[order[0]]),
        "direction": np.stack([row, col, normal], axis=1),
    }


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return pydicom.uid.UID(str(uid)) if uid else pydicom.uid.ImplicitVRLittleEndian


def _decode(ds: pydicom.Dataset, name: str) -> np.ndarray:
    tsyntax = _transfer_syntax(ds)
    described = f"transfer syntax '{tsyntax.name}' ({tsyntax})"
    if tsyntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DicomSeriesError(
                f"file {name}: compressed pixel data in {described} and no decoder for it is "
                "installed; install one (pylibjpeg + plugins, or python-gdcm) or decompress the "
                "series (e.g. `gdcmconv --raw`)"
            )
    try:
        return ds.pixel_array
    except Exception as exc:
        raise DicomSeriesError(
            f"file {name}: pixel data in {described} could not be decoded ({exc}); "
            "expected decodable image data"
        ) from exc


def _padding_mask(ds: pydicom.Dataset, raw: np.ndarray) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or within the padding range), in stored units."""
    if "PixelPaddingValue" not in ds:
        return None
    bits = int(ds.get("BitsAllocated", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1

    def stored(v: int) -> int:  # US-encoded values of signed images wrap around
        v = int(v)
        return v - (1 << bits) if signed and v >= (1 << (bits - 1)) else v

    pad = stored(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        lim = stored(ds.PixelPaddingRangeLimit)
        return (raw >= min(pad, lim)) & (raw <= max(pad, lim))
    return raw == pad


def _slice_hu(path: Path, name: str, k: int, geometry: dict, cfg: DicomReadConfig) -> np.ndarray:
    ds = pydicom.dcmread(path, force=False)
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomSeriesError(
            f"slice {k} (file {name}): expected a single-frame grayscale image "
            f"(SamplesPerPixel 1), got SamplesPerPixel {ds.get('SamplesPerPixel')}, "
            f"NumberOfFrames {ds.get('NumberOfFrames', 1)}"
        )
    raw = _decode(ds, name)
    if raw.shape != (geometry["rows"], geometry["cols"]):
        raise DicomSeriesError(
            f"slice {k} (file {name}): pixel data shape {raw.shape}, expected "
            f"{(geometry['rows'], geometry['cols'])} from Rows/Columns"
        )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    pad = _padding_mask(ds, raw)
    if pad is not None:
        hu[pad] = cfg.air_hu
    hu[hu <= cfg.padding_threshold_hu] = cfg.air_hu
    if cfg.dtype == "int16":
        return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    return hu
