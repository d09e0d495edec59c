"""The analyst notebooks run top to bottom against a real registry and report true numbers.

Each app gets a tiny champion in a real sqlite MLflow store, trained, registered and
promoted by ``pipelines.lifecycle.train_register_promote`` (the code path of ``make demo``)
with the app's demo config shrunk. Each notebook then runs in a real Jupyter kernel of this
interpreter (nbclient), pointed at that store through ``KEEL_TRACKING_URI``; its last cell
writes a JSON summary to ``KEEL_NOTEBOOK_OUT``, which is checked against the sample data
and against the metrics the lifecycle logged for the champion.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SAMPLES = ROOT / "data_samples"
KERNEL = "keel-notebook-test"


# ----------------------------------------------------------------------------- tiny champions
def tiny_fraud() -> Any:
    """The fraud demo config (sample file, demo protocol) with a small model (d16, the card's
    last 4 transactions), 1 epoch."""
    from core.spec import load_app_spec

    cfg = load_app_spec("fraud").demo_config()
    cfg.model.d_model = 16
    cfg.model.ffn_hidden = 32
    cfg.model.moe.expert_hidden = 16
    cfg.head.history_len = 4
    cfg.trainer.max_epochs = 1
    cfg.baseline.n_estimators = 30
    return cfg


def tiny_maintenance() -> Any:
    """The maintenance demo config (sample fleet, same unit split) with 2 epochs."""
    from core.spec import load_app_spec

    cfg = load_app_spec("maintenance").demo_config()
    cfg.trainer.max_epochs = 2
    return cfg


def tiny_medical() -> Any:
    """The medical demo config (the 3 sample series, none held out) at 8 mm with tiny stages."""
    from apps.medical.config import MedicalConfig
    from core.spec import load_app_spec

    d = load_app_spec("medical").demo_config().to_dict()
    backbone = {
        "d_model": 24,
        "n_layers": 2,
        "ffn_hidden": 32,
        "moe": {"n_routed_experts": 4, "top_k": 2, "n_shared_experts": 1, "expert_hidden": 16},
    }
    d["spacing_zyx"] = [8.0, 8.0, 8.0]
    d["detector"].update(
        crop_zyx=[16, 16, 16],
        stride_zyx=[16, 16, 16],
        crops_per_nodule=2,
        neg_crops_per_scan=2,
        batch_size=4,
        max_candidates=10,
    )
    d["detector"]["backbone"].update(backbone)
    d["detector"]["backbone"]["attention"]["top_k"] = 4
    d["detector"]["trainer"]["max_epochs"] = 1
    d["fp_reduction"].update(
        crop_zyx=[4, 4, 4], crops_per_nodule=1, random_neg_per_scan=2, max_hard_neg_per_scan=3
    )
    d["fp_reduction"]["backbone"].update(backbone)
    d["fp_reduction"]["trainer"]["max_epochs"] = 1
    return MedicalConfig.from_dict(d)


TINY = {"fraud": tiny_fraud, "maintenance": tiny_maintenance, "medical": tiny_medical}


@contextlib.contextmanager
def mlflow_uris_restored() -> Iterator[None]:
    """``tracking.configure`` sets MLflow's global URIs and their environment variables;
    put them back so later test modules do not write into this module's store."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: os.environ.get(k) for k in keys}
    tracking_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(env["MLFLOW_REGISTRY_URI"])
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Store:
    """A real sqlite MLflow store; ``champion(app)`` trains + registers + promotes on demand."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.reports: dict[str, Any] = {}

    def champion(self, app: str) -> Any:
        if app not in self.reports:
            from pipelines.lifecycle import train_register_promote

            with mlflow_uris_restored():
                report = train_register_promote(app, TINY[app](), tracking_uri=self.uri)
            assert report.promoted, report.reasons  # the first version of a fresh store
            self.reports[app] = report
        return self.reports[app]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, sqlite_store) -> Store:
    return Store(sqlite_store(tmp_path_factory.mktemp("notebook_store")))


@pytest.fixture(scope="module")
def jupyter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernelspec that runs THIS interpreter (the venv's), whatever other kernelspecs
    the machine has: a fresh clone needs no manual ``ipykernel install``."""
    folder = tmp_path_factory.mktemp("jupyter")
    spec_dir = folder / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Keel test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return folder


