"""Synthetic chest CT: real DICOM that reads back with the intended geometry and truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from apps.medical.annotations import read_luna_annotations, read_luna_excluded, read_seriesuids
from apps.medical.dicom_io import find_series, load_series
from apps.medical.synthetic import (
    SyntheticConfig,
    generate_dataset,
    main,
    make_phantom,
    stored_slices,
)
from tests.shared import PROJECT_ROOT

SAMPLE = PROJECT_ROOT / "data_samples" / "medical"
PIXEL_DATA = 0x7FE00010


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = generate_dataset(out, n_series=2, size="small", seed=11)
    return out, manifest


def test_files_are_valid_ct_dicom_with_shuffled_names(dataset):
    out, manifest = dataset
    for entry in manifest["series"]:
        files = sorted((out / "dicom" / entry["seriesuid"]).glob("*.dcm"))
        assert len(files) == entry["shape_zyx"][0]
        z, instance = [], []
        for f in files:
            ds = pydicom.dcmread(f, force=False)  # preamble + file meta: a conformant file
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            for uid in (
                ds.SOPInstanceUID,
                ds.SeriesInstanceUID,
                ds.StudyInstanceUID,
                ds.FrameOfReferenceUID,
            ):
                assert pydicom.uid.UID(uid).is_valid
            assert ds.Modality == "CT" and ds.pixel_array.shape == (128, 128)
            z.append(float(ds.ImagePositionPatient[2]))
            instance.append(int(ds.InstanceNumber))
        assert z != sorted(z)  # names are not slice order
        assert np.corrcoef(z, instance)[0, 1] == pytest.approx(
            -1.0
        )  # InstanceNumber runs against z
        assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == len(files)


def test_series_read_back_with_intended_geometry_and_pixels(dataset):
    out, manifest = dataset
    groups = find_series(out)
    assert sorted(groups) == sorted(e["seriesuid"] for e in manifest["series"])
    for index, entry in enumerate(manifest["series"]):
        vol = load_series(groups[entry["seriesuid"]])
        assert list(vol.shape) == entry["shape_zyx"]
        assert vol.spacing == pytest.approx(tuple(entry["spacing_zyx"]), abs=1e-4)
        assert vol.origin == pytest.approx(tuple(entry["origin_xyz"]), abs=1e-4)
        np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-9)
        phantom = make_phantom(11, index, SyntheticConfig(size="small"))
        rep, slope, intercept, padded = phantom.storage
        expected = stored_slices(phantom).astype(np.float32) * slope + intercept
        padding = expected <= -2000
        assert padding.any() == padded
        np.testing.assert_array_equal(vol.array[~padding], expected[~padding])
        assert np.all(vol.array[padding] == -1024.0)
        np.testing.assert_allclose(
            vol.array[~padding], phantom.hu[~padding], atol=0.5 * slope + 1e-3
        )


def test_nodule_world_coordinates_land_on_nodule_voxels(dataset):
    out, manifest = dataset
    ann = read_luna_annotations(out / "annotations.csv")
    exc = read_luna_excluded(out / "annotations_excluded.csv")
    uids = read_seriesuids(out / "seriesuids.csv")
    assert uids == [e["seriesuid"] for e in manifest["series"]]
    assert len(ann) == sum(len(e["nodules"]) for e in manifest["series"]) >= 2
    assert len(exc) >= 1 and set(exc["diameter_mm"]) == {-1.0}
    assert ann["diameter_mm"].between(3.0, 30.0).all()
    groups = find_series(out)
    for index, uid in enumerate(uids):
        vol = load_series(groups[uid])
        phantom = make_phantom(11, index, SyntheticConfig(size="small"))
        lung_hu = float(np.median(vol.array[phantom.lung_mask & ~phantom.nodule_mask]))
        assert -900.0 < lung_hu < -780.0
        for row in ann[ann["seriesuid"] == uid].itertuples():
            zyx = np.rint(vol.world_to_voxel([row.coordX, row.coordY, row.coordZ])).astype(int)
            assert phantom.nodule_mask[tuple(zyx)]
            assert vol.array[tuple(zyx)] > lung_hu + 200.0


def test_small_solid_nodules_still_rise_above_lung():
    """Partial-volume rendering: a 3 mm solid nodule in ~3 mm voxels still lifts its voxel
    (a 3 mm ground-glass one need not: the generator keeps those >= 6 mm by default)."""
    cfg = SyntheticConfig(size="small", diameter_mm=(3.0, 3.5), n_nodules=(3, 4))
    seen = 0
    for index in range(4):
        ph = make_phantom(5, index, cfg)
        lung_hu = float(np.median(ph.hu[ph.lung_mask & ~ph.nodule_mask]))
        for nod in ph.nodules:
            assert 3.0 <= nod.diameter_mm <= 3.5
            if nod.kind not in ("solid", "juxta_pleural"):
                continue
            zyx = np.rint(
                np.linalg.solve(ph.affine[:3, :3], np.subtract(nod.centre_xyz, ph.affine[:3, 3]))
            )
            assert ph.hu[tuple(zyx.astype(int))] > lung_hu + 200.0
            seen += 1
    assert seen >= 3


def test_series_vary_in_geometry_and_storage():
    phantoms = [make_phantom(0, i, SyntheticConfig(size="tiny")) for i in range(4)]
    assert len({p.spacing[1] for p in phantoms}) == 4  # pixel spacing differs per series
    assert len({p.spacing[0] for p in phantoms}) >= 2
    assert any(p.spacing[0] < p.slice_thickness for p in phantoms)  # an overlapping reconstruction
    assert {p.storage[0] for p in phantoms} == {"int16", "uint16"}
    kinds = {n.kind for p in phantoms for n in p.nodules}
    assert kinds == {"solid", "part_solid", "ground_glass", "juxta_pleural"}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "README.md"
    }


def test_generator_is_deterministic(tmp_path):
    """The same seed gives byte-identical files on one machine; another seed other series."""
    first = generate_dataset(tmp_path / "a", 2, "tiny", seed=5)
    generate_dataset(tmp_path / "b", 2, "tiny", seed=5)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = generate_dataset(tmp_path / "other", 1, "tiny", seed=6)
    assert other["series"][0]["seriesuid"] not in {s["seriesuid"] for s in first["series"]}


def test_committed_sample_regenerates_up_to_float_rounding(tmp_path):
    """The committed sample is what the generator writes for its manifest's settings.
    Annotations, manifest and every DICOM element are identical. Pixels are compared to one
    stored unit (1 HU): another CPU's vector units may round a voxel that lands on .5 the
    other way (seen on one voxel of 2.4 M), so any larger or wider difference fails."""
    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    regenerated = tmp_path / "again"
    generate_dataset(regenerated, len(manifest["series"]), manifest["size"], manifest["seed"])
    got, committed = _digest(regenerated), _digest(SAMPLE)
    assert got.keys() == committed.keys()
    for name in got:
        if not name.endswith(".dcm"):
            assert got[name] == committed[name], name
    n_voxels = n_off = 0
    for name in (n for n in got if n.endswith(".dcm")):
        a, b = pydicom.dcmread(regenerated / name), pydicom.dcmread(SAMPLE / name)
        assert [e for e in a if e.tag != PIXEL_DATA] == [e for e in b if e.tag != PIXEL_DATA], name
        diff = np.abs(a.pixel_array.astype(np.int32) - b.pixel_array.astype(np.int32))
        assert diff.max() <= 1, f"{name}: a voxel differs by {diff.max()} stored units"
        n_voxels += diff.size
        n_off += int((diff > 0).sum())
    assert n_off <= 1e-4 * n_voxels, f"{n_off} of {n_voxels} voxels differ"


def test_cli_writes_dataset_and_replaces_previous_series(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--n-series", "2", "--size", "tiny", "--seed", "3"]) == 0
    assert "wrote 2 series" in capsys.readouterr().out
    first = set(find_series(tmp_path))
    assert main(["--out", str(tmp_path), "--n-series", "1", "--size", "tiny", "--seed", "4"]) == 0
    second = set(find_series(tmp_path))
    assert len(second) == 1 and not (second & first)  # stale series removed with the manifest
    assert read_seriesuids(tmp_path / "seriesuids.csv") == sorted(second)
    assert pd.read_csv(tmp_path / "annotations.csv")["seriesuid"].isin(second).all()
    assert not list(tmp_path.rglob("*.tmp*"))
