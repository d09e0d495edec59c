"""DICOM CT reader: geometry, HU conversion, and every refusal, on small real DICOM files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

from apps.medical.dicom_io import DicomReadConfig, find_series, load_series
from apps.medical.errors import DicomSeriesError
from tests.apps.medical.dicom_factory import PATIENT_ID, PATIENT_NAME, make_series, orthonormal_iop


def _assert_private(message: str) -> None:
    assert PATIENT_ID not in message and "Doe" not in message and PATIENT_NAME not in message


def test_slices_ordered_by_position_not_name_or_instance_number(tmp_path):
    paths = make_series(tmp_path / "s", n_slices=7)
    vol = load_series(tmp_path / "s")
    # stored value 1000 + 10k, intercept -1024 -> HU = 10k - 24, k = anatomical index
    np.testing.assert_array_equal(vol.array[:, 0, 0], 10 * np.arange(7) - 24.0)
    assert vol.shape == (7, 8, 10)
    assert vol.spacing == pytest.approx((2.5, 0.75, 0.6))
    assert vol.origin == pytest.approx((-10.0, -20.0, -100.0))
    # the file names really are shuffled: sorted names are not slice order
    z_by_name = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in sorted(paths)]
    assert z_by_name != sorted(z_by_name)


def test_positions_descending_along_normal_are_reordered(tmp_path):
    make_series(tmp_path / "s", n_slices=5, positions_along=-1.0)
    vol = load_series(tmp_path / "s")
    # slice k was written at origin - k*dz*n: ascending order along n reverses k
    np.testing.assert_array_equal(vol.array[:, 0, 0], 10 * np.arange(5)[::-1] - 24.0)
    assert vol.origin == pytest.approx((-10.0, -20.0, -100.0 - 4 * 2.5))


def test_oblique_geometry_maps_voxels_to_patient_positions(tmp_path):
    iop = orthonormal_iop(angle_deg=30.0, tilt_deg=20.0)
    origin = np.array([5.0, -7.0, 40.0])
    make_series(tmp_path / "s", n_slices=4, iop=iop, origin_xyz=origin, spacing_zyx=(3.0, 0.8, 0.5))
    vol = load_series(tmp_path / "s")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    # voxel (z=k, y=i, x=j) -> origin + j*dx*row + i*dy*col + k*dz*normal
    zyx = np.array([[2, 5, 7], [0, 0, 0], [3, 7, 9]], dtype=float)
    expected = (
        origin + zyx[:, 2:3] * 0.5 * row + zyx[:, 1:2] * 0.8 * col + zyx[:, 0:1] * 3.0 * normal
    )
    np.testing.assert_allclose(vol.voxel_to_world(zyx), expected, atol=1e-5)
    np.testing.assert_allclose(vol.world_to_voxel(expected), zyx, atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.stack([row, col, normal], axis=1), atol=1e-7)


def test_rescale_slope_intercept_and_padding(tmp_path):
    def stored(k):
        px = np.full((8, 10), 200, dtype=np.int16)
        px[0, 0] = -2000  # PixelPaddingValue
        px[0, 1] = -500  # 2 * -500 - 1000 = -2000 HU: at the padding threshold -> air
        px[0, 2] = 100 + k
        return px

    def pad(k, ds):
        ds.add_new(0x00280120, "US", 63536)  # -2000 as US, like LIDC's header

    make_series(tmp_path / "s", n_slices=3, stored=stored, slope=2.0, intercept=-1000.0, mutate=pad)
    vol = load_series(tmp_path / "s")
    assert vol.array.dtype == np.float32
    assert vol.array[1, 0, 0] == -1024.0
    assert vol.array[1, 0, 1] == -1024.0
    assert vol.array[2, 0, 2] == 2.0 * 102 - 1000.0
    assert vol.array[0, 5, 5] == 2.0 * 200 - 1000.0
    as_int = load_series(tmp_path / "s", config=DicomReadConfig(dtype="int16"))
    assert as_int.array.dtype == np.int16
    np.testing.assert_array_equal(as_int.array, vol.array.astype(np.int16))


def test_find_series_groups_by_uid_and_skips_non_dicom(tmp_path):
    a = make_series(tmp_path / "root" / "x" / "a", n_slices=3)
    b = make_series(tmp_path / "root" / "y", n_slices=4, seed=1)
    (tmp_path / "root" / "notes.xml").write_text("<xml/>")
    (tmp_path / "root" / "x" / "README").write_text("not dicom")
    groups = find_series(tmp_path / "root")
    assert sorted(len(v) for v in groups.values()) == [3, 4]
    uid_a = str(pydicom.dcmread(a[0]).SeriesInstanceUID)
    assert sorted(groups[uid_a]) == sorted(a)
    with pytest.raises(DicomSeriesError, match="holds 2 series.*pass series_uid"):
        load_series(tmp_path / "root")
    uid_b = str(pydicom.dcmread(b[0]).SeriesInstanceUID)
    assert load_series(tmp_path / "root", series_uid=uid_b).shape == (4, 8, 10)


# ----------------------------------------------------------------------------- refusals


def _refusal(tmp_path, **kwargs) -> str:
    make_series(tmp_path / "s", **kwargs)
    with pytest.raises(DicomSeriesError) as info:
        load_series(tmp_path / "s")
    message = str(info.value)
    _assert_private(message)
    return message


def _name_of(tmp_path, k: int, n: int) -> str:
    """File name of anatomical slice k (the factory shuffles names with seed 0)."""
    return f"IM{np.random.default_rng(0).permutation(n)[k]:04d}.dcm"


def test_refuses_non_ct_modality(tmp_path):
    def mr(k, ds):
        if k == 2:
            ds.Modality = "MR"

    msg = _refusal(tmp_path, n_slices=5, mutate=mr)
    assert _name_of(tmp_path, 2, 5) in msg and "'MR'" in msg and "expected 'CT'" in msg


def test_refuses_duplicate_slice_position(tmp_path):
    def dup(k, ds):
        if k == 3:
            ds.ImagePositionPatient = [-10.0, -20.0, -100.0 + 2 * 2.5]  # same as slice 2

    msg = _refusal(tmp_path, n_slices=5, mutate=dup)
    assert "duplicate slice position" in msg
    assert _name_of(tmp_path, 2, 5) in msg and _name_of(tmp_path, 3, 5) in msg


def test_refuses_missing_slice_gap(tmp_path):
    def gap(k, ds):
        if k >= 3:  # slices 3.. moved one spacing further: slice at 3*dz missing
            ds.ImagePositionPatient = [-10.0, -20.0, -100.0 + (k + 1) * 2.5]

    msg = _refusal(tmp_path, n_slices=7, mutate=gap)
    assert "uneven slice spacing" in msg and "gap is 5.000 mm, expected 2.500" in msg
    assert "1 slice(s) missing" in msg
    assert _name_of(tmp_path, 2, 7) in msg and _name_of(tmp_path, 3, 7) in msg


def test_refuses_missing_position(tmp_path):
    def drop(k, ds):
        if k == 1:
            del ds.ImagePositionPatient

    msg = _refusal(tmp_path, n_slices=4, mutate=drop)
    assert _name_of(tmp_path, 1, 4) in msg and "ImagePositionPatient" in msg


def test_refuses_mixed_orientation(tmp_path):
    other = orthonormal_iop(angle_deg=0.0, tilt_deg=90.0)  # a coronal image

    def rotate(k, ds):
        if k == 4:
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in other]

    msg = _refusal(tmp_path, n_slices=6, mutate=rotate)
    assert "mixed orientations" in msg and _name_of(tmp_path, 4, 6) in msg
    assert "5 files have" in msg


def test_refuses_localizer_mixed_in(tmp_path):
    def scout(k, ds):
        if k == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    msg = _refusal(tmp_path, n_slices=5, mutate=scout)
    assert "localizer" in msg.lower() and _name_of(tmp_path, 0, 5) in msg


def _compressed(tsyntax, codestream: bytes):
    def mutate(k, ds):
        ds.file_meta.TransferSyntaxUID = tsyntax
        ds.PixelData = encapsulate([codestream])
        ds["PixelData"].VR = "OB"

    return mutate


def test_refuses_compressed_pixels_without_decoder(tmp_path):
    assert not get_decoder(JPEGLosslessSV1).is_available  # the venv has no lossless-JPEG plugin
    msg = _refusal(
        tmp_path, n_slices=3, mutate=_compressed(JPEGLosslessSV1, b"\xff\xd8\xff\xc3" + bytes(60))
    )
    assert "no decoder" in msg and "JPEG Lossless" in msg and str(JPEGLosslessSV1) in msg
    assert any(_name_of(tmp_path, k, 3) in msg for k in range(3))


def test_refuses_undecodable_jpeg2000(tmp_path):
    # a JPEG 2000 codestream header (SOC + SIZ markers) followed by garbage
    msg = _refusal(
        tmp_path, n_slices=3, mutate=_compressed(JPEG2000Lossless, b"\xff\x4f\xff\x51" + bytes(60))
    )
    assert "JPEG 2000" in msg and str(JPEG2000Lossless) in msg and "decod" in msg
    assert any(_name_of(tmp_path, k, 3) in msg for k in range(3))


def test_refuses_sheared_series(tmp_path):
    def shear(k, ds):
        ds.ImagePositionPatient = [-10.0 + 0.5 * k, -20.0, -100.0 + k * 2.5]

    msg = _refusal(tmp_path, n_slices=4, mutate=shear)
    assert "shifted" in msg and "in-plane" in msg


def test_refuses_mixed_series_file_list(tmp_path):
    a = make_series(tmp_path / "a", n_slices=3)
    b = make_series(tmp_path / "b", n_slices=3, seed=1)
    with pytest.raises(DicomSeriesError, match="more than one series"):
        load_series(a + b[:1])


def test_volume_repr_is_private(tmp_path):
    make_series(tmp_path / "s", n_slices=3)
    text = repr(load_series(tmp_path / "s"))
    _assert_private(text)
    assert "series_uid" in text
