"""End to end through the generic lifecycle: train -> register -> promote -> pyfunc predict."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from apps.medical.spec import SPEC, demo_score_input
from core.spec import load_app_spec
from tests.apps.medical.tiny import tiny_config, tiny_dataset


@pytest.mark.slow
def test_train_register_promote_then_serve(tmp_path, sqlite_store):
    from pipelines.lifecycle import train_register_promote

    data = tiny_dataset(tmp_path / "data", n_series=3, seed=9)
    cfg = tiny_config(data, heldout_fraction=0.34)
    report = train_register_promote("medical", cfg, tracking_uri=sqlite_store(tmp_path))
    assert report.promoted
    for key in ("cpm", "sensitivity_at_1fp", "sensitivity_at_4fp"):
        assert 0.0 <= report.metrics[key] <= 1.0
    assert report.metrics["n_scans"] == 1.0  # one held-out series, by series UID
    assert "LUNA16" in report.protocol and "held out" in report.protocol

    model = mlflow.pyfunc.load_model("models:/keel-medical@champion")
    inp = pd.read_csv(demo_score_input(tmp_path, cfg))
    out = model.predict(inp)
    assert set(out["series_path"]) == set(inp["series_path"])
    rejected = out[out["reject_reason"].notna()]
    assert len(rejected) == 1 and "no_such_series" in rejected.iloc[0]["series_path"]
    ok = out[out["reject_reason"].isna()]
    assert len(ok) >= 1 and ok["probability"].between(0, 1).all()


def test_spec_is_discoverable_with_the_right_metrics():
    spec = load_app_spec("medical")
    assert spec is SPEC
    assert spec.primary_metric == "cpm" and spec.primary_mode == "max"
    assert spec.guard_metrics == {"sensitivity_at_4fp": ("max", 0.02)}
    cfg = spec.demo_config()
    assert cfg.data.root == "data_samples/medical"
    assert cfg.detector.backbone.moe.n_routed_experts >= 4
    assert type(cfg).from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
