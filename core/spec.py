"""The contract between an app and the generic pipelines.

Each app exposes ``apps/<name>/spec.py: SPEC = AppSpec(...)``. ``pipelines/`` and the
``keel`` CLI only ever talk to an ``AppSpec``, so a fourth app adds a folder under
``apps/`` and touches no pipeline code.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pandas as pd


@runtime_checkable
class Predictor(Protocol):
    """What a registered model is at scoring time: a frame in, a frame out.

    ``save`` writes only plain files (YAML/JSON config, a ``state_dict`` that loads with
    ``weights_only=True``), never a pickle, so loading a registered model cannot execute
    arbitrary code.
    """

    input_columns: list[str]

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Predictor: ...

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame: ...


@dataclass
class EvalResult:
    """Metrics of one evaluation, with the protocol they follow stated next to them."""

    metrics: dict[str, float]
    protocol: str
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class TrainResult:
    predictor: Predictor
    evaluation: EvalResult
    input_example: pd.DataFrame
    data_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectResult:
    """A recipe chosen on validation folds (never the test data) by ``AppSpec.select``.

    ``best``: the winning candidate's name; ``best_config``: the app config to train with;
    ``summary``: one dict per candidate, in the order given, with ``candidate``,
    ``overrides``, ``mean_<metric>``, ``sd_<metric>``, ``per_fold``; ``rows``: one dict per
    (candidate, fold) fit; ``protocol``: how folds were built and what ranked them.
    """

    best: str
    best_config: Any
    metric: str
    summary: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    protocol: str


@dataclass(frozen=True)
class AppSpec:
    """One app, as the pipelines see it.

    ``train(config, run_context)`` runs the app's data module and model module through the
    core engine and returns a :class:`TrainResult`; ``evaluate(predictor, config)`` scores
    the app's evaluation data under its official protocol; ``predictor_cls`` rebuilds a
    saved predictor for batch scoring and MLflow pyfunc serving.

    ``distill(config, teacher, run=None, distill_cfg=None)`` (optional): train the student
    described by ``config`` (its model section sets the student's size) against
    ``teacher``, a loaded predictor of the same app (e.g. the registered champion), with
    a :class:`core.distill.DistillConfig` (``None``: defaults), and evaluate it exactly as
    ``train`` does; returns a :class:`TrainResult`. Apps implement it in
    ``apps/<name>/distillation.py``.

    ``select(config, candidates, n_folds=None, metric=None, jobs=1, progress=None)``
    (optional): run every candidate (name -> dotted-key overrides of ``config``) on the
    app's validation folds, calling ``progress(message)`` as fits finish, and return a
    :class:`SelectResult` (``keel <app> select``).
    """

    name: str
    description: str
    config_cls: type
    train: Callable[..., TrainResult]
    evaluate: Callable[..., EvalResult]
    predictor_cls: type
    primary_metric: str
    primary_mode: str = "max"  # or "min"
    # guard metric -> (mode, tolerated regression)
    guard_metrics: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    demo_config: Callable[[], Any] | None = None
    summary_metrics: tuple[str, ...] = ()
    distill: Callable[..., TrainResult] | None = None
    select: Callable[..., SelectResult] | None = None


def load_app_spec(name: str) -> AppSpec:
    """``fraud`` -> ``apps.fraud.spec.SPEC``; a dotted module path is taken as given."""
    module_name = name if "." in name else f"apps.{name}.spec"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # the app exists but one of its own imports is missing
        known = ", ".join(discover_apps()) or "none"
        raise ValueError(
            f"unknown app {name!r} (module {module_name} not found); known apps: {known}"
        ) from err
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, AppSpec):
        raise ValueError(f"{module_name} must define SPEC = AppSpec(...)")
    return spec


def discover_apps() -> list[str]:
    """Names of the apps under ``apps/`` that ship a ``spec`` module."""
    import apps

    names = []
    for info in pkgutil.iter_modules(apps.__path__):
        if info.ispkg and importlib.util.find_spec(f"apps.{info.name}.spec") is not None:
            names.append(info.name)
    return sorted(names)
