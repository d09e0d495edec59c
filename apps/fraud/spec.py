"""The fraud app as the pipelines see it: ``SPEC`` and ``demo_score_input``.

``train(cfg, run=None)`` trains the backbone model and the LightGBM baseline on the same
features and split (``apps.fraud.training``), evaluates both on the TEST block under the
official protocol and returns a ``TrainResult``; baseline metrics carry the prefix
``baseline/`` in the same evaluation (hence the same MLflow run and model card) and are
logged into ``run`` directly too. ``evaluate(predictor, cfg)`` re-scores a (possibly
older) predictor on the same test block.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apps.fraud.config import FraudConfig, demo_config
from apps.fraud.distillation import distill
from apps.fraud.predictor import FraudPredictor, raw_input_columns
from apps.fraud.training import evaluate_predictor, fit
from core.spec import AppSpec, EvalResult, SelectResult, TrainResult

KNOWN_LIMITS = [
    "scores of a new file use per-card history from that file (and the configured history"
    " file) only: give a history file covering the previous 30 days for production-equal features",
    "terminal risk features need labels delayed by features.label_delay_days; without labelled"
    " history at scoring time they are 0",
    "calibration and threshold were fitted on the validation block; drift needs re-training",
]

REFIT_LIMITS = [
    "refit on training + validation rows: calibration and the alert threshold were fitted on"
    " the validation scores of the model before the refit, so alert rates may differ from the"
    " budget",
]


def train(cfg: FraudConfig, run: Any = None) -> TrainResult:
    from core.tracking import lightning_logger

    logger = lightning_logger(run)
    out = fit(cfg, logger=logger)
    if run is not None:
        import mlflow

        from pipelines.lifecycle import _metric_key

        base = {k: v for k, v in out.evaluation.metrics.items() if k.startswith("baseline/")}
        if base:
            mlflow.log_metrics({_metric_key(k): float(v) for k, v in base.items()})
    schema = out.data.schema
    test = out.data.split.test
    example = id_columns_as_float(
        out.data.raw[test[:5]].select(out.predictor.input_columns).to_pandas(), schema
    )
    return TrainResult(
        predictor=out.predictor,
        evaluation=out.evaluation,
        input_example=example,
        data_fingerprint=out.data.fingerprint,
        extra={
            "known_limits": KNOWN_LIMITS + (REFIT_LIMITS if cfg.refit_on_validation else []),
            "refit_on_validation": cfg.refit_on_validation,
            "threshold_rows": out.threshold_rows,
            "schema": schema.name,
            "pos_weight": out.extra["pos_weight"],
        },
    )


def id_columns_as_float(frame: pd.DataFrame, schema: Any) -> pd.DataFrame:
    """Card / terminal ids as float64 in the serving signature: MLflow's ``long`` columns
    cannot hold a missing id, which must reach the predictor to be rejected with a reason
    instead of failing the whole batch."""
    for col in (schema.card_column, schema.terminal_column):
        if col and pd.api.types.is_numeric_dtype(frame[col]):
            frame[col] = frame[col].astype("float64")
    return frame


def evaluate(predictor: FraudPredictor, cfg: FraudConfig) -> EvalResult:
    return evaluate_predictor(predictor, cfg)


def select(
    cfg: FraudConfig,
    candidates: dict[str, dict[str, Any]],
    n_folds: int | None = None,
    metric: str | None = None,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> SelectResult:
    """Prequential model selection (``apps.fraud.selection``): default 3 folds, ranked by
    PR-AUC; the winner's config is ready for ``keel fraud train``."""
    from apps.fraud.selection import select as prequential_select

    return prequential_select(
        cfg,
        candidates,
        n_folds=n_folds or 3,
        metric=metric or "pr_auc",
        jobs=jobs,
        progress=progress,
    )


SPEC = AppSpec(
    name="fraud",
    description=(
        "card-fraud scoring: causal per-card/terminal features + the card's recent transactions"
        " as tokens through the DGA + MoE backbone, calibrated, with an alert threshold and"
        " per-alert reasons; LightGBM baseline in the same run"
    ),
    config_cls=FraudConfig,
    train=train,
    evaluate=evaluate,
    predictor_cls=FraudPredictor,
    primary_metric="pr_auc",
    guard_metrics={"recall_at_alert_budget": ("max", 0.02), "roc_auc": ("max", 0.02)},
    demo_config=demo_config,
    distill=distill,
    select=select,
    summary_metrics=(
        "pr_auc",
        "recall_at_precision_0.9",
        "card_precision_at_20",
        "baseline/pr_auc",
    ),
)


def demo_score_input(out_dir: Path, cfg: FraudConfig) -> Path:
    """The last 3 days of the sample (raw columns, sorted by card then time, as batch
    scoring's card grouping wants) with 3 deliberately invalid rows: a NaN amount, a
    missing time and a missing card id."""
    from apps.fraud.readers import load_dataset
    from apps.fraud.schema import TS

    frame, schema = load_dataset(cfg.schema, cfg.data_path)
    last = frame.get_column(TS).max()
    recent = frame.filter(frame.get_column(TS) >= last - pd.Timedelta(days=3))
    sample = recent.select(raw_input_columns(schema)).to_pandas()
    sort = [c for c in (schema.card_column, schema.time_column) if c]
    sample = sample.sort_values(sort, kind="stable").reset_index(drop=True)
    sample[schema.amount_column] = sample[schema.amount_column].astype("float64")
    sample.loc[3, schema.amount_column] = np.nan
    sample[schema.time_column] = sample[schema.time_column].astype("datetime64[us]")
    sample.loc[7, schema.time_column] = pd.NaT
    sample = id_columns_as_float(sample, schema)
    if schema.card_column:
        # the card's rows stay contiguous: blank the id of the file's LAST row
        sample.loc[len(sample) - 1, schema.card_column] = np.nan
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fraud_input.parquet"
    tmp = path.with_name(f".{path.name}.tmp")
    sample.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path
