"""``keel maintenance train`` with ``trainer.strategy: fsdp2`` on two CPU processes (gloo).

The real CLI, the real Lightning launcher (it re-runs the command for rank 1), a real sqlite
MLflow store: rank 1 trains its share of every step and leaves logging and the registry to
rank 0, so the run and the registered version exist once, and the registered model is a
plain single-device model that scores. Then ``keel maintenance distill`` on two processes,
with that champion as the teacher, registers exactly one smaller plain challenger.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from apps.maintenance.config import demo_config
from core import tracking
from core.sharding import is_sharded

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")


def _fsdp2_config(path, d_model: int, n_layers: int, epochs: int) -> str:
    """A tiny demo-fleet maintenance config trained with fsdp2 on 2 CPU processes."""
    cfg = demo_config()
    cfg.model.d_model, cfg.model.ffn_hidden, cfg.model.n_layers = d_model, 2 * d_model, n_layers
    cfg.model.attention.n_heads = 2
    cfg.ensemble_size = 1
    cfg.trainer.max_epochs = epochs
    cfg.alarm.horizons, cfg.alarm.ks = (36.0, 48.0), (1, 3)
    cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.accelerator = "fsdp2", 2, "cpu"
    cfg.to_yaml(path)
    return str(path)


def _keel_on_two_processes(uri: str, action: str, config: str) -> subprocess.CompletedProcess:
    """``keel maintenance <action> --config <config>``: Lightning launches rank 1 itself."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("PL_")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "pipelines.cli", "--tracking-uri", uri]
    cmd += ["maintenance", action, "--config", config]
    proc = subprocess.run(
        cmd, env=env, cwd=os.getcwd(), capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    return proc


@pytest.mark.slow
def test_two_process_fsdp2_train_registers_one_plain_model(tmp_path, sqlite_store):
    uri = sqlite_store(tmp_path)
    teacher_yaml = _fsdp2_config(tmp_path / "cfg.yaml", d_model=32, n_layers=2, epochs=2)
    proc = _keel_on_two_processes(uri, "train", teacher_yaml)
    assert proc.stdout.count("keel-maintenance v1 (champion)") == 1  # rank 1 printed nothing

    tracking.configure(uri)  # tracking and registry: an earlier test may have moved either
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs["tags.mlflow.runName"].tolist() == ["maintenance-train"]
    versions = mlflow.MlflowClient().search_model_versions("name='keel-maintenance'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == runs["run_id"].iloc[0]
    assert runs["metrics.rmse_capped"].iloc[0] > 0

    model = mlflow.pyfunc.load_model("models:/keel-maintenance@champion")
    predictor = model.unwrap_python_model().predictor
    assert not is_sharded(predictor.model)
    readings = pd.read_parquet("data_samples/maintenance/fleet_sensors.parquet")
    one_unit = readings[readings["asset_id"] == readings["asset_id"].iloc[0]]
    scores = model.predict(one_unit)
    assert len(scores) > 0 and scores.filter(like="rul").notna().all().all()

    # the champion is the teacher of a 2-process fsdp2 distillation: one challenger
    student_yaml = _fsdp2_config(tmp_path / "student.yaml", d_model=16, n_layers=1, epochs=1)
    proc = _keel_on_two_processes(uri, "distill", student_yaml)
    assert proc.stdout.count("(challenger, distilled from models:/keel-maintenance@champion)") == 1
    tracking.configure(uri)
    versions = mlflow.MlflowClient().search_model_versions("name='keel-maintenance'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    runs = mlflow.search_runs(search_all_experiments=True)
    assert sorted(runs["tags.mlflow.runName"]) == ["maintenance-distill", "maintenance-train"]
    model = mlflow.pyfunc.load_model("models:/keel-maintenance/2")
    distilled = model.unwrap_python_model().predictor
    assert not is_sharded(distilled.model)
    n_student = sum(p.numel() for p in distilled.model.parameters())
    assert n_student < sum(p.numel() for p in predictor.model.parameters())
    scores = model.predict(one_unit)
    assert len(scores) > 0 and scores.filter(like="rul").notna().all().all()
