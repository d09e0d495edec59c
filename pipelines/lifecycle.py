"""Train -> evaluate -> register as challenger -> compare with champion -> promote.

Driven entirely through an :class:`core.spec.AppSpec`, so it works for any app.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402

from core import tracking  # noqa: E402
from core.pyfunc import log_predictor  # noqa: E402
from core.sharding import launched_as_secondary_rank  # noqa: E402
from core.spec import AppSpec, EvalResult, load_app_spec  # noqa: E402
from pipelines import registry  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class LifecycleReport:
    app: str
    model_name: str
    version: str
    run_id: str
    metrics: dict[str, float]
    protocol: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    champion_metrics: dict[str, float] | None = None


def _metric_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name)


def log_evaluation(result: EvalResult, prefix: str = "") -> None:
    """Metrics, the protocol they follow, plots and tables, into the active run."""
    mlflow.log_metrics({_metric_key(prefix + k): float(v) for k, v in result.metrics.items()})
    mlflow.set_tag("keel.protocol", result.protocol[:5000])
    mlflow.log_text(result.protocol, f"{prefix}evaluation/protocol.txt")
    for name, fig in result.figures.items():
        mlflow.log_figure(fig, f"{prefix}plots/{name}.png")
        plt.close(fig)
    for name, table in result.tables.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.csv"
            table.to_csv(path, index=False)
            mlflow.log_artifact(str(path), f"{prefix}evaluation")


def model_card(
    spec: AppSpec,
    result_metrics: dict[str, float],
    protocol: str,
    fingerprint: str,
    predictor: Any,
    limits: list[str],
) -> dict[str, Any]:
    return {
        "app": spec.name,
        "description": spec.description,
        "data_fingerprint": fingerprint,
        "protocol": protocol,
        "metrics": result_metrics,
        "primary_metric": spec.primary_metric,
        "thresholds": getattr(predictor, "thresholds", {}),
        "known_limits": limits,
        "git_commit": tracking.git_commit(),
    }


def register_result(
    spec: Any,
    result: Any,
    name: str,
    card_extra: dict[str, Any] | None = None,
    app: str | None = None,
) -> str:
    """Inside the active run: log the evaluation, the pyfunc model and its model card,
    register it under ``name`` with the ``challenger`` alias; return the new version.

    One place for what every registered version carries, whether trained, distilled or
    grown, so the registry shows the same card and protocol for all of them. ``app``: how
    the served model finds its spec again (a name under ``apps/`` or a dotted module;
    default ``spec.name``).
    """
    mlflow.set_tag("keel.data_fingerprint", result.data_fingerprint)
    log_evaluation(result.evaluation)
    info = log_predictor(
        result.predictor,
        app or spec.name,
        input_example=result.input_example,
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    card = model_card(
        spec,
        result.evaluation.metrics,
        result.evaluation.protocol,
        result.data_fingerprint,
        result.predictor,
        result.extra.get("known_limits", []),
    ) | (card_extra or {})
    mlflow.log_dict(card, "model_card.json")
    client = mlflow.MlflowClient()
    client.update_model_version(name, version, description=json.dumps(card, indent=1)[:4900])
    client.set_model_version_tag(name, version, "keel.protocol", result.evaluation.protocol[:4000])
    client.set_registered_model_alias(name, registry.CHALLENGER, version)
    return version


def train_register_promote(
    app: str,
    config: Any | None = None,
    *,
    tracking_uri: str | None = None,
    margin: float = 0.0,
    auto_promote: bool = True,
    run_name: str | None = None,
) -> LifecycleReport:
    spec = load_app_spec(app)
    cfg = (
        config
        if config is not None
        else (spec.demo_config() if spec.demo_config else spec.config_cls())
    )
    name = registry.model_name(spec.name)
    if launched_as_secondary_rank():
        # Multi-GPU training (trainer.devices > 1) re-runs this command once per extra
        # rank: it joins every training step, then leaves logging and registry to rank 0.
        result = spec.train(cfg, run=None)
        return LifecycleReport(
            spec.name,
            name,
            "",
            "",
            result.evaluation.metrics,
            result.evaluation.protocol,
            False,
            ["secondary rank: trained its share; rank 0 logs and registers"],
        )
    tracking.configure(tracking_uri)
    cfg_dict = tracking.config_dict(cfg)
    with tracking.start_run(
        f"keel-{spec.name}", config=cfg_dict, run_name=run_name or f"{spec.name}-train"
    ) as run:
        result = spec.train(cfg, run=run)
        version = register_result(spec, result, name, app=app)
        run_id = run.info.run_id

    champion_version = registry.alias_version(name, registry.CHAMPION)
    champion_metrics = None
    if champion_version is not None and champion_version != version:
        # Re-evaluate the champion on exactly the data the challenger was evaluated on.
        model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.CHAMPION}")
        champion_metrics = spec.evaluate(model.unwrap_python_model().predictor, cfg).metrics
    decision = registry.compare(
        result.evaluation.metrics,
        champion_metrics,
        primary=spec.primary_metric,
        primary_mode=spec.primary_mode,
        margin=margin,
        guards=dict(spec.guard_metrics),
    )
    promoted = bool(auto_promote and decision.promote)
    if promoted:
        registry.promote(name, version)
    log.info(
        "%s v%s: %s (%s)",
        name,
        version,
        "promoted" if promoted else "kept as challenger",
        "; ".join(decision.reasons),
    )
    return LifecycleReport(
        spec.name,
        name,
        version,
        run_id,
        result.evaluation.metrics,
        result.evaluation.protocol,
        promoted,
        decision.reasons,
        champion_metrics,
    )
