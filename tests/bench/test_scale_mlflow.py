"""bench/scale_mlflow.py: recorded teacher / distilled / scratch entries land in a real
MLflow store (sqlite) as one run each, with every model's figures side by side."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from bench import scale_mlflow as sm

RECORDED = Path(__file__).parents[2] / "bench/results/scale.json"


@pytest.fixture()
def store(tmp_path, monkeypatch, sqlite_store) -> str:
    uri = sqlite_store(tmp_path)
    monkeypatch.chdir(tmp_path)  # artifacts beside the store, nothing in the repository
    monkeypatch.setenv("KEEL_TRACKING_URI", uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_entry_metrics_name_every_model() -> None:
    details = {
        "rows": [
            {"model": "teacher", "cpm": 0.9, "active_params": 500, "crops_per_s": {"1024": 10.0}},
            {"model": "student_distilled", "cpm": 0.8, "active_params": 50, "ok": True},
            {"model": "student_scratch", "cpm": float("nan")},
        ],
        "mean_over_seeds": {"teacher_rmse": 9.5, "n_seeds": 3, "retention_sd": None},
        "teacher_over_student_active_params": 10.0,
    }
    m = sm.entry_metrics(0.889, details)
    assert m == {
        "retention": 0.889,
        "teacher/cpm": 0.9,
        "teacher/active_params": 500.0,
        "teacher/crops_per_s_b1024": 10.0,
        "student_distilled/cpm": 0.8,
        "student_distilled/active_params": 50.0,
        "mean/teacher_rmse": 9.5,
        "mean/n_seeds": 3.0,
        "teacher_over_student_active_params": 10.0,
    }  # booleans, None and NaN are not metrics
    assert sm.primary_metric(details) == ("cpm", "CPM")
    assert sm.primary_metric({"rows": [{"model": "x"}]}) is None


def test_recorded_entries_logged_side_by_side(store) -> None:
    recorded = json.loads(RECORDED.read_text())
    keys = ["medical_student_retention", "maintenance_student_retention"]
    runs = sm.log_recorded(RECORDED, keys)
    assert set(runs) == set(keys)
    client = mlflow.MlflowClient(store)
    med = client.get_run(runs["medical_student_retention"])
    entry = recorded["medical_student_retention"]
    by_model = {r["model"]: r for r in entry["details"]["rows"]}
    for model in ("teacher", "student_distilled", "student_scratch"):
        assert med.data.metrics[f"{model}/cpm"] == pytest.approx(by_model[model]["cpm"])
    assert med.data.metrics["retention"] == pytest.approx(entry["value"])
    assert med.data.params["key"] == "medical_student_retention"
    assert med.data.tags["keel.bench_key"] == "medical_student_retention"
    names = {a.path for a in client.list_artifacts(med.info.run_id)}
    assert {"scale_entry.json", "comparison.md", "comparison.png"} <= names
    table = Path(client.download_artifacts(med.info.run_id, "comparison.md")).read_text()
    assert f"| student_distilled | {by_model['student_distilled']['cpm']:.4f} |" in table

    maint = client.get_run(runs["maintenance_student_retention"])
    means = recorded["maintenance_student_retention"]["details"]["mean_over_seeds"]
    assert maint.data.metrics["mean/distilled_rmse"] == pytest.approx(means["distilled_rmse"])
    assert maint.data.metrics["mean/scratch_rmse"] == pytest.approx(means["scratch_rmse"])
    exp = client.get_experiment(med.info.experiment_id)
    assert exp.name == sm.EXPERIMENT


def test_every_distillation_key_by_default_and_unknown_keys_named(tmp_path, store) -> None:
    small = {
        "a_student_retention": {"value": 0.9, "details": {"rows": []}},
        "growth_flops_saving": {"value": 0.35, "details": {}},
    }
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(small))
    assert list(sm.log_recorded(path)) == ["a_student_retention"]
    with pytest.raises(KeyError, match="no recorded entry"):
        sm.log_recorded(path, ["b_student_retention"])


def test_an_unmeasured_model_is_shown_as_such(store, tmp_path) -> None:
    entry = {
        "value": 0.76,
        "details": {
            "rows": [
                {"model": "teacher", "cpm": 0.886},
                {"model": "student_distilled", "cpm": 0.679},
                {"model": "student_scratch", "cpm": None},
            ]
        },
    }
    assert "| student_scratch | not measured |" in sm.comparison_table("k", entry)
    run_id = sm.log_entry("partial_student_retention", entry)
    metrics = mlflow.MlflowClient(store).get_run(run_id).data.metrics
    assert "student_scratch/cpm" not in metrics and metrics["teacher/cpm"] == 0.886