def run_notebook(
    name: str, store: Store, jupyter_dir: Path, out_dir: Path
) -> tuple[dict[str, Any], Any]:
    """Execute ``notebooks/<name>.ipynb`` as Jupyter would (cwd = notebooks/); returns the
    summary it wrote and the executed notebook. A failing cell raises here."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{name}.ipynb is committed with outputs; clear them"
    )
    out = out_dir / f"{name}.json"
    env = {
        **os.environ,
        "KEEL_TRACKING_URI": store.uri,
        "KEEL_NOTEBOOK_OUT": str(out),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # shared CI cores; tiny models gain nothing from threads
        "MKL_NUM_THREADS": "1",
    }
    env.pop("KEEL_NOTEBOOK_MODEL", None)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    with mock.patch.dict(os.environ, {"JUPYTER_PATH": str(jupyter_dir)}):
        client.execute(env=env)
    return json.loads(out.read_text()), nb


def png_outputs(nb: Any) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )


# ----------------------------------------------------------------------------- the notebooks
@pytest.mark.slow
def test_fraud_notebook_scores_the_last_week(store, jupyter_dir, tmp_path):
    rep = store.champion("fraud")
    summary, nb = run_notebook("fraud", store, jupyter_dir, tmp_path)

    tx = pd.read_parquet(SAMPLES / "fraud" / "transactions.parquet")
    start = tx["TX_DATETIME"].max().normalize() - pd.Timedelta(days=6)
    week = tx[tx["TX_DATETIME"] >= start]
    assert summary["model"] == "keel-fraud" and summary["version"] == int(rep.version)
    assert summary["week_start"] == f"{start:%Y-%m-%d}"
    assert summary["rows_in"] == summary["rows_out"] == len(week) > 1000
    assert summary["rows_scored"] == len(week) and summary["rows_rejected"] == 0
    assert 0.0 <= summary["score_min"] <= summary["score_max"] <= 1.0
    assert summary["threshold"] == pytest.approx(rep.metrics["threshold"])

    m = summary["metrics"]
    frauds = int(week["TX_FRAUD"].sum())
    assert m["n"] == len(week) and m["fraud_rate"] == pytest.approx(frauds / len(week))
    assert 0.0 < m["pr_auc"] <= 1.0 and 0.0 <= m["roc_auc"] <= 1.0
    # the decisions and the operating-point metrics describe the same alerts
    assert summary["n_alerts"] > 0
    true_alerts = m["precision_at_threshold"] * summary["n_alerts"]
    assert true_alerts == pytest.approx(m["recall_at_threshold"] * frauds)
    assert m["alerts_per_day"] == pytest.approx(summary["n_alerts"] / 7)

    reasons = summary["alert_reasons"]
    assert len(reasons) == min(4, summary["n_alerts"])
    assert set(map(int, reasons)) <= set(week["TRANSACTION_ID"])
    for contrib in reasons.values():
        assert len(contrib) == 3 and all(np.isfinite(v) for v in contrib.values())
    figs = summary["figures"]
    assert figs["pr_curve"]["axes"] == 1 and figs["pr_curve"]["artists"] >= 2
    assert figs["alert_reasons"]["axes"] == len(reasons)
    assert png_outputs(nb) == 2


@pytest.mark.slow
def test_medical_notebook_reproduces_the_registered_froc(store, jupyter_dir, tmp_path):
    rep = store.champion("medical")
    summary, nb = run_notebook("medical", store, jupyter_dir, tmp_path)

    uids = pd.read_csv(SAMPLES / "medical" / "seriesuids.csv", header=None)[0].tolist()
    nodules = pd.read_csv(SAMPLES / "medical" / "annotations.csv")
    assert summary["model"] == "keel-medical" and summary["version"] == int(rep.version)
    assert summary["series_in"] == summary["series_scored"] == len(uids) == 3
    assert summary["rows_rejected"] == 0 and summary["n_candidates"] >= 1
    assert 0.0 <= summary["probability_min"] <= summary["probability_max"] <= 1.0
    # demo split: nothing held out, so the notebook evaluates the series the lifecycle did
    m = summary["metrics"]
    assert summary["n_heldout"] == m["n_scans"] == len(uids)
    assert m["n_nodules"] == len(nodules)
    for key in ("cpm", "sensitivity_at_1fp", "sensitivity_at_4fp", "fp_per_scan_max"):
        assert m[key] == pytest.approx(rep.metrics[key]), key
    figs = summary["figures"]
    assert figs["froc"]["axes"] == 1 and figs["froc"]["artists"] >= 2
    findings = [v for k, v in figs.items() if k.startswith("findings_")]
    assert len(findings) == 3 and all(f["artists"] >= 2 for f in findings)
    assert png_outputs(nb) == 4


@pytest.mark.slow
def test_maintenance_notebook_matches_the_registered_lead_times(store, jupyter_dir, tmp_path):
    rep = store.champion("maintenance")
    summary, nb = run_notebook("maintenance", store, jupyter_dir, tmp_path)

    fleet = pd.read_parquet(SAMPLES / "maintenance" / "fleet_sensors.parquet")
    n_assets = fleet["asset_id"].nunique()
    assert summary["model"] == "keel-maintenance" and summary["version"] == int(rep.version)
    assert summary["assets_in"] == summary["rows_out"] == n_assets == 12
    assert summary["rows_rejected"] == 0
    assert 0 <= summary["assets_alarming"] <= n_assets
    assert np.isfinite([summary["rul_min"], summary["rul_max"]]).all()
    assert 0.0 <= summary["p_fail_min"] <= summary["p_fail_max"] <= 1.0
    # the notebook recomputes, from the registered model, what the lifecycle logged
    lead = summary["lead_metrics"]
    assert summary["lead_units"] == lead["n_failures"] == rep.metrics["lead_n_units"]
    assert lead["detection_rate"] == pytest.approx(rep.metrics["lead_detection_rate"])
    assert lead["lead_time_median"] == pytest.approx(rep.metrics["lead_time_median"])
    assert lead["false_alarms_per_1000_healthy"] == pytest.approx(
        rep.metrics["false_alarms_per_1000_healthy"]
    )
    assert summary["trajectory_rows"] > summary["lead_units"]
    figs = summary["figures"]
    assert figs["rul_trajectories"]["axes"] >= summary["lead_units"]
    assert figs["rul_trajectories"]["artists"] >= 3 * min(4, summary["lead_units"])
    assert figs["lead_times"]["axes"] == 1
    assert png_outputs(nb) == 2
