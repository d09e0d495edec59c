"""LIDC XML parsing, reader-mark geometry, consensus clustering, LUNA16 CSV readers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from apps.medical.annotations import (
    cluster_reader_marks,
    find_lidc_xml,
    lidc_to_luna,
    parse_lidc_xml,
    read_luna_annotations,
    read_seriesuids,
    reader_marks_frame,
)
from apps.medical.dicom_io import CTVolume
from apps.medical.errors import AnnotationError

SPACING = (2.0, 0.5, 0.5)
ORIGIN = (-10.0, -20.0, -50.0)


def _volume() -> CTVolume:
    return CTVolume(
        array=np.zeros((10, 64, 64), np.float32),
        spacing=SPACING,
        origin=ORIGIN,
        direction=np.eye(3),
        series_uid="1.2.3",
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(10)),
    )


def _square(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """A closed chain of boundary pixels, like an LIDC edge map."""
    top = [(x, y0) for x in range(x0, x1 + 1)]
    right = [(x1, y) for y in range(y0 + 1, y1 + 1)]
    bottom = [(x, y1) for x in range(x1 - 1, x0 - 1, -1)]
    left = [(x0, y) for y in range(y1 - 1, y0, -1)]
    return top + right + bottom + left + [(x0, y0)]


def _roi(k: int, pts, inclusion: bool = True, sop: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in pts)
    uid = f"<imageSOP_UID>1.2.3.{k}</imageSOP_UID>" if sop else ""
    z = ORIGIN[2] + k * SPACING[0]
    return f"<roi><imageZposition>{z}</imageZposition>{uid}<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>"


def _nodule(nid: str, rois: str) -> str:
    return f"<unblindedReadNodule><noduleID>{nid}</noduleID><characteristics><malignancy>4</malignancy></characteristics>{rois}</unblindedReadNodule>"


XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader><SeriesInstanceUid>1.2.3</SeriesInstanceUid></ResponseHeader>'


def _write_xml(tmp_path) -> str:
    r0 = _nodule(
        "N1",
        "".join(_roi(k, _square(20, 10, 30, 20)) for k in (3, 4, 5))
        + _roi(4, _square(23, 13, 27, 17), inclusion=False),
    ) + _nodule("small", _roi(7, [(50, 50)]))
    r0 += "<nonNodule><nonNoduleID>nn</nonNoduleID><imageZposition>-40.0</imageZposition><locus><xCoord>5</xCoord><yCoord>6</yCoord></locus></nonNodule>"
    r1 = _nodule("A", "".join(_roi(k, _square(22, 10, 32, 20), sop=False) for k in (3, 4, 5)))
    r2 = _nodule("B", "".join(_roi(k, _square(40, 40, 46, 46)) for k in (1, 2)))
    body = "".join(
        f"<readingSession><servicingRadiologistID>anon</servicingRadiologistID>{r}</readingSession>"
        for r in (r0, r1, r2)
    )
    path = tmp_path / "series" / "001.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(XML_HEAD + body + "</LidcReadMessage>")
    (tmp_path / "series" / "other.xml").write_text("<root><x/></root>")
    return path


def test_parse_marks_and_geometry(tmp_path):
    path = _write_xml(tmp_path)
    assert find_lidc_xml(tmp_path) == [path]
    marks = parse_lidc_xml(path)
    assert [(m.reader, m.mark_id, m.kind) for m in marks] == [
        (0, "N1", "nodule"),
        (0, "small", "small_nodule"),
        (0, "nn", "non_nodule"),
        (1, "A", "nodule"),
        (2, "B", "nodule"),
    ]
    assert marks[0].characteristics == {"malignancy": 4}
    frame = reader_marks_frame(marks, _volume()).set_index("mark_id")
    # N1: 9x9 interior pixels on 3 slices, minus a 3x3 hole on the middle slice
    n1 = frame.loc["N1"]
    voxel_mm3 = 2.0 * 0.5 * 0.5
    assert n1["volume_mm3"] == (81 * 3 - 9) * voxel_mm3
    assert n1["diameter_mm"] == pytest.approx((6 * 234 * voxel_mm3 / math.pi) ** (1 / 3), rel=1e-12)
    assert n1[["coordX", "coordY", "coordZ"]].tolist() == pytest.approx(
        [-10 + 25 * 0.5, -20 + 15 * 0.5, -50 + 4 * 2.0]
    )
    assert n1["n_slices"] == 3
    # reader 1's contours have no SOP UID: slices found by imageZposition
    assert frame.loc["A", ["coordX", "coordY", "coordZ"]].tolist() == pytest.approx(
        [3.5, -12.5, -42.0]
    )
    # point marks: the pixel itself, no diameter
    assert frame.loc["small", ["coordX", "coordY", "coordZ"]].tolist() == pytest.approx(
        [15.0, 5.0, -36.0]
    )
    assert math.isnan(frame.loc["small", "diameter_mm"])
    assert frame.loc["nn", ["coordX", "coordY", "coordZ"]].tolist() == pytest.approx(
        [-7.5, -17.0, -40.0]
    )
    ext = reader_marks_frame(marks, _volume(), diameter="max_extent").set_index("mark_id")
    assert ext.loc["N1", "diameter_mm"] == pytest.approx(math.sqrt(5.0**2 + 5.0**2 + 4.0**2))


def test_consensus_clustering_and_luna_export(tmp_path):
    path = _write_xml(tmp_path)
    frame = reader_marks_frame(parse_lidc_xml(path), _volume())
    clusters = cluster_reader_marks(frame)
    assert clusters["n_readers"].tolist() == [2, 1]
    d_n1, d_a = frame.set_index("mark_id").loc[["N1", "A"], "diameter_mm"]
    assert clusters.iloc[0][["coordX", "coordY", "coordZ"]].tolist() == pytest.approx(
        [3.0, -12.5, -42.0]
    )
    assert clusters.iloc[0]["diameter_mm"] == pytest.approx((d_n1 + d_a) / 2)
    assert cluster_reader_marks(frame, min_readers=2)["mark_ids"].tolist() == ["N1,A"]
    ann, exc = lidc_to_luna(path, _volume(), min_readers=2)
    assert ann["seriesuid"].tolist() == ["1.2.3"] and len(ann) == 1
    assert sorted(exc["diameter_mm"].round(3).tolist()) == [
        -1.0,
        -1.0,
        round(frame.iloc[4]["diameter_mm"], 3),
    ]
    # the default (3 of 4 readers, as LUNA16) accepts nothing here
    ann3, exc3 = lidc_to_luna(path, _volume())
    assert len(ann3) == 0 and len(exc3) == 4


def test_clustering_rule_sum_of_radii_and_distinct_readers():
    base = {"kind": "nodule", "volume_mm3": 1.0, "n_slices": 1}
    frame = pd.DataFrame(
        [
            {
                **base,
                "reader": 0,
                "mark_id": "a",
                "coordX": 0.0,
                "coordY": 0,
                "coordZ": 0,
                "diameter_mm": 6.0,
            },
            {
                **base,
                "reader": 1,
                "mark_id": "b",
                "coordX": 5.9,
                "coordY": 0,
                "coordZ": 0,
                "diameter_mm": 6.0,
            },
            {
                **base,
                "reader": 2,
                "mark_id": "c",
                "coordX": 12.0,
                "coordY": 0,
                "coordZ": 0,
                "diameter_mm": 6.0,
            },
            {
                **base,
                "reader": 0,
                "mark_id": "d",
                "coordX": 0.0,
                "coordY": 3,
                "coordZ": 0,
                "diameter_mm": 6.0,
            },
        ]
    )
    clusters = cluster_reader_marks(frame)
    # a-b: 5.9 < 6 joins; b-c: 6.1 > 6 does not; a-d: same reader never joins directly,
    # but d-b (dist 6.6) does not join either -> d stays alone
    assert clusters["mark_ids"].tolist() == ["a,b", "c", "d"]
    frame.loc[frame["mark_id"] == "c", "coordX"] = 11.8  # now 5.9 from b: single linkage
    assert cluster_reader_marks(frame)["mark_ids"].tolist() == ["a,b,c", "d"]


def test_xml_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text(
        "<LidcReadMessage xmlns='http://www.nih.gov'><ResponseHeader/></LidcReadMessage>"
    )
    with pytest.raises(AnnotationError, match="bad.xml: no <readingSession>"):
        parse_lidc_xml(bad)
    bad.write_text("not xml <")
    with pytest.raises(AnnotationError, match="bad.xml: not a readable XML"):
        parse_lidc_xml(bad)
    far = (
        XML_HEAD
        + "<readingSession>"
        + _nodule("far", _roi(40, _square(1, 1, 4, 4), sop=False))
        + "</readingSession></LidcReadMessage>"
    )
    bad.write_text(far)
    with pytest.raises(AnnotationError, match="reader 0 mark 'far'.*matches no slice"):
        reader_marks_frame(parse_lidc_xml(bad), _volume())
    coord = (
        XML_HEAD
        + "<readingSession>"
        + _nodule("c", _roi(2, [("x", 1)]))
        + "</readingSession></LidcReadMessage>"
    )
    bad.write_text(coord)
    with pytest.raises(
        AnnotationError, match="reader 0 nodule 'c' roi 0 edgeMap 0 has a non-numeric"
    ):
        parse_lidc_xml(bad)


def test_luna_csv_validation(tmp_path):
    good = tmp_path / "annotations.csv"
    good.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,1,2,3,4.5\n1.3,-1,-2,-3,-1\n")
    frame = read_luna_annotations(good)
    assert frame["diameter_mm"].tolist() == [4.5, -1.0] and frame["seriesuid"].tolist() == [
        "1.2",
        "1.3",
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,1,2,3,4\n1.2,1,oops,3,4\n")
    with pytest.raises(AnnotationError, match="bad.csv: row 3 column coordY: 'oops'"):
        read_luna_annotations(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,1,2,3,0\n")
    with pytest.raises(AnnotationError, match="row 2 column diameter_mm"):
        read_luna_annotations(bad)
    bad.write_text("seriesuid,x,coordY,coordZ,diameter_mm\n1.2,1,2,3,4\n")
    with pytest.raises(AnnotationError, match=r"missing column\(s\) \['coordX'\]"):
        read_luna_annotations(bad)


def test_seriesuids_reader(tmp_path):
    path = tmp_path / "seriesuids.csv"
    path.write_text("1.2.3\n1.2.4\n\n")
    assert read_seriesuids(path) == ["1.2.3", "1.2.4"]
    path.write_text("seriesuid\n1.2.3\n")
    assert read_seriesuids(path) == ["1.2.3"]
    path.write_text("1.2.3\n1.2.3\n")
    with pytest.raises(AnnotationError, match="listed twice"):
        read_seriesuids(path)
    path.write_text("1.2.3\nabc\n")
    with pytest.raises(AnnotationError, match="line 2: 'abc' is not a DICOM UID"):
        read_seriesuids(path)
