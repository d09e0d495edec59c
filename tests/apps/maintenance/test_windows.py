"""Causal windows: exact contents, padding mask, causality, last-cycle windows, patch masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.windows import build_windows, patch_padding_mask
from core.adapters import PatchEmbed1d


def _fleet(
    rng: np.random.Generator, lengths: tuple[int, ...] = (3, 6, 9), n_features: int = 2
) -> pd.DataFrame:
    parts = []
    for u, n in enumerate(lengths, start=1):
        parts.append(
            pd.DataFrame(
                {
                    "unit": u,
                    "cycle": np.arange(1, n + 1),
                    **{f"f{j}": rng.normal(size=n) for j in range(n_features)},
                    "rul": np.arange(n - 1, -1, -1, dtype=float),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _naive(frame: pd.DataFrame, cols: list[str], w: int) -> tuple[np.ndarray, np.ndarray]:
    xs, masks = [], []
    for _, g in frame.sort_values(["unit", "cycle"]).groupby("unit"):
        v = g[cols].to_numpy(np.float32)
        for i in range(len(g)):
            hist = v[max(0, i - w + 1) : i + 1]
            pad = w - len(hist)
            xs.append(np.vstack([np.zeros((pad, len(cols)), np.float32), hist]))
            masks.append(np.r_[np.ones(pad, bool), np.zeros(len(hist), bool)])
    return np.stack(xs), np.stack(masks)


def test_windows_match_a_naive_loop_and_are_left_padded() -> None:
    frame = _fleet(np.random.default_rng(0))
    ws = build_windows(frame, ["f0", "f1"], window=4)
    x_ref, m_ref = _naive(frame, ["f0", "f1"], 4)
    assert ws.x.shape == (18, 4, 2) and ws.mask.shape == (18, 4) and ws.x.dtype == np.float32
    np.testing.assert_array_equal(ws.x, x_ref)
    np.testing.assert_array_equal(ws.mask, m_ref)
    # unit 1 (3 readings): first window has 3 padded steps, then 2, then 1
    assert ws.mask[:3].sum(axis=1).tolist() == [3, 2, 1]
    np.testing.assert_array_equal(ws.rul, frame["rul"].to_numpy(np.float32))
    assert (
        ws.unit.tolist() == frame["unit"].tolist() and ws.time.tolist() == frame["cycle"].tolist()
    )


def test_window_at_t_ignores_everything_after_t() -> None:
    rng = np.random.default_rng(1)
    frame = _fleet(rng, lengths=(12, 7))
    base = build_windows(frame, ["f0", "f1"], window=5)
    for t in range(1, 12):
        changed = frame.copy()
        later = (changed["unit"] == 1) & (changed["cycle"] > t)
        changed.loc[later, ["f0", "f1"]] = rng.normal(100.0, 5.0, (int(later.sum()), 2))
        ws = build_windows(changed, ["f0", "f1"], window=5)
        upto = (ws.unit == 1) & (ws.time <= t)
        np.testing.assert_array_equal(ws.x[upto], base.x[upto])
        np.testing.assert_array_equal(ws.mask[upto], base.mask[upto])
        assert not np.array_equal(
            ws.x[(ws.unit == 1) & (ws.time == t + 1)],
            base.x[(base.unit == 1) & (base.time == t + 1)],
        )
    # another unit's readings never leak into a window either
    other = frame.copy()
    other.loc[other["unit"] == 2, "f0"] = 1e6
    np.testing.assert_array_equal(
        build_windows(other, ["f0"], 5).x[:12], build_windows(frame, ["f0"], 5).x[:12]
    )


def test_row_order_does_not_matter_and_last_only_gives_test_windows() -> None:
    frame = _fleet(np.random.default_rng(2))
    shuffled = frame.sample(frac=1.0, random_state=0)
    a, b = build_windows(frame, ["f0"], 3), build_windows(shuffled, ["f0"], 3)
    np.testing.assert_array_equal(a.x, b.x)
    last = build_windows(shuffled, ["f0", "f1"], 4, last_only=True)
    full = build_windows(frame, ["f0", "f1"], 4)
    ends = np.flatnonzero(np.r_[full.unit[1:] != full.unit[:-1], True])
    assert last.unit.tolist() == [1, 2, 3] and last.time.tolist() == [3, 6, 9]
    np.testing.assert_array_equal(last.x, full.x[ends])
    np.testing.assert_array_equal(last.rul, [0.0, 0.0, 0.0])


def test_stride_keeps_each_units_last_window() -> None:
    frame = _fleet(np.random.default_rng(3))
    ws = build_windows(frame, ["f0"], 4, stride=3)
    assert ws.time[ws.unit == 3].tolist() == [3, 6, 9]
    assert ws.time[ws.unit == 2].tolist() == [3, 6]
    assert ws.time[ws.unit == 1].tolist() == [3]


def test_bad_input_is_named() -> None:
    frame = _fleet(np.random.default_rng(4))
    dup = pd.concat([frame, frame.iloc[[4]]])
    with pytest.raises(MaintenanceDataError, match="unit 2 has two readings at time 2"):
        build_windows(dup, ["f0"], 3)
    nan = frame.copy()
    nan.loc[5, "f1"] = np.nan
    with pytest.raises(MaintenanceDataError, match="column 'f1', unit 2, time 3: non-finite"):
        build_windows(nan, ["f0", "f1"], 3)
    with pytest.raises(MaintenanceDataError, match=r"missing column\(s\) \['zz'\]"):
        build_windows(frame, ["zz"], 3)


@pytest.mark.parametrize("window", [8, 10])
def test_patch_mask_matches_core_patch_embed(window: int) -> None:
    frame = _fleet(np.random.default_rng(5), lengths=(2, 5, 12), n_features=3)
    ws = build_windows(frame, ["f0", "f1", "f2"], window)
    embed = PatchEmbed1d(n_channels=3, patch_len=4, d_model=8, cls_token=True)
    tokens, token_pad = embed.forward_with_mask(torch.from_numpy(ws.x), torch.from_numpy(ws.mask))
    ours = patch_padding_mask(ws.mask, patch_len=4, cls_token=True)
    assert tokens.shape[:2] == ours.shape
    np.testing.assert_array_equal(token_pad.numpy(), ours)
    # first window of unit 1 has one real step: only the last patch (and CLS) is not padding
    assert ours[0].tolist() == [False] + [True] * (ours.shape[1] - 2) + [False]
