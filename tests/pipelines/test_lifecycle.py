"""Registry lifecycle on a real sqlite MLflow store: register, promote, guard, rollback."""

from __future__ import annotations

import json

import mlflow
import numpy as np

from core import tracking
from core.examples.synthetic import COLUMNS, make_frame
from pipelines import registry
from pipelines.lifecycle import train_register_promote
from tests.pipelines.conftest import tiny_config


def test_first_model_becomes_champion_and_loads_by_alias(registered_store):
    workdir, uri, report = registered_store
    tracking.configure(uri)
    assert report.promoted and report.version == "1"
    assert registry.alias_version("keel-synthetic", "champion") == "1"
    assert report.metrics["roc_auc"] > 0.7  # the backbone learned the interactions
    model = mlflow.pyfunc.load_model("models:/keel-synthetic@champion")
    frame = make_frame(50, 123)[COLUMNS]
    frame.loc[0, "c0"] = 17  # out of range -> rejected with a reason, not scored
    out = model.predict(frame)
    assert len(out) == 50
    assert out["reject_reason"].iloc[0].startswith("c0:")
    probs = out["probability"].iloc[1:].to_numpy()
    assert np.all((probs >= 0) & (probs <= 1))
    # the run recorded config, fingerprint, protocol and a model card
    run = mlflow.get_run(report.run_id)
    assert run.data.tags["keel.data_fingerprint"]
    assert "held-out" in run.data.tags["keel.protocol"]
    card = json.loads(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=report.run_id, artifact_path="model_card.json"
            )
        ).read()
    )
    assert card["metrics"]["roc_auc"] == report.metrics["roc_auc"]
    assert card["data_fingerprint"] == run.data.tags["keel.data_fingerprint"]
    # per-epoch metrics from the Lightning logger landed in the same run
    history = mlflow.MlflowClient().get_metric_history(report.run_id, "train/loss_epoch")
    assert len(history) == 3


def test_challenger_not_promoted_without_margin_then_promote_and_rollback(registered_store):
    _, uri, first = registered_store
    tracking.configure(uri)
    second = train_register_promote(
        "core.examples.synthetic", tiny_config(seed=0), tracking_uri=uri, margin=1.0
    )
    assert not second.promoted
    assert second.champion_metrics is not None  # champion was re-evaluated on the same data
    assert registry.alias_version("keel-synthetic", "champion") == first.version
    assert registry.alias_version("keel-synthetic", "challenger") == second.version
    registry.promote("keel-synthetic", second.version)
    assert registry.alias_version("keel-synthetic", "champion") == second.version
    assert registry.rollback("keel-synthetic") == first.version
    assert registry.alias_version("keel-synthetic", "champion") == first.version
    rows = registry.show("keel-synthetic")
    assert [r["version"] for r in rows][:2] == ["1", "2"]


def test_compare_rules():
    d = registry.compare(
        {"auc": 0.80, "recall": 0.50},
        {"auc": 0.78, "recall": 0.60},
        primary="auc",
        guards={"recall": ("max", 0.05)},
    )
    assert not d.promote and any("guard recall regressed" in r for r in d.reasons)
    d = registry.compare(
        {"auc": 0.80, "recall": 0.58},
        {"auc": 0.78, "recall": 0.60},
        primary="auc",
        guards={"recall": ("max", 0.05)},
    )
    assert d.promote
    d = registry.compare(
        {"rmse": 12.0}, {"rmse": 13.0}, primary="rmse", primary_mode="min", margin=0.5
    )
    assert d.promote
    d = registry.compare(
        {"rmse": 12.8}, {"rmse": 13.0}, primary="rmse", primary_mode="min", margin=0.5
    )
    assert not d.promote
