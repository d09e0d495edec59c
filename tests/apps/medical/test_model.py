"""Stage-1 geometry: sliding windows cover the volume, candidates land in world mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.medical.config import MedicalConfig
from apps.medical.geometry import make_affine, world_to_index
from apps.medical.model import (
    NoduleHeatmapModel,
    detect_scan,
    heatmap_targets,
    sliding_window_heatmap,
    window_starts,
)
from apps.medical.preprocess import PreparedScan, Scan, prepare_scan, resample
from tests.apps.medical.tiny import tiny_config


@pytest.mark.parametrize(
    "length,crop,stride", [(8, 8, 8), (36, 16, 12), (40, 16, 16), (100, 32, 24)]
)
def test_windows_cover_every_voxel(length, crop, stride):
    covered = np.zeros(length, bool)
    for s in window_starts(length, crop, stride):
        assert s >= 0 and s + crop <= max(length, crop)
        covered[s : s + crop] = True
    assert covered.all()


def test_sliding_window_heatmap_covers_whole_volume():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = NoduleHeatmapModel(cfg.detector.backbone, None, (4, 4, 4))
    image = np.random.default_rng(0).random((13, 22, 17), dtype=np.float32)
    prob, off = sliding_window_heatmap(model, image, (8, 8, 8), (4, 4, 4), batch_size=3)
    assert prob.shape == (4, 6, 5)  # ceil(shape / patch): every voxel lies in a scored token
    assert off.shape == (4, 6, 5, 3)
    assert np.all((prob >= 0) & (prob <= 1))  # -1 would mark a token no window reached


def _bright_patch_model() -> NoduleHeatmapModel:
    """A real NoduleHeatmapModel with weights SET (not trained) so its logit increases with
    the mean intensity of a patch: no blocks, the patch sum in a channel the 3-D sincos code
    leaves free (d=8: 6 position channels whose squared sum is constant), RMS norm, head on it."""
    cfg = MedicalConfig.from_dict(
        {
            "detector": {
                "backbone": {
                    "d_model": 8,
                    "n_layers": 0,
                    "ffn_hidden": 8,
                    "attention": {"n_heads": 1, "top_k": None},
                    "moe": None,
                }
            }
        }
    ).detector
    model = NoduleHeatmapModel(cfg.backbone, None, (4, 4, 4), offset_weight=0.0)
    with torch.no_grad():
        model.embed.proj.weight.zero_()
        model.embed.proj.bias.zero_()
        model.embed.proj.weight[6] = 1.0 / 64
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[0, 6] = 8.0
        model.head.bias[0] = -4.0
    return model.eval()


def test_planted_blob_is_found_in_world_mm():
    rng = np.random.default_rng(1)
    hu = (-850 + 10 * rng.standard_normal((30, 40, 44))).astype(np.float32)
    spacing = (2.5, 1.5, 1.25)
    direction = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]])  # flipped x: a non-trivial affine
    affine = make_affine(spacing, (120.0, -80.0, -300.0), direction)
    centre_zyx = np.array([14.3, 21.6, 25.2])
    zz, yy, xx = np.indices(hu.shape)
    r_mm = np.sqrt(
        ((zz - centre_zyx[0]) * spacing[0]) ** 2
        + ((yy - centre_zyx[1]) * spacing[1]) ** 2
        + ((xx - centre_zyx[2]) * spacing[2]) ** 2
    )
    hu[r_mm <= 5.0] = 40.0
    scan = prepare_scan(Scan(hu, affine, "1.2.3"), (2.0, 2.0, 2.0), use_lung_mask=False)
    cands = detect_scan(_bright_patch_model(), scan, (16, 16, 16), (8, 8, 8), 0.5, 8.0)
    assert len(cands) >= 1
    top = cands.iloc[0]
    found_zyx = world_to_index(affine, [top.coordX, top.coordY, top.coordZ])
    assert np.all(np.abs(found_zyx - centre_zyx) <= 1.0), (found_zyx, centre_zyx)


def test_resample_keeps_world_positions():
    affine = make_affine((5.0, 0.7, 0.7), (10.0, 20.0, 30.0), np.eye(3))
    zz = np.indices((8, 30, 30))[0]
    hu = (30.0 + 5.0 * zz).astype(np.float32)  # value = world z of the voxel
    out, new_affine = resample(hu, affine, (2.0, 2.0, 2.0))
    assert out.shape == (18, 11, 11)
    assert np.allclose(new_affine[:3, 3], affine[:3, 3])  # voxel 0 keeps its centre
    assert np.allclose(new_affine @ [17, 10, 10, 1], [30, 40, 64, 1])
    world_z = (new_affine @ np.array([[k, 3, 3, 1] for k in range(18)]).T)[2]
    assert np.allclose(out[:, 3, 3], world_z, atol=1e-3)


def test_heatmap_targets_mark_the_nodule_token_with_its_offset():
    nod = np.array([[9.0, 5.0, 14.5]])
    t, w, o = heatmap_targets(
        (0, 0, 0), (16, 16, 16), (4, 4, 4), (2, 2, 2), nod, np.zeros((0, 3)), 3.0
    )
    grid = t.reshape(4, 4, 4)
    assert grid[2, 1, 3] == 1.0  # voxel (9, 5, 14.5) lies in patch (2, 1, 3)
    k = np.ravel_multi_index((2, 1, 3), (4, 4, 4))
    centre = np.array([2, 1, 3]) * 4 + 1.5
    assert np.allclose(o[k], (nod[0] - centre) / 4)
    exc = np.array([[1.5, 1.5, 1.5]])
    _, w2, _ = heatmap_targets((0, 0, 0), (16, 16, 16), (4, 4, 4), (2, 2, 2), nod, exc, 3.0)
    assert w2[0] == 0.0 and w2.sum() == 63


def test_prepared_scan_is_windowed_and_masked(tmp_path):
    from apps.medical.synthetic import make_phantom

    ph = make_phantom(3, 0, None)
    scan = prepare_scan(Scan(ph.hu, ph.affine, ph.series_uid), (4.0, 4.0, 4.0))
    assert isinstance(scan, PreparedScan)
    assert scan.image.min() >= 0 and scan.image.max() <= 1
    assert 0.05 < scan.lung.mean() < 0.8
    assert np.all(scan.image[~scan.lung] == 0)
