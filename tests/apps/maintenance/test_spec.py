"""The maintenance AppSpec end to end: protocol checks, MLflow lifecycle, pyfunc, batch scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.config import MaintenanceConfig, load_config
from apps.maintenance.metrics import trajectory_frame
from apps.maintenance.training import choose_policy, fit, split_windows, time_unit_of
from tests.apps.maintenance.conftest import tiny_config


def test_splits_are_disjoint_units(tiny_fit):
    _, out = tiny_fit
    d = out.data
    sets = [set(f["unit"]) for f in (d.train, d.policy, d.lead, d.test)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sets[i] & sets[j]
    assert all(sets)


def test_alarm_policy_chosen_on_validation_units_only(tiny_fit):
    cfg, out = tiny_fit
    pred, d = out.predictor, out.data
    w = split_windows(pred, d.policy, cfg.window)
    traj = trajectory_frame(w, pred.model.predict_windows(w.x, w.mask)[0])
    policy, _, _ = choose_policy(traj, cfg, time_unit_of(d))
    assert policy == pred.policy
    # grid rows were scored on the policy units (their count of healthy steps), not on others
    assert set(out.selector.grid_["horizon"]) == set(cfg.alarm.horizons)
    # the same fit with the test and lead-time units replaced by garbage picks the same policy
    rng = np.random.default_rng(1)
    d2 = type(d)(**{**d.__dict__})
    for name in ("test", "lead"):
        f = getattr(d, name).copy()
        cols = list(d.schema.sensor_columns)
        f[cols] = rng.normal(size=(len(f), len(cols))) * 50
        setattr(d2, name, f)
    out2 = fit(cfg, data=d2)
    assert out2.predictor.policy == pred.policy


def test_one_prediction_per_test_unit_at_last_cycle(tiny_fit):
    from apps.maintenance.training import evaluate_prepared

    cfg, out = tiny_fit
    ev = evaluate_prepared(out.predictor, out.data, cfg, figures=True)
    last = ev.tables["test_last_cycle"]
    test = out.data.test
    assert len(last) == test["unit"].nunique() == ev.metrics["n_test_units"]
    assert last["unit"].is_unique
    truth = test.groupby("unit")["rul_uncapped"].last()
    np.testing.assert_array_equal(last.set_index("unit")["rul_true"], truth.loc[last["unit"]])
    for key in (
        "rmse_capped",
        "phm08_capped",
        "rmse_uncapped",
        "phm08_uncapped",
        "lead_detection_rate",
        "lead_time_median",
        "lead_time_p10",
        "false_alarms_per_1000_healthy",
        "alpha_lambda_accuracy",
        "ph_mean",
    ):
        assert key in ev.metrics and np.isfinite(ev.metrics[key])
    assert "one prediction per test unit at its last observed cycle" in ev.protocol
    assert "in h" in ev.protocol  # timestamped fleet: lead times in hours
    assert set(ev.figures) == {"rul_trajectories_lead_units", "lead_time_distribution"}
    # missed failures are kept as lead 0, never dropped
    assert len(ev.tables["lead_per_unit"]) == out.data.lead["unit"].nunique()


def test_configs_round_trip_and_cmapss_copy_trains():
    for name in ("demo", "fd001", "fd002", "fd003", "fd004"):
        cfg = load_config(name)
        assert MaintenanceConfig.from_dict(cfg.to_dict()) == cfg
    cfg = tiny_config(max_epochs=1)
    cfg.data.kind, cfg.data.subset = "cmapss", "SYN"
    cfg.data.data_dir = "data_samples/maintenance/cmapss"
    cfg.alarm.false_alarm_budget = 1000.0
    from apps.maintenance.spec import train

    res = train(cfg)
    assert res.evaluation.metrics["n_test_units"] == 7
    assert list(res.input_example.columns[:2]) == ["unit", "cycle"]


@pytest.mark.slow
def test_lifecycle_pyfunc_and_batch_scoring(tmp_path, monkeypatch, sqlite_store):
    import mlflow

    from apps.maintenance.spec import SPEC, demo_score_input
    from pipelines.lifecycle import train_register_promote
    from pipelines.score import score

    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path)
    cfg = tiny_config(max_epochs=2)
    report = train_register_promote("maintenance", cfg, tracking_uri=uri)
    assert report.promoted and np.isfinite(report.metrics["rmse_capped"])
    assert SPEC.primary_metric in report.metrics
    model = mlflow.pyfunc.load_model("models:/keel-maintenance@champion")
    path = demo_score_input(tmp_path, cfg)
    frame = pd.read_parquet(path)
    n_assets = frame["asset_id"].nunique()
    good = frame[frame["asset_id"] != frame["asset_id"].unique()[1]]
    out = model.predict(good)
    assert len(out) == n_assets - 1 and out["reject_reason"].isna().all()
    rep = score(
        "models:/keel-maintenance@champion",
        path,
        tmp_path / "scored.parquet",
        chunk_rows=200,
        progress=False,
        log_to_mlflow=False,
    )
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    rejects = pd.read_parquet(tmp_path / "scored.rejects.parquet")
    assert rep.rows_rejected == 1 and len(rejects) == 1
    assert "NaN" in rejects["reject_reason"].iloc[0]
    assert len(scored) == n_assets - 1 and scored["asset_id"].is_unique
