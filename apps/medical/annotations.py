"""Nodule annotations: LIDC-IDRI reader XML and LUNA16 CSV files.

LIDC-IDRI: up to four radiologists read each scan and marked, per reader, nodules >= 3 mm
(contoured on every slice), nodules < 3 mm (one point) and non-nodules (one point). LUNA16
turned these into ``annotations.csv`` (nodules >= 3 mm accepted by >= 3 of 4 readers; the
readers' marks clustered, centres and diameters averaged) and ``annotations_excluded.csv``
(everything else: candidates hitting those are neither TP nor FP). This module parses the
XML into per-reader marks in world millimetres and clusters them the same way, so
annotations can be derived for any LIDC series, and reads/validates LUNA16 CSVs.

Conventions (checked against LUNA16 on LIDC-IDRI-0001): edgeMap ``xCoord`` is the column
and ``yCoord`` the row of a pixel centre, mapped to world mm through the series geometry.
Contours are drawn just outside the nodule (LIDC reader instructions), so a nodule's voxels
are the pixel centres strictly inside the contour (contour pixels excluded) of an
``inclusion=TRUE`` roi minus those inside ``inclusion=FALSE`` rois (holes). Centre =
centroid of those voxels; diameter = volume-equivalent sphere ``(6V/pi)^(1/3)`` by default
(``"max_extent"``: the largest distance between two contour points). With these
conventions one LIDC-IDRI-0001 reader's mark reproduces LUNA16's per-reader excluded entry
(23.500137 mm) to 1e-6 mm and the 4-reader consensus lies 0.2 mm / 0.25 mm (centre /
diameter) from LUNA16's annotation; LUNA16's tooling for the other readers is not public.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from apps.medical.dicom_io import CTVolume
from apps.medical.errors import AnnotationError

LIDC_NS = "http://www.nih.gov"
_NS = {"n": LIDC_NS}
LUNA_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
MARK_COLUMNS = [
    "reader",
    "mark_id",
    "kind",
    "coordX",
    "coordY",
    "coordZ",
    "diameter_mm",
    "volume_mm3",
    "n_slices",
]


@dataclass(frozen=True)
class LidcRoi:
    """One reader's contour (or single point) on one slice."""

    z_position: float
    sop_uid: str
    inclusion: bool
    points_xy: np.ndarray = field(repr=False)  # [N, 2] (column, row) pixel coordinates


@dataclass(frozen=True)
class LidcMark:
    """One reader's mark: ``kind`` is ``nodule`` (>= 3 mm, contoured), ``small_nodule``
    (< 3 mm, one point) or ``non_nodule`` (one point)."""

    reader: int  # index of the readingSession in the file (no reader identity kept)
    mark_id: str
    kind: str
    rois: tuple[LidcRoi, ...]
    characteristics: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- LIDC XML


