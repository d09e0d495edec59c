"""Real data: LIDC-IDRI-0001 (133 DICOM slices + reader XML) and the official LUNA16 CSVs.

Skips when ../shared/data is absent; fails instead under KEEL_REQUIRE_SHARED_DATA=1 (CI).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from apps.medical.annotations import (
    find_lidc_xml,
    lidc_to_luna,
    parse_lidc_xml,
    read_luna_annotations,
    read_luna_excluded,
    read_seriesuids,
    reader_marks_frame,
)
from apps.medical.dicom_io import find_series, load_series
from apps.medical.froc import evaluate_froc
from apps.medical.lung import lung_mask
from tests.shared import require_shared_data

pytestmark = pytest.mark.shared_data
LIDC_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


@pytest.fixture(scope="module")
def lidc_root():
    return require_shared_data("medical/lidc-idri-0001")


@pytest.fixture(scope="module")
def luna_dir():
    return require_shared_data("medical/luna16")


@pytest.fixture(scope="module")
def volume(lidc_root):
    return load_series(lidc_root)


def test_geometry_of_lidc_0001(volume):
    assert volume.series_uid == LIDC_UID
    assert volume.shape == (133, 512, 512)
    assert volume.spacing == (2.5, 0.703125, 0.703125)
    assert volume.origin == pytest.approx((-166.0, -171.699997, -340.0))
    z = volume.voxel_to_world(np.c_[np.arange(133), np.zeros((133, 2))])[:, 2]
    np.testing.assert_allclose(np.diff(z), 2.5)  # strictly monotonic, regular
    assert z[0] == pytest.approx(-340.0) and z[-1] == pytest.approx(-10.0)


def test_loads_exactly_in_position_order(volume, lidc_root):
    files = next(iter(find_series(lidc_root).values()))
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in files}
    z_of = {p: float(h.ImagePositionPatient[2]) for p, h in headers.items()}
    by_name = [z_of[p] for p in sorted(files)]
    by_instance = [z_of[p] for p in sorted(files, key=lambda p: int(headers[p].InstanceNumber))]
    assert by_name != sorted(by_name) and by_instance != sorted(by_instance)
    by_z = sorted(files, key=lambda p: z_of[p])
    assert volume.sop_instance_uids == tuple(str(headers[p].SOPInstanceUID) for p in by_z)
    for k in (0, 57, 132):  # pixels equal the stored values rescaled, padding -> air
        ds = pydicom.dcmread(by_z[k])
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        padding = hu <= -2000
        assert padding.any()  # the out-of-field padding reads -2048 HU in the file
        np.testing.assert_array_equal(volume.array[k][~padding], hu[~padding])
        assert np.all(volume.array[k][padding] == -1024.0)
    assert volume.array.min() == -1024.0


def test_luna16_nodule_centre_is_solid_tissue_inside_lung(volume, luna_dir):
    ann = read_luna_annotations(luna_dir / "annotations.csv")
    rows = ann[ann["seriesuid"] == LIDC_UID]
    assert len(rows) == 1 and rows["diameter_mm"].iloc[0] == pytest.approx(23.35, abs=0.01)
    centre = rows[["coordX", "coordY", "coordZ"]].to_numpy()[0]
    z, y, x = np.rint(volume.world_to_voxel(centre)).astype(int)
    nodule_hu = float(volume.array[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2].mean())
    lungs = lung_mask(volume.array, volume.spacing)
    parenchyma_hu = float(np.median(volume.array[lungs]))
    assert parenchyma_hu < -750.0  # aerated lung, ~ -850
    assert nodule_hu > -400.0  # the nodule is soft tissue
    assert lungs[z, y, x]  # juxta-pleural notch closed: the nodule lies in the lung field
    lung_litres = lungs.sum() * np.prod(volume.spacing) / 1e6
    assert 2.0 < lung_litres < 8.0


def test_lidc_xml_consensus_matches_luna16(volume, lidc_root, luna_dir):
    xml = find_lidc_xml(lidc_root)
    assert [p.name for p in xml] == ["069.xml"]
    marks = parse_lidc_xml(xml[0])
    assert sorted({m.reader for m in marks}) == [0, 1, 2, 3]
    frame = reader_marks_frame(marks, volume)
    assert (frame["kind"] == "nodule").sum() == 4  # each reader contoured the big nodule
    annotations, excluded = lidc_to_luna(xml[0], volume)
    luna = read_luna_annotations(luna_dir / "annotations.csv")
    ref = luna[luna["seriesuid"] == LIDC_UID].iloc[0]
    assert len(annotations) == 1
    got = annotations.iloc[0]
    dist = np.linalg.norm(
        got[["coordX", "coordY", "coordZ"]].to_numpy(float)
        - ref[["coordX", "coordY", "coordZ"]].to_numpy(float)
    )
    assert dist < 0.5
    assert got["diameter_mm"] == pytest.approx(ref["diameter_mm"], abs=0.5)
    # one reader's mark is exactly LUNA16's per-reader excluded entry (same conventions)
    luna_ex = read_luna_excluded(luna_dir / "annotations_excluded.csv")
    entry = luna_ex[
        (luna_ex["seriesuid"] == LIDC_UID) & (luna_ex["diameter_mm"].round(4) == 23.5001)
    ]
    assert len(entry) == 1
    nod = frame[frame["kind"] == "nodule"]
    best = np.argmin(np.abs(nod["diameter_mm"].to_numpy() - 23.500137))
    assert nod["diameter_mm"].iloc[best] == pytest.approx(entry["diameter_mm"].iloc[0], abs=1e-5)
    gap = (
        nod[["coordX", "coordY", "coordZ"]].to_numpy(float)[best]
        - entry[["coordX", "coordY", "coordZ"]].to_numpy(float)[0]
    )
    assert np.linalg.norm(gap) < 0.01
    # every < 3 mm nodule / non-nodule point is one of LUNA16's excluded (-1) rows
    luna_pts = luna_ex[(luna_ex["seriesuid"] == LIDC_UID) & (luna_ex["diameter_mm"] == -1)]
    ours = excluded[excluded["diameter_mm"] == -1][["coordX", "coordY", "coordZ"]].to_numpy(float)
    theirs = luna_pts[["coordX", "coordY", "coordZ"]].to_numpy(float)
    assert len(ours) == len(theirs) == 22
    d = np.linalg.norm(ours[:, None] - theirs[None], axis=2)
    assert d.min(axis=1).max() < 0.01 and d.min(axis=0).max() < 0.01


def test_luna16_csvs_and_perfect_submission(luna_dir):
    ann = read_luna_annotations(luna_dir / "annotations.csv")
    exc = read_luna_excluded(luna_dir / "annotations_excluded.csv")
    uids = read_seriesuids(luna_dir / "seriesuids.csv")
    assert (len(ann), len(exc), len(uids)) == (1186, 35192, 888)
    assert set(ann["seriesuid"]) <= set(uids)
    # the annotations themselves as candidates, plus marks on every excluded finding
    perfect = ann[["seriesuid", "coordX", "coordY", "coordZ"]].assign(probability=0.9)
    on_excluded = exc[["seriesuid", "coordX", "coordY", "coordZ"]].assign(probability=0.5)
    cands = pd.concat([perfect, on_excluded], ignore_index=True)
    result = evaluate_froc(cands, ann, uids, exc, max_candidates_per_scan=0)
    assert result.n_nodules == 1186 and result.n_detected == 1186
    assert result.n_false_positives == 0
    assert result.cpm == 1.0
