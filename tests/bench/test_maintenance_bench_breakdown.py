"""bench.maintenance_bench's test-error breakdown on a hand-computed case."""

from __future__ import annotations

import pytest

from bench.maintenance_bench import last_cycle_error_breakdown as breakdown


def _run(pred, true, n_readings):
    return {
        "test_last_cycle": {"rul_pred": pred, "rul_true": true, "n_readings": n_readings},
        "rul_cap": 125.0,
        "window": 60,
    }


def test_bands_pool_runs_cap_the_truth_and_share_the_squared_error() -> None:
    # errors: +2 (truth 10), -4 (truth 60), +6 (truth 200 -> capped 125), +2 (truth 10, run 2)
    runs = [
        _run([12.0, 56.0, 131.0], [10.0, 60.0, 200.0], [40, 100, 70]),
        _run([12.0], [10.0], [30]),
    ]
    out = breakdown(runs)
    total = 4 + 16 + 36 + 4
    low = out["truth 0-25"]
    assert low["units"] == 2 and low["rmse"] == pytest.approx(2.0)
    assert low["mean_error"] == pytest.approx(2.0)
    assert low["share_of_squared_error"] == pytest.approx(8 / total)
    assert out["truth 50-75"]["mean_error"] == pytest.approx(-4.0)
    assert out["truth at the cap (125)"]["rmse"] == pytest.approx(6.0)
    assert "truth 25-50" not in out  # empty bands are left out
    short = out["<= 60 readings"]
    assert short["units"] == 2 and short["share_of_squared_error"] == pytest.approx(8 / total)
    bands = [v for k, v in out.items() if k.startswith("truth")]
    assert sum(b["share_of_squared_error"] for b in bands) == pytest.approx(1.0)