def find_lidc_xml(root: str | Path) -> list[Path]:
    """LIDC reader XML files (root element with ``readingSession`` children) under ``root``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".xml"):
                path = Path(dirpath) / name
                try:
                    root_el = ET.parse(path).getroot()
                except ET.ParseError:
                    continue
                if root_el.find("n:readingSession", _NS) is not None:
                    out.append(path)
    return out


def _text(el: ET.Element, tag: str, path: Path, where: str) -> str:
    value = el.findtext(f"n:{tag}", namespaces=_NS)
    if value is None or not value.strip():
        raise AnnotationError(f"{path.name}: {where} has no <{tag}>; expected one")
    return value.strip()


def _points(el: ET.Element, path: Path, where: str) -> np.ndarray:
    pts = []
    edges = el.findall("n:edgeMap", _NS) or ([el] if el.find("n:xCoord", _NS) is not None else [])
    for j, edge in enumerate(edges):
        try:
            pts.append(
                (
                    float(_text(edge, "xCoord", path, where)),
                    float(_text(edge, "yCoord", path, where)),
                )
            )
        except ValueError:
            raise AnnotationError(
                f"{path.name}: {where} edgeMap {j} has a non-numeric coordinate; expected "
                "integer pixel coordinates"
            ) from None
    if not pts:
        raise AnnotationError(f"{path.name}: {where} has no edgeMap points; expected >= 1")
    return np.asarray(pts, dtype=np.float64)


def parse_lidc_xml(path: str | Path) -> list[LidcMark]:
    """All readers' marks of one LIDC XML file (namespace ``http://www.nih.gov``)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise AnnotationError(f"{path.name}: not a readable XML file ({exc})") from exc
    sessions = root.findall("n:readingSession", _NS)
    if not sessions:
        raise AnnotationError(
            f"{path.name}: no <readingSession> in namespace {LIDC_NS}; expected an LIDC CT "
            "reader XML"
        )
    marks: list[LidcMark] = []
    for reader, session in enumerate(sessions):
        for nod in session.findall("n:unblindedReadNodule", _NS):
            mark_id = _text(nod, "noduleID", path, f"reader {reader} unblindedReadNodule")
            where = f"reader {reader} nodule '{mark_id}'"
            rois = []
            for r_idx, roi in enumerate(nod.findall("n:roi", _NS)):
                w = f"{where} roi {r_idx}"
                try:
                    z = float(_text(roi, "imageZposition", path, w))
                except ValueError:
                    raise AnnotationError(
                        f"{path.name}: {w} imageZposition is not a number"
                    ) from None
                inclusion = (roi.findtext("n:inclusion", "TRUE", _NS) or "TRUE").strip().upper()
                rois.append(
                    LidcRoi(
                        z_position=z,
                        sop_uid=(roi.findtext("n:imageSOP_UID", "", _NS) or "").strip(),
                        inclusion=inclusion == "TRUE",
                        points_xy=_points(roi, path, w),
                    )
                )
            if not rois:
                raise AnnotationError(f"{path.name}: {where} has no <roi>; expected >= 1")
            chars_el = nod.find("n:characteristics", _NS)
            chars = {}
            if chars_el is not None:
                for c in chars_el:
                    if c.text and c.text.strip().lstrip("-").isdigit():
                        chars[c.tag.split("}")[-1]] = int(c.text.strip())
            single_point = len(rois) == 1 and len(rois[0].points_xy) == 1
            kind = "small_nodule" if single_point else "nodule"
            marks.append(LidcMark(reader, mark_id, kind, tuple(rois), chars))
        for non in session.findall("n:nonNodule", _NS):
            mark_id = _text(non, "nonNoduleID", path, f"reader {reader} nonNodule")
            where = f"reader {reader} nonNodule '{mark_id}'"
            try:
                z = float(_text(non, "imageZposition", path, where))
            except ValueError:
                raise AnnotationError(
                    f"{path.name}: {where} imageZposition is not a number"
                ) from None
            locus = non.find("n:locus", _NS)
            if locus is None:
                raise AnnotationError(f"{path.name}: {where} has no <locus>; expected one point")
            roi = LidcRoi(
                z_position=z,
                sop_uid=(non.findtext("n:imageSOP_UID", "", _NS) or "").strip(),
                inclusion=True,
                points_xy=_points(locus, path, where),
            )
            marks.append(LidcMark(reader, mark_id, "non_nodule", (roi,)))
    return marks


def _slice_index(roi: LidcRoi, volume: CTVolume, z_world: np.ndarray, where: str) -> int:
    if roi.sop_uid and roi.sop_uid in volume.sop_instance_uids:
        return volume.sop_instance_uids.index(roi.sop_uid)
    k = int(np.argmin(np.abs(z_world - roi.z_position)))
    if abs(z_world[k] - roi.z_position) > 0.5 * volume.spacing[0]:
        raise AnnotationError(
            f"{where}: imageZposition {roi.z_position} matches no slice of series "
            f"{volume.series_uid} (nearest {z_world[k]:.3f} mm); expected the XML of this series"
        )
    return k


