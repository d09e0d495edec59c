"""``keel <app> distill``: registered teacher -> smaller student -> registered challenger.

Real sqlite MLflow store in tmp_path, real maintenance app on the demo fleet (tiny sizes).
"""

from __future__ import annotations

import mlflow
import pytest
import torch

from apps.maintenance.config import demo_config
from core.distill import count_active_params
from pipelines.cli import build_parser, main

torch.set_num_threads(1)


def _write_cfg(path, d_model: int, n_layers: int, epochs: int) -> str:
    cfg = demo_config()
    cfg.model.d_model = d_model
    cfg.model.ffn_hidden = 2 * d_model
    cfg.model.n_layers = n_layers
    cfg.model.n_dense_layers = n_layers
    cfg.model.moe = None
    cfg.model.attention.n_heads = 2
    cfg.trainer.max_epochs = epochs
    cfg.alarm.horizons = (36.0, 48.0)
    cfg.alarm.ks = (1, 3)
    cfg.to_yaml(path)
    return str(path)


def test_parser_has_distill_for_every_app() -> None:
    args = build_parser().parse_args(
        ["maintenance", "distill", "--teacher", "models:/x@champion", "--alpha", "0"]
    )
    assert args.action == "distill" and args.alpha == 0.0 and args.config is None


@pytest.mark.slow
def test_distill_registers_smaller_student_as_challenger(tmp_path, capsys, sqlite_store) -> None:
    uri = sqlite_store(tmp_path)
    teacher_yaml = _write_cfg(tmp_path / "teacher.yaml", d_model=32, n_layers=2, epochs=2)
    student_yaml = _write_cfg(tmp_path / "student.yaml", d_model=16, n_layers=1, epochs=1)
    dyaml = tmp_path / "distill.yaml"
    dyaml.write_text("alpha: 0.8\ntemperature: 3.0\n")
    assert main(["--tracking-uri", uri, "maintenance", "train", "--config", teacher_yaml]) == 0
    code = main(
        [
            "--tracking-uri",
            uri,
            "maintenance",
            "distill",
            "--config",
            student_yaml,
            "--distill-config",
            str(dyaml),
            "--alpha",
            "0.9",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "challenger, distilled from models:/keel-maintenance@champion" in out
    client = mlflow.MlflowClient()
    champ = client.get_model_version_by_alias("keel-maintenance", "champion")
    chall = client.get_model_version_by_alias("keel-maintenance", "challenger")
    assert (str(champ.version), str(chall.version)) == ("1", "2")  # the student is not promoted
    assert chall.tags["keel.distilled_from"] == "models:/keel-maintenance@champion"
    run = client.get_run(chall.run_id)
    assert float(run.data.params["distill.alpha"]) == 0.9  # CLI flag beats the YAML
    assert float(run.data.params["distill.temperature"]) == 3.0
    assert run.data.metrics["rmse_capped"] > 0
    load = lambda a: mlflow.pyfunc.load_model(f"models:/keel-maintenance@{a}")  # noqa: E731
    teacher = load("champion").unwrap_python_model().predictor.model
    student = load("challenger").unwrap_python_model().predictor.model
    assert count_active_params(student) * 4 < count_active_params(teacher)


@pytest.mark.slow
def test_fraud_mlp_student_is_registered_and_scores_through_pyfunc(
    tmp_path, capsys, sqlite_store
) -> None:
    """``student: {kind: mlp}`` + the shipped ``mlp_distill.yaml``: the CPU scorer becomes a
    registered challenger whose pyfunc model scores raw rows with the student alone."""
    from apps.fraud.config import config_path
    from apps.fraud.fastscore import StudentMLP
    from tests.apps.fraud.fraud_model_helpers import tiny_config

    uri = sqlite_store(tmp_path)
    cfg = tiny_config(tmp_path)
    cfg.trainer.max_epochs = 1
    cfg.baseline.n_estimators = 20
    cfg.to_yaml(tmp_path / "teacher.yaml")
    cfg.student.kind, cfg.student.batch_size = "mlp", 256
    cfg.to_yaml(tmp_path / "student.yaml")
    base = ["--tracking-uri", uri, "fraud"]
    assert main([*base, "train", "--config", str(tmp_path / "teacher.yaml")]) == 0
    distill_yaml = str(config_path("mlp_distill"))
    argv = [*base, "distill", "--config", str(tmp_path / "student.yaml")]
    assert main([*argv, "--distill-config", distill_yaml]) == 0
    assert "MLP student [64, 32]" in capsys.readouterr().out
    client = mlflow.MlflowClient()
    chall = client.get_model_version_by_alias("keel-fraud", "challenger")
    run = client.get_run(chall.run_id)
    assert run.data.params["distill.kind"] == "regression"
    assert float(run.data.params["distill.alpha"]) == 1.0
    model = mlflow.pyfunc.load_model("models:/keel-fraud@challenger")
    predictor = model.unwrap_python_model().predictor
    assert predictor.model is None and isinstance(predictor.student, StudentMLP)
    from apps.fraud.readers import load_transactions
    from apps.fraud.spec import id_columns_as_float  # the registered signature's id dtype

    raw = load_transactions(cfg.data_path, predictor.schema).to_pandas()
    frame = id_columns_as_float(raw[predictor.input_columns].tail(200), predictor.schema)
    scored = model.predict(frame)
    assert len(scored) == 200 and scored["score"].between(0, 1).all()
    assert (scored["decision"] == (scored["score"] >= predictor.threshold)).all()
