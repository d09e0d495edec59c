"""Probability map -> LUNA16 candidate rows (local maxima, world-mm NMS, patch grids)."""

from __future__ import annotations

import numpy as np
import pytest

from apps.medical.candidates import (
    concat_candidates,
    local_maxima,
    nms_world,
    patch_grid_affine,
    probability_map_to_candidates,
)
from apps.medical.errors import CandidateError
from apps.medical.geometry import index_to_world, make_affine

AFFINE = make_affine((2.0, 0.5, 0.5), (-30.0, -40.0, -200.0), np.eye(3))


def _blob(shape, centre_zyx, peak, sigma_vox=(1.0, 2.0, 2.0)) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    r2 = sum(((grid[i] - centre_zyx[i]) / sigma_vox[i]) ** 2 for i in range(3))
    return peak * np.exp(-0.5 * r2)


def test_candidates_at_blob_centres_in_world_mm():
    shape = (20, 60, 60)
    prob = np.maximum.reduce(
        [
            _blob(shape, (5, 10, 12), 0.9),
            _blob(shape, (12, 40, 45), 0.6),
            _blob(shape, (5, 10, 18), 0.5),
        ]
    )
    frame = probability_map_to_candidates(prob, AFFINE, "1.2.3", threshold=0.1, nms_radius_mm=5.0)
    assert frame.columns.tolist() == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    # the third blob is 3 mm from the first (6 voxels of 0.5 mm): suppressed by the 5 mm NMS
    assert frame["probability"].round(6).tolist() == [0.9, 0.6]
    expected = index_to_world(AFFINE, np.array([[5, 10, 12], [12, 40, 45]], float))
    np.testing.assert_allclose(frame[["coordX", "coordY", "coordZ"]].to_numpy(), expected)
    np.testing.assert_allclose(expected[0], [-30 + 12 * 0.5, -40 + 10 * 0.5, -200 + 5 * 2.0])
    # with a 2 mm NMS radius the third blob survives
    frame2 = probability_map_to_candidates(prob, AFFINE, "1.2.3", threshold=0.1, nms_radius_mm=2.0)
    assert len(frame2) == 3
    # threshold and the per-scan cap
    assert len(probability_map_to_candidates(prob, AFFINE, "1.2.3", threshold=0.7)) == 1
    assert (
        len(
            probability_map_to_candidates(
                prob, AFFINE, "1.2.3", threshold=0.1, nms_radius_mm=2.0, max_candidates=2
            )
        )
        == 2
    )


def test_refine_gives_subvoxel_position():
    shape = (12, 30, 30)
    prob = _blob(shape, (6.0, 15.5, 14.25), 0.8, sigma_vox=(1.0, 1.0, 1.0))
    coarse = probability_map_to_candidates(prob, AFFINE, "s", threshold=0.1)
    fine = probability_map_to_candidates(prob, AFFINE, "s", threshold=0.1, refine=True)
    truth = index_to_world(AFFINE, [6.0, 15.5, 14.25])
    err_coarse = np.linalg.norm(coarse[["coordX", "coordY", "coordZ"]].to_numpy()[0] - truth)
    err_fine = np.linalg.norm(fine[["coordX", "coordY", "coordZ"]].to_numpy()[0] - truth)
    assert err_fine < 1e-6 and err_coarse > 0.1  # a Gaussian peak is located exactly


def test_plateau_gives_one_candidate():
    prob = np.zeros((6, 10, 10))
    prob[2:4, 3:6, 3:6] = 0.7  # a flat region: every voxel is a local maximum
    zyx, values = local_maxima(prob, (1, 1, 1), 0.5)
    assert len(zyx) == 18 and np.all(values == 0.7)
    frame = probability_map_to_candidates(prob, AFFINE, "s", threshold=0.5, nms_radius_mm=5.0)
    assert len(frame) == 1


def test_nms_world_greedy_by_score():
    pts = np.array([[0.0, 0, 0], [3.0, 0, 0], [6.0, 0, 0], [20.0, 0, 0]])
    scores = np.array([0.5, 0.9, 0.4, 0.1])
    # 0.9 at x=3 suppresses x=0 and x=6 (both 3 mm away); x=20 survives
    assert nms_world(pts, scores, radius_mm=4.0).tolist() == [1, 3]
    assert nms_world(pts, scores, radius_mm=2.0).tolist() == [1, 0, 2, 3]
    assert nms_world(pts, scores, radius_mm=2.0, limit=2).tolist() == [1, 0]


def test_patch_grid_affine_maps_patch_to_its_voxel_centre():
    patch = (2, 4, 4)
    grid_affine = patch_grid_affine(AFFINE, patch, offset_zyx=(1, 0, 8))
    # patch (a, b, c) covers voxels [off + a*p, off + (a+1)*p): centre off + a*p + (p-1)/2
    for a, b, c in [(0, 0, 0), (3, 2, 5)]:
        voxel = np.array([1 + 2 * a + 0.5, 4 * b + 1.5, 8 + 4 * c + 1.5])
        np.testing.assert_allclose(
            index_to_world(grid_affine, [a, b, c]), index_to_world(AFFINE, voxel)
        )
    prob = np.zeros((4, 5, 6))
    prob[3, 2, 5] = 0.8
    frame = probability_map_to_candidates(prob, grid_affine, "s", threshold=0.5)
    np.testing.assert_allclose(
        frame[["coordX", "coordY", "coordZ"]].to_numpy()[0],
        index_to_world(AFFINE, [1 + 6.5, 9.5, 8 + 21.5]),
    )


def test_errors_and_concat():
    with pytest.raises(CandidateError, match=r"expected \[Z, Y, X\]"):
        probability_map_to_candidates(np.zeros((4, 4)), AFFINE, "s")
    bad = np.zeros((3, 4, 5))
    bad[1, 2, 3] = np.nan
    with pytest.raises(CandidateError, match=r"\(z, y, x\)=\(1, 2, 3\)"):
        probability_map_to_candidates(bad, AFFINE, "s")
    with pytest.raises(CandidateError, match="4x4"):
        probability_map_to_candidates(np.zeros((3, 4, 5)), np.eye(3), "s")
    empty = probability_map_to_candidates(np.zeros((3, 4, 5)), AFFINE, "s")
    assert len(empty) == 0
    one = probability_map_to_candidates(_blob((6, 8, 8), (3, 4, 4), 0.9), AFFINE, "t")
    both = concat_candidates([empty, one, one])
    assert len(both) == 2 and both["seriesuid"].tolist() == ["t", "t"]
    assert len(concat_candidates([empty])) == 0
