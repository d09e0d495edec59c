"""Tracking: URI resolution, fingerprints, and what every run records (real sqlite store)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from core import tracking


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("KEEL_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        tracking.resolve_tracking_uri(workdir=tmp_path)
        == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///a.db")
    assert tracking.resolve_tracking_uri() == "sqlite:///a.db"
    monkeypatch.setenv("KEEL_TRACKING_URI", "sqlite:///b.db")
    assert tracking.resolve_tracking_uri() == "sqlite:///b.db"
    assert tracking.resolve_tracking_uri("sqlite:///c.db") == "sqlite:///c.db"


def test_fingerprints_change_with_content(tmp_path):
    a = pd.DataFrame({"x": [1, 2, 3]})
    b = pd.DataFrame({"x": [1, 2, 4]})
    assert tracking.fingerprint_frame(a) == tracking.fingerprint_frame(a.copy())
    assert tracking.fingerprint_frame(a) != tracking.fingerprint_frame(b)
    f = tmp_path / "d.csv"
    f.write_text("x\n1\n")
    first = tracking.fingerprint_paths([f])
    f.write_text("x\n2\n")
    assert tracking.fingerprint_paths([f]) != first
    with pytest.raises(FileNotFoundError, match="missing data path"):
        tracking.fingerprint_paths([tmp_path / "nope"])


def test_run_records_config_hardware_commit_fingerprint(tmp_path, monkeypatch):
    monkeypatch.delenv("KEEL_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure(None, tmp_path)
    assert uri.startswith("sqlite:///") and uri.endswith("mlflow.db")
    config = {"model": {"d_model": 32, "n_layers": 2}, "lr": 0.001}
    with tracking.start_run("t", config=config, data_fingerprint="abc123") as run:
        mlflow.log_metric("val/loss", 0.5, step=1)
    got = mlflow.get_run(run.info.run_id)
    assert got.data.params["model.d_model"] == "32"
    assert got.data.params["lr"] == "0.001"
    assert got.data.tags["keel.data_fingerprint"] == "abc123"
    assert "keel.git_commit" in got.data.tags and "torch.version" in got.data.tags
    assert got.data.metrics["val/loss"] == 0.5
    # artifacts sit beside the sqlite store
    exp = mlflow.get_experiment(run.info.experiment_id)
    assert exp.artifact_location.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    art = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml")
    assert "d_model: 32" in open(art).read()
