"""Dataset folder -> prepared training scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apps.medical.data import (
    load_prepared,
    load_raw_scan,
    preparation_device,
    prepare,
    read_truth,
    split_series,
)
from tests.apps.medical.tiny import tiny_config


def test_load_prepared_equals_preparing_each_series_in_order():
    cfg = tiny_config()
    root = Path(cfg.data.root)
    truth = read_truth(root)
    train, _ = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    uids = train[:2]
    assert preparation_device() == ("cuda" if torch.cuda.is_available() else None)
    got = load_prepared(cfg, root, uids, device=None)  # the scipy path
    assert [s.seriesuid for s in got] == uids
    for scan, uid in zip(got, uids, strict=True):
        ref = prepare(cfg, load_raw_scan(root, uid))
        np.testing.assert_array_equal(scan.image, ref.image)
        np.testing.assert_array_equal(scan.lung, ref.lung)
        assert 0.02 < scan.lung.mean() < 0.9  # a lung field, neither empty nor everything
    # the torch path (what a GPU run takes), on the CPU: same grid and lung set
    torch_path = load_prepared(cfg, root, uids[:1], device="cpu")[0]
    assert torch_path.image.shape == got[0].image.shape
    np.testing.assert_allclose(torch_path.image, got[0].image, atol=1e-4)
    assert (torch_path.lung != got[0].lung).mean() < 1e-3
