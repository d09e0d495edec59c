"""The fraud app end to end through the generic pipelines: train, register, promote,
reload by alias, batch score."""

from __future__ import annotations

import mlflow
import pandas as pd

from apps.fraud.spec import SPEC, demo_score_input
from pipelines.lifecycle import train_register_promote
from pipelines.score import score
from tests.apps.fraud.fraud_model_helpers import tiny_config


def test_train_register_promote_load_and_score(tmp_path, sqlite_store):
    cfg = tiny_config(tmp_path)
    cfg.trainer.max_epochs = 1
    cfg.baseline.n_estimators = 30
    uri = sqlite_store(tmp_path)
    rep = train_register_promote("fraud", cfg, tracking_uri=uri)
    assert rep.promoted and rep.metrics["pr_auc"] > rep.metrics["fraud_rate"]
    run = mlflow.get_run(rep.run_id)
    assert "baseline/pr_auc" in run.data.metrics and "pr_auc" in run.data.metrics
    model = mlflow.pyfunc.load_model("models:/keel-fraud@champion")
    sample = demo_score_input(tmp_path / "in", cfg)
    frame = pd.read_parquet(sample)
    res = model.predict(frame)
    assert len(res) == len(frame) and res["reject_reason"].notna().sum() == 3
    report = score("models:/keel-fraud@champion", sample, tmp_path / "out.parquet", progress=False)
    assert report.rows_rejected == 3 and report.rows_out == len(frame) - 3
    scored = pd.read_parquet(tmp_path / "out.parquet")
    assert {"score", "decision", "reasons"} <= set(scored.columns)
    assert scored["score"].between(0, 1).all()
    card = mlflow.artifacts.load_dict(f"runs:/{rep.run_id}/model_card.json")
    assert card["thresholds"]["alert"] > 0
    assert (
        SPEC.evaluate(model.unwrap_python_model().predictor, cfg).metrics["pr_auc"]
        == (rep.metrics["pr_auc"])
    )
