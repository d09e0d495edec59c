"""apps/medical/training.py: stage 2 with a validation-chosen fusion weight."""

from __future__ import annotations

import torch

from apps.medical.data import load_raw_scan, prepare, read_truth
from apps.medical.model import stage1_candidates
from apps.medical.predictor import build_detector
from apps.medical.training import fit_fp_reduction, split_validation
from tests.apps.medical.tiny import tiny_config, tiny_dataset


def test_fp_reduction_with_a_weight_grid_holds_out_validation_and_sets_the_weight(tmp_path):
    data = tiny_dataset(tmp_path / "d", n_series=3, seed=4)
    cfg = tiny_config(data, heldout_fraction=0.0)
    cfg.data.val_fraction = 0.34
    cfg.fp_reduction.score_weight = 0.7  # not in the grid: must be replaced
    cfg.fp_reduction.score_weight_grid = (1.0, 0.0)
    truth = read_truth(data)
    scans = [prepare(cfg, load_raw_scan(data, u)) for u in truth.seriesuids]
    torch.manual_seed(0)
    det = build_detector(cfg).eval()
    cands = {s.seriesuid: stage1_candidates(cfg, det, s) for s in scans}
    before = {k: v.detach().clone() for k, v in det.state_dict().items()}
    fp = fit_fp_reduction(cfg, det, scans, truth, candidates=cands)
    assert cfg.fp_reduction.score_weight in (1.0, 0.0)
    assert not fp.training
    for k, v in det.state_dict().items():  # stage 1 is only read
        torch.testing.assert_close(v, before[k])
    fit, val = split_validation(scans, cfg.data.val_fraction, cfg.data.split_seed)
    assert len(val) == 1 and len(fit) == 2
    # an explicit validation list is used as given (the bench's subset runs)
    cfg.fp_reduction.score_weight_grid = (0.0,)
    fit_fp_reduction(cfg, det, fit[:1], truth, candidates=cands, val_scans=val)
    assert cfg.fp_reduction.score_weight == 0.0
