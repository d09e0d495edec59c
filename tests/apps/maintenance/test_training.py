"""Training recipe pieces: batch sampling, best-epoch restore, the age feature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.predictor import apply_normalizer, feature_names
from apps.maintenance.training import batch_loader, split_windows
from apps.maintenance.windows import WindowSet


def _windows(n: int = 10) -> WindowSet:
    return WindowSet(
        x=np.arange(n * 4 * 2, dtype=np.float32).reshape(n, 4, 2),
        mask=np.zeros((n, 4), dtype=bool),
        rul=np.arange(n, dtype=np.float32),
        unit=np.zeros(n),
        time=np.arange(n),
        feature_names=("a", "b"),
    )


def test_batch_loader_draws_exactly_n_batches_and_covers_every_window():
    w = _windows(10)
    g = torch.Generator().manual_seed(0)
    batches = list(batch_loader(w, 4, shuffle=True, n_batches=7, generator=g))
    assert len(batches) == 7 and all(len(b["rul"]) == 4 for b in batches)
    drawn = torch.cat([b["rul"] for b in batches]).long().tolist()
    # 28 draws = 2 full permutations of the 10 windows + 8 more: each window 2 or 3 times
    counts = np.bincount(drawn, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3 and counts.sum() == 28
    b = batches[0]
    i = int(b["rul"][1])  # the window's content travels with its target
    np.testing.assert_array_equal(b["x"][1].numpy(), w.x[i])
    seq = list(batch_loader(w, 4, shuffle=False))
    assert [len(s["rul"]) for s in seq] == [4, 4, 2]
    assert torch.cat([s["rul"] for s in seq]).tolist() == list(range(10))


def test_restore_best_keeps_the_lowest_validation_rmse_epoch(tiny_fit):
    cfg, out = tiny_fit
    hist = out.val_rmse_history
    assert len(hist) == cfg.trainer.max_epochs and cfg.restore_best
    assert out.best_epoch == int(np.argmin(hist))
    model = out.predictor.model
    w = split_windows(out.predictor, out.data.policy, cfg.window)
    pred, _ = model.predict_windows(w.x, w.mask)
    val_rmse = float(np.sqrt(np.mean((pred - np.minimum(w.rul, cfg.rul_cap)) ** 2)))
    assert val_rmse == pytest.approx(min(hist), rel=1e-4)
    assert pred.min() >= 0.0 and pred.max() <= cfg.rul_cap  # clamped to the target's range


def test_age_feature_counts_readings_per_unit_causally(tiny_fit):
    _, out = tiny_fit
    state = out.predictor.normalizer
    assert state["age_feature"] and feature_names(state)[-1] == "age"
    frame = out.data.test
    parts = [g.iloc[::-1] for _, g in frame.groupby("unit")]  # shuffled row order
    shuffled = pd.concat(parts[::-1], ignore_index=True)
    got = apply_normalizer(state, shuffled)
    for _, g in got.groupby("unit"):
        g = g.sort_values("time")
        expect = np.arange(len(g)) / state["age_scale"]
        np.testing.assert_allclose(g["age"].to_numpy(), expect)
    # a prefix of a unit sees the same ages (nothing from the future)
    u0 = frame["unit"].iloc[0]
    g0 = frame[frame["unit"] == u0]
    short = apply_normalizer(state, g0.iloc[:5])
    np.testing.assert_allclose(short["age"].to_numpy(), np.arange(5) / state["age_scale"])
    with pytest.raises(MaintenanceDataError, match="age feature"):
        apply_normalizer(state, g0.drop(columns=["time"]))
