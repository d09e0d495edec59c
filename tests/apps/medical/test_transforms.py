"""MONAI dictionary transforms: geometry-preserving resampling, HU window, lung mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from apps.medical.dicom_io import CTVolume
from apps.medical.errors import MedicalDataError
from apps.medical.synthetic import SyntheticConfig, make_phantom, write_series
from apps.medical.transforms import (
    HUWindowd,
    LoadCTSeriesd,
    LungMaskd,
    ResampleToSpacingd,
    affine_of,
    volume_to_metatensor,
    voxel_to_world,
    world_to_voxel,
)
from tests.apps.medical.dicom_factory import orthonormal_iop


def _volume(direction: np.ndarray, spacing=(2.5, 0.7, 0.8), shape=(20, 30, 40)) -> CTVolume:
    return CTVolume(
        array=np.zeros(shape, np.float32),
        spacing=spacing,
        origin=(-100.0, -120.0, -300.0),
        direction=direction,
        series_uid="1.2.3",
    )


def _oblique() -> np.ndarray:
    iop = orthonormal_iop(angle_deg=25.0, tilt_deg=15.0)
    row, col = iop[:3], iop[3:]
    return np.stack([row, col, np.cross(row, col)], axis=1)


@pytest.mark.parametrize("direction", [np.eye(3), _oblique()], ids=["axial", "oblique"])
def test_resampling_keeps_world_position_of_marked_voxel(direction):
    vol = _volume(direction)
    marked = np.array([7, 11, 13])
    vol.array[tuple(marked)] = 1000.0
    world = vol.voxel_to_world(marked)
    out = ResampleToSpacingd("image", spacing_zyx=(1.0, 1.0, 1.0))(
        {"image": volume_to_metatensor(vol)}
    )["image"]
    assert out.shape[0] == 1 and out.dtype == torch.float32
    np.testing.assert_allclose(
        np.linalg.norm(affine_of(out)[:3, :3], axis=0), [1.0, 1.0, 1.0], atol=1e-6
    )
    arr = out[0].numpy()
    peak = np.array(np.unravel_index(np.argmax(arr), arr.shape))
    # the brightest output voxel is the one nearest the marked point: within half a voxel
    assert np.all(np.abs(world_to_voxel(out, world) - peak) <= 0.5 + 1e-6)
    assert np.linalg.norm(voxel_to_world(out, peak) - world) <= 0.5 * np.sqrt(3) + 1e-6


def test_resampling_keeps_nodule_geometry_of_synthetic_series(tmp_path):
    phantom = make_phantom(2, 0, SyntheticConfig(size="small"))
    folder = tmp_path / "s"
    write_series(phantom, folder, seed=2, index=0)
    pipeline = Compose(
        [LoadCTSeriesd("image"), ResampleToSpacingd("image", spacing_zyx=(1.5, 1.5, 1.5))]
    )
    data = pipeline({"image": folder})
    assert data["seriesuid"] == phantom.series_uid
    image = data["image"]
    lung = float(np.median(phantom.hu[phantom.lung_mask & ~phantom.nodule_mask]))
    checked = 0
    for nod in phantom.nodules:
        if nod.diameter_mm < 5.0:
            continue
        zyx = np.rint(world_to_voxel(image, nod.centre_xyz)).astype(int)
        assert float(image[0][tuple(zyx)]) > lung + 200.0
        checked += 1
    assert checked >= 2


def test_hu_window_maps_to_unit_range():
    x = MetaTensor(
        torch.tensor([[[[-2000.0, -1000.0, -300.0, 400.0, 3000.0]]]]), affine=torch.eye(4)
    )
    out = HUWindowd("image", window=(-1000.0, 400.0))({"image": x})["image"]
    np.testing.assert_allclose(out.numpy().ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    raw = HUWindowd("image", window=(-1000.0, 400.0), clip=False)({"image": x})["image"]
    assert float(raw.numpy().ravel()[0]) == pytest.approx(-1000.0 / 1400.0)
    assert torch.equal(out.affine, x.affine)
    with pytest.raises(MedicalDataError, match="high > low"):
        HUWindowd("image", window=(400.0, -1000.0))


def test_lung_mask_covers_synthetic_lungs(tmp_path):
    for index in range(2):
        phantom = make_phantom(4, index, SyntheticConfig(size="small"))
        folder = tmp_path / f"s{index}"
        write_series(phantom, folder, seed=4, index=index)
        data = Compose([LoadCTSeriesd("image"), LungMaskd("image")])({"image": folder})
        mask = data["lung_mask"][0].numpy() > 0.5
        assert torch.equal(data["lung_mask"].affine, data["image"].affine)
        truth = phantom.lung_mask
        dice = 2 * np.sum(mask & truth) / (mask.sum() + truth.sum())
        assert dice > 0.9
        assert not mask[:, 0, :].any() and not mask[:, :, -1].any()  # outside air dropped


def test_full_pipeline_keeps_image_and_mask_aligned(tmp_path):
    phantom = make_phantom(6, 1, SyntheticConfig(size="tiny"))
    write_series(phantom, tmp_path / "s", seed=6, index=1)
    pipeline = Compose(
        [
            LoadCTSeriesd("image"),
            LungMaskd("image"),
            ResampleToSpacingd(
                ["image", "lung_mask"], spacing_zyx=(4.0, 4.0, 4.0), mode=["bilinear", "nearest"]
            ),
            HUWindowd("image"),
        ]
    )
    data = pipeline({"image": tmp_path / "s"})
    image, mask = data["image"], data["lung_mask"]
    assert image.shape == mask.shape
    np.testing.assert_allclose(affine_of(image), affine_of(mask))
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0}
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # lungs are dark in the window: mean window value inside the mask is low
    assert float(image[mask > 0.5].mean()) < 0.2 < float(image[mask < 0.5].mean())


def test_bad_inputs_are_refused():
    with pytest.raises(MedicalDataError, match="expected a MetaTensor"):
        ResampleToSpacingd("image")({"image": np.zeros((1, 4, 4, 4))})
    with pytest.raises(MedicalDataError, match="3 positive mm"):
        ResampleToSpacingd("image", spacing_zyx=(1.0, 0.0, 1.0))
    with pytest.raises(MedicalDataError, match=r"\[1, Z, Y, X\]"):
        LungMaskd("image")({"image": MetaTensor(torch.zeros(4, 4, 4))})
