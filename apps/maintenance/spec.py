"""The maintenance app as the pipelines see it: ``SPEC`` plus ``demo_score_input``.

Training, evaluation protocol and alarm-policy choice live in :mod:`apps.maintenance.training`;
this module wires them to MLflow (a run's logger) and to the :class:`core.spec.AppSpec` contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apps.maintenance._io import atomic_write
from apps.maintenance.config import MaintenanceConfig, demo_config
from apps.maintenance.data import prepare_data
from apps.maintenance.distillation import distill
from apps.maintenance.predictor import MaintenancePredictor
from apps.maintenance.training import evaluate_prepared, fingerprint, fit, input_example
from core.spec import AppSpec, EvalResult, TrainResult


def train(cfg: MaintenanceConfig, run: Any = None) -> TrainResult:
    from core.tracking import lightning_logger

    logger = lightning_logger(run)
    out = fit(cfg, logger=logger)
    evaluation = evaluate_prepared(out.predictor, out.data, cfg)
    return TrainResult(
        predictor=out.predictor,
        evaluation=evaluation,
        input_example=input_example(out.data),
        data_fingerprint=fingerprint(out.data.train),
        extra={
            "known_limits": out.known_limits,
            "pretrain_losses": out.pretrain_losses,
            "policy_grid": out.selector.grid_ if out.selector is not None else None,
        },
    )


def evaluate(predictor: MaintenancePredictor, cfg: MaintenanceConfig) -> EvalResult:
    """Re-evaluate any predictor (e.g. the champion) on exactly the held-out splits of ``cfg``."""
    return evaluate_prepared(predictor, prepare_data(cfg), cfg)


SPEC = AppSpec(
    name="maintenance",
    description="remaining-useful-life regression with alarm policy (C-MAPSS or sensor tables)",
    config_cls=MaintenanceConfig,
    train=train,
    evaluate=evaluate,
    predictor_cls=MaintenancePredictor,
    primary_metric="rmse_capped",
    primary_mode="min",
    guard_metrics={
        "false_alarms_per_1000_healthy": ("min", 0.5),
        "lead_detection_rate": ("max", 0.05),
    },
    demo_config=demo_config,
    distill=distill,
    summary_metrics=(
        "rmse_capped",
        "phm08_capped",
        "rmse_uncapped",
        "lead_detection_rate",
        "lead_time_median",
        "false_alarms_per_1000_healthy",
    ),
)


def demo_score_input(out_dir: Path, cfg: MaintenanceConfig) -> Path:
    """A sensor table to batch-score: the test units' readings, one asset made invalid (a
    missing sensor value), so the demo shows a rejected asset next to scored ones. (Text in a
    numeric column would be refused earlier, for the whole chunk, by the MLflow signature.)"""
    data = prepare_data(cfg)
    frame = input_example(data, n_units=10**6, max_rows=10**6)
    s = data.schema
    assets = list(pd.unique(frame[s.asset_column]))
    bad = assets[min(1, len(assets) - 1)]
    col = s.sensor_columns[0]
    rows = np.flatnonzero((frame[s.asset_column] == bad).to_numpy())
    frame.loc[rows[len(rows) // 2], col] = np.nan
    path = Path(out_dir) / "maintenance_input.parquet"
    atomic_write(path, lambda p: frame.to_parquet(p, index=False))
    return path
