"""End to end: synthetic DICOM -> MONAI resampling -> probability map -> candidates -> FROC.

An oracle 'detector' puts probability blobs at the annotated world positions on the
RESAMPLED grid; the candidates must come back at those world positions, so this checks the
whole geometry chain (DICOM positions, affine through MONAI, candidate mapping, FROC).
"""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose

from apps.medical.annotations import read_luna_annotations, read_luna_excluded, read_seriesuids
from apps.medical.candidates import concat_candidates, probability_map_to_candidates
from apps.medical.froc import evaluate_froc
from apps.medical.synthetic import generate_dataset
from apps.medical.transforms import (
    LoadCTSeriesd,
    ResampleToSpacingd,
    affine_of,
    voxel_to_world,
    world_to_voxel,
)


def _add_blob(prob: np.ndarray, centre_zyx: np.ndarray, peak: float, sigma_vox: float) -> None:
    lo = np.maximum(np.floor(centre_zyx - 4 * sigma_vox).astype(int), 0)
    hi = np.minimum(np.ceil(centre_zyx + 4 * sigma_vox).astype(int) + 1, prob.shape)
    grid = np.indices(tuple(hi - lo)).astype(float) + lo[:, None, None, None]
    r2 = sum((grid[i] - centre_zyx[i]) ** 2 for i in range(3)) / sigma_vox**2
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    prob[box] = np.maximum(prob[box], peak * np.exp(-0.5 * r2))


def test_oracle_detector_scores_perfectly_through_the_pipeline(tmp_path):
    generate_dataset(tmp_path, n_series=2, size="small", seed=21)
    ann = read_luna_annotations(tmp_path / "annotations.csv")
    exc = read_luna_excluded(tmp_path / "annotations_excluded.csv")
    uids = read_seriesuids(tmp_path / "seriesuids.csv")
    load = Compose(
        [LoadCTSeriesd("image"), ResampleToSpacingd("image", spacing_zyx=(2.0, 2.0, 2.0))]
    )
    frames, n_fp_planted = [], 0
    for uid in uids:
        image = load({"image": tmp_path / "dicom" / uid})["image"]
        prob = np.zeros(image.shape[1:], dtype=np.float32)
        for row in ann[ann["seriesuid"] == uid].itertuples():
            _add_blob(prob, world_to_voxel(image, [row.coordX, row.coordY, row.coordZ]), 0.9, 1.5)
        for row in exc[exc["seriesuid"] == uid].itertuples():  # marks on excluded findings
            _add_blob(prob, world_to_voxel(image, [row.coordX, row.coordY, row.coordZ]), 0.95, 1.0)
        # two false positives >= 40 mm from every finding
        findings = np.concatenate(
            [
                f[f["seriesuid"] == uid][["coordX", "coordY", "coordZ"]].to_numpy()
                for f in (ann, exc)
            ]
        )
        planted = 0
        for frac in np.linspace(0.2, 0.8, 7):
            zyx = np.asarray(image.shape[1:]) * np.array([0.5, frac, 1.0 - frac])
            if (
                planted < 2
                and np.min(np.linalg.norm(findings - voxel_to_world(image, zyx), axis=1)) > 40
            ):
                _add_blob(prob, zyx, 0.3, 1.0)
                planted += 1
        assert planted == 2
        n_fp_planted += planted
        frames.append(
            probability_map_to_candidates(prob, affine_of(image), uid, threshold=0.2, refine=True)
        )
    submission = concat_candidates(frames)
    result = evaluate_froc(submission, ann, uids, exc)
    assert result.n_nodules == len(ann) and result.n_detected == len(ann)
    assert result.n_false_positives == n_fp_planted
    assert (result.candidates["status"] == "excluded").sum() == len(exc)
    assert result.cpm == 1.0
    # candidates come back at the annotated world positions (sub-voxel refinement)
    tp = result.candidates[result.candidates["status"] == "tp"]
    for row in ann.itertuples():
        d = np.linalg.norm(
            tp[tp["seriesuid"] == row.seriesuid][["coordX", "coordY", "coordZ"]].to_numpy()
            - [row.coordX, row.coordY, row.coordZ],
            axis=1,
        )
        assert d.min() == pytest.approx(0.0, abs=0.05)
