"""bench/medical_fp_bench.py end to end on tiny phantoms: cache, stage 2, fused FROC."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch

from bench import medical_fp_bench, scale_bench


@pytest.mark.slow
def test_two_stage_bench_records_the_validation_chosen_weight(tmp_path, monkeypatch) -> None:
    from apps.medical.predictor import NoduleDetector, build_detector

    args = scale_bench.parse_args(
        ["--device", "cpu", "--tiny", "--no-record", "--medical-data", str(tmp_path / "npz")]
    )
    root = scale_bench.medical_data(args)
    cfg, _ = scale_bench.medical_configs(args, root)
    cfg.fp_reduction.enabled = False
    cfg.data.val_fraction = 0.5
    torch.manual_seed(0)
    NoduleDetector(cfg, build_detector(cfg), None).save(tmp_path / "stage1")
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path / "results"))
    argv = ["medical_fp_bench", "--data", str(root), "--model-dir", str(tmp_path / "stage1")]
    argv += ["--cache", str(tmp_path / "cache"), "--epochs", "1", "--grid", "1", "0"]
    argv += ["--out-model", str(tmp_path / "two_stage"), "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    medical_fp_bench.main()

    res = json.loads((tmp_path / "results" / "medical.json").read_text())
    d = res["synthetic_sens_at_4fp_two_stage"]["details"]
    w = d["score_weight_chosen_on_validation"]
    assert w in (1.0, 0.0)
    assert d["heldout_by_weight"][f"{w:g}"]["cpm"] == d["cpm"]
    assert res["synthetic_cpm_two_stage"]["value"] == d["cpm"]
    n = (d["n_fit_series_stage2"], d["n_validation_series"], d["n_heldout_series"])
    assert sum(n) == 4 and min(n) >= 1
    # every series' stage-1 candidates were cached once, and the saved model has both stages
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 4
    saved = NoduleDetector.load(tmp_path / "two_stage")
    assert saved.fp_model is not None and saved.config.fp_reduction.score_weight == w
    # w = 0 is stage 1 alone: its held-out FROC is that of the cached candidates
    from apps.medical.data import read_truth, split_series

    truth = read_truth(root)
    _, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    frames = [pd.read_parquet(tmp_path / "cache" / f"{u}.parquet") for u in held]
    stage1 = medical_fp_bench.froc_of(frames, truth, list(held))
    assert d["heldout_by_weight"]["0"] == stage1