def _polygon_interior(points_xy: np.ndarray, shape_yx: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """(rows, cols) of pixel centres strictly inside a closed contour.

    The contour's own pixels are excluded explicitly: a point-in-polygon test is ambiguous
    exactly on the boundary, and LIDC contours are chains of boundary pixels.
    """
    from matplotlib.path import Path as MplPath

    x0, y0 = np.floor(points_xy.min(0)).astype(int)
    x1, y1 = np.ceil(points_xy.max(0)).astype(int)
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    inside = MplPath(points_xy).contains_points(np.c_[xx.ravel(), yy.ravel()])
    inside = inside.reshape(yy.shape)
    on_contour = np.rint(points_xy).astype(int)
    inside[on_contour[:, 1] - y0, on_contour[:, 0] - x0] = False
    rows, cols = yy[inside], xx[inside]
    ok = (rows >= 0) & (rows < shape_yx[0]) & (cols >= 0) & (cols < shape_yx[1])
    return rows[ok], cols[ok]


def mark_voxels(mark: LidcMark, volume: CTVolume, where: str = "") -> np.ndarray:
    """``[N, 3]`` (z, y, x) indices of a mark's voxels (contour interiors minus holes).

    Point marks, and contours too small to hold a pixel centre, give their contour points.
    """
    z_world = volume.voxel_to_world(
        np.c_[np.arange(volume.shape[0]), np.zeros((volume.shape[0], 2))]
    )[:, 2]
    where = where or f"reader {mark.reader} mark '{mark.mark_id}'"
    keep: set[tuple[int, int, int]] = set()
    holes: set[tuple[int, int, int]] = set()
    boundary: list[tuple[int, int, int]] = []
    for roi in mark.rois:
        k = _slice_index(roi, volume, z_world, where)
        pts = roi.points_xy
        boundary.extend((k, int(round(y)), int(round(x))) for x, y in pts)
        if len(pts) >= 3:
            rows, cols = _polygon_interior(pts, volume.shape[1:])
            target = keep if roi.inclusion else holes
            target.update((k, int(r), int(c)) for r, c in zip(rows, cols, strict=True))
    voxels = keep - holes
    if not voxels:
        voxels = set(boundary)
    return np.asarray(sorted(voxels), dtype=np.int64)


def reader_marks_frame(
    marks: Sequence[LidcMark], volume: CTVolume, diameter: str = "equivalent_sphere"
) -> pd.DataFrame:
    """One row per reader mark: centre in world mm, diameter (NaN for point marks).

    ``diameter``: ``"equivalent_sphere"`` ((6V/pi)^(1/3) of the contoured voxels, LUNA16's
    per-reader size) or ``"max_extent"`` (largest distance between two contour points, 3-D).
    """
    if diameter not in ("equivalent_sphere", "max_extent"):
        raise AnnotationError(
            f"diameter={diameter!r}; expected 'equivalent_sphere' or 'max_extent'"
        )
    voxel_mm3 = float(np.prod(volume.spacing))
    rows = []
    for mark in marks:
        vox = mark_voxels(mark, volume)
        centre = volume.voxel_to_world(vox.mean(axis=0))
        d = float("nan")
        vol = float("nan")
        if mark.kind == "nodule":
            vol = len(vox) * voxel_mm3
            if diameter == "equivalent_sphere":
                d = float((6.0 * vol / np.pi) ** (1.0 / 3.0))
            else:
                d = _max_extent(mark, volume)
        rows.append(
            (
                mark.reader,
                mark.mark_id,
                mark.kind,
                *centre.tolist(),
                d,
                vol,
                len({int(v[0]) for v in vox}),
            )
        )
    return pd.DataFrame(rows, columns=MARK_COLUMNS)


def _max_extent(mark: LidcMark, volume: CTVolume) -> float:
    z_world = volume.voxel_to_world(
        np.c_[np.arange(volume.shape[0]), np.zeros((volume.shape[0], 2))]
    )[:, 2]
    pts = []
    for roi in mark.rois:
        k = _slice_index(roi, volume, z_world, f"reader {mark.reader} mark '{mark.mark_id}'")
        pts.append(np.c_[np.full(len(roi.points_xy), k), roi.points_xy[:, 1], roi.points_xy[:, 0]])
    world = volume.voxel_to_world(np.concatenate(pts))
    best = 0.0
    for i in range(len(world) - 1):  # O(N^2) distances in chunks of one row: N is a few thousand
        best = max(best, float(np.max(np.linalg.norm(world[i + 1 :] - world[i], axis=1))))
    return best


def cluster_reader_marks(nodules: pd.DataFrame, min_readers: int = 1) -> pd.DataFrame:
    """Cluster readers' nodule marks into consensus nodules, as LUNA16 did.

    Two marks of different readers join when their centres are closer than the sum of
    their radii; clusters are the connected components (single linkage). A cluster's centre
    and diameter are the means over its marks; ``n_readers`` counts distinct readers. Only
    clusters with ``n_readers >= min_readers`` are returned (LUNA16: 3 of 4).
    Input: rows of :func:`reader_marks_frame` with ``kind == "nodule"``.
    """
    nod = nodules[nodules["kind"] == "nodule"].reset_index(drop=True)
    n = len(nod)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    xyz = nod[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
    radius = nod["diameter_mm"].to_numpy(dtype=np.float64) / 2.0
    readers = nod["reader"].to_numpy()
    for i in range(n):
        for j in range(i + 1, n):
            if readers[i] != readers[j] and np.linalg.norm(xyz[i] - xyz[j]) < radius[i] + radius[j]:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    rows = []
    for members in sorted(groups.values(), key=lambda m: min(m)):
        sub = nod.iloc[members]
        n_readers = int(sub["reader"].nunique())
        if n_readers < min_readers:
            continue
        rows.append(
            (
                *sub[["coordX", "coordY", "coordZ", "diameter_mm"]].mean().tolist(),
                n_readers,
                ",".join(str(r) for r in sorted(sub["reader"].unique())),
                ",".join(sub["mark_id"].astype(str)),
            )
        )
    return pd.DataFrame(
        rows,
        columns=["coordX", "coordY", "coordZ", "diameter_mm", "n_readers", "readers", "mark_ids"],
    )


def lidc_to_luna(
    xml_path: str | Path,
    volume: CTVolume,
    min_readers: int = 3,
    min_diameter_mm: float = 3.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """LUNA16-style ``(annotations, excluded)`` frames for one LIDC series.

    annotations: consensus nodules with >= ``min_readers`` readers and mean diameter
    >= ``min_diameter_mm``. excluded: the other nodule clusters (their mean diameter), and
    every reader's < 3 mm nodule and non-nodule point with diameter -1 (LUNA16's convention).
    """
    marks = reader_marks_frame(parse_lidc_xml(xml_path), volume)
    clusters = cluster_reader_marks(marks, min_readers=1)
    accepted = (clusters["n_readers"] >= min_readers) & (clusters["diameter_mm"] >= min_diameter_mm)
    uid = volume.series_uid

    def luna(frame: pd.DataFrame) -> pd.DataFrame:
        out = frame[["coordX", "coordY", "coordZ", "diameter_mm"]].copy()
        out.insert(0, "seriesuid", uid)
        return out.reset_index(drop=True)

    points = marks[marks["kind"] != "nodule"].assign(diameter_mm=-1.0)
    excluded = pd.concat([luna(clusters[~accepted]), luna(points)], ignore_index=True)
    return luna(clusters[accepted]), excluded


# ----------------------------------------------------------------------------- LUNA16 CSV


def _read_luna_csv(path: str | Path, allow_unit: bool) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(
            f"{path} does not exist; expected a LUNA16 CSV ({', '.join(LUNA_COLUMNS)})"
        )
    frame = pd.read_csv(path, dtype={"seriesuid": str})
    missing = [c for c in LUNA_COLUMNS if c not in frame.columns]
    if missing:
        raise AnnotationError(
            f"{path.name}: missing column(s) {missing}; expected header {','.join(LUNA_COLUMNS)}"
        )
    frame = frame[LUNA_COLUMNS].copy()
    for col in LUNA_COLUMNS[1:]:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() | ~np.isfinite(values.to_numpy(dtype=float)))
        if len(bad):
            i = int(bad[0])
            raise AnnotationError(
                f"{path.name}: row {i + 2} column {col}: {frame[col].iloc[i]!r} is not a finite "
                "number"
            )
        frame[col] = values.astype(np.float64)
    d = frame["diameter_mm"].to_numpy()
    bad = np.flatnonzero(~((d > 0) | (allow_unit & (d == -1))))
    if len(bad):
        i = int(bad[0])
        raise AnnotationError(
            f"{path.name}: row {i + 2} column diameter_mm: {d[i]} ; expected > 0"
            + (" or -1 (unknown size, counted as 10 mm)" if allow_unit else "")
        )
    empty = np.flatnonzero(frame["seriesuid"].isna().to_numpy())
    if len(empty):
        raise AnnotationError(f"{path.name}: row {int(empty[0]) + 2} column seriesuid is empty")
    return frame


def read_luna_annotations(path: str | Path) -> pd.DataFrame:
    """LUNA16 ``annotations.csv``: ``seriesuid, coordX, coordY, coordZ, diameter_mm`` (world mm)."""
    return _read_luna_csv(path, allow_unit=True)


def read_luna_excluded(path: str | Path) -> pd.DataFrame:
    """LUNA16 ``annotations_excluded.csv`` (same columns; diameter -1 = unknown, 10 mm)."""
    return _read_luna_csv(path, allow_unit=True)


def read_seriesuids(path: str | Path) -> list[str]:
    """LUNA16 ``seriesuids.csv``: one series UID per line, no header (a header line is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path} does not exist; expected one series UID per line")
    uids = []
    for i, line in enumerate(path.read_text().splitlines()):
        uid = line.strip().split(",")[0].strip()
        if not uid or (i == 0 and uid.lower() == "seriesuid"):
            continue
        if not all(ch.isdigit() or ch == "." for ch in uid):
            raise AnnotationError(f"{path.name}: line {i + 1}: {uid!r} is not a DICOM UID")
        uids.append(uid)
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise AnnotationError(
            f"{path.name}: series UID {dup} is listed twice; expected unique UIDs"
        )
    return uids
