"""MaintenancePredictor: plain-file round trip, per-asset output, rejects with reasons."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from apps.maintenance.predictor import MaintenancePredictor, apply_normalizer, normalizer_state
from apps.maintenance.training import input_example


@pytest.fixture(scope="module")
def fitted(tiny_fit):
    cfg, out = tiny_fit
    frame = input_example(out.data, n_units=4, max_rows=60)
    return cfg, out, frame


def test_normalizer_state_matches_sklearn_transform(tiny_fit):
    _, out = tiny_fit
    norm = out.data.normalizer
    assert norm.n_conditions_ == 3  # KMeans conditions on the demo fleet
    state = json.loads(json.dumps(normalizer_state(norm)))  # survives plain JSON
    frame = out.data.test
    a, b = norm.transform(frame), apply_normalizer(state, frame)
    np.testing.assert_array_equal(a["condition"], b["condition"])
    cols = list(norm.kept_sensors_)
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-12, atol=1e-12)


def test_save_load_round_trip_identical(fitted, tmp_path):
    _, out, frame = fitted
    out.predictor.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.pt"]
    torch.load(tmp_path / "weights.pt", weights_only=True)  # a plain state_dict
    loaded = MaintenancePredictor.load(tmp_path)
    pd.testing.assert_frame_equal(out.predictor.predict(frame), loaded.predict(frame))
    assert loaded.policy == out.predictor.policy
    assert loaded.input_columns == out.predictor.input_columns
    assert loaded.scoring_metadata == {"group_column": "asset_id"}


def test_one_row_per_asset_at_its_last_reading(fitted):
    _, out, frame = fitted
    res = out.predictor.predict(frame)
    assets = list(pd.unique(frame["asset_id"]))
    assert res["asset_id"].tolist() == assets
    assert res["reject_reason"].isna().all()
    last = frame.groupby("asset_id", sort=False)["timestamp"].max()
    assert (res.set_index("asset_id")["last_time"] == last).all()
    traj = out.predictor.predict_trajectory(frame)
    final = traj.groupby("asset_id", sort=False).tail(1).set_index("asset_id")
    np.testing.assert_allclose(res.set_index("asset_id")["rul"], final.loc[assets, "rul"])
    assert (res.set_index("asset_id")["alarm"] == final.loc[assets, "alarm"]).all()
    # alarm_first_fired is the first firing reading, null for assets that never fired
    for a, row in res.set_index("asset_id").iterrows():
        fired = traj[(traj["asset_id"] == a) & traj["alarm"].astype(bool)]
        if len(fired):
            assert row["alarm_first_fired"] == fired["timestamp"].iloc[0]
        else:
            assert pd.isna(row["alarm_first_fired"])


def test_history_prefix_gives_the_same_prediction_as_a_causal_model(fitted):
    _, out, frame = fitted
    a = frame["asset_id"].iloc[0]
    one = frame[frame["asset_id"] == a]
    cut = one.iloc[:-10]
    full_traj = out.predictor.predict_trajectory(one)
    res = out.predictor.predict(cut)
    np.testing.assert_allclose(res["rul"].iloc[0], full_traj["rul"].iloc[len(cut) - 1], rtol=1e-5)


@pytest.mark.parametrize(
    "defect, expected",
    [
        ("nan", "NaN"),
        ("text", "not numeric"),
        ("duplicate", "appears in rows"),
        ("unsorted", "increasing time order"),
    ],
)
def test_invalid_asset_rejected_with_reason_others_scored(fitted, defect, expected):
    _, out, frame = fitted
    frame = frame.copy()
    assets = list(pd.unique(frame["asset_id"]))
    bad = assets[1]
    rows = np.flatnonzero((frame["asset_id"] == bad).to_numpy())
    if defect == "nan":
        frame.loc[rows[5], "sensor_03"] = np.nan
    elif defect == "text":
        frame["sensor_03"] = frame["sensor_03"].astype(object)
        frame.loc[rows[5], "sensor_03"] = "err"
    elif defect == "duplicate":
        frame.loc[rows[5], "timestamp"] = frame.loc[rows[4], "timestamp"]
    else:
        frame.loc[[rows[4], rows[5]], "timestamp"] = frame.loc[
            [rows[5], rows[4]], "timestamp"
        ].to_numpy()
    res = out.predictor.predict(frame).set_index("asset_id")
    assert len(res) == len(assets)
    reason = res.loc[bad, "reject_reason"]
    assert (
        isinstance(reason, str)
        and expected in reason
        and "sensor_03" in reason
        or defect
        in (
            "duplicate",
            "unsorted",
        )
    )
    assert expected in reason
    assert np.isnan(res.loc[bad, "rul"]) and pd.isna(res.loc[bad, "alarm"])
    good = res.drop(index=bad)
    assert good["reject_reason"].isna().all() and np.isfinite(good["rul"]).all()
    clean = out.predictor.predict(fitted[2]).set_index("asset_id").drop(index=bad)
    np.testing.assert_allclose(good["rul"], clean["rul"])  # other assets unaffected


def test_missing_column_is_a_clear_error(fitted):
    _, out, frame = fitted
    with pytest.raises(ValueError, match="sensor_05"):
        out.predictor.predict(frame.drop(columns="sensor_05"))
