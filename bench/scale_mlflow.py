"""Teacher, distilled student and scratch student side by side in MLflow (issue #6).

``bench/results/scale.json`` is where every distillation figure is recorded, with its
command, machine and date; many of them were measured on the GPU machine, where MLflow is
not installed. This module logs recorded entries into an MLflow store afterwards, one run
per entry in the ``keel-scale-bench`` experiment, so the three models of each app can be
compared in the MLflow UI: a metric per model and field (``teacher/cpm``,
``student_distilled/cpm``, ``student_scratch/cpm``, ...), the recorded value as
``retention``, the means over seeds where the entry has them, the whole entry as an
artifact, a Markdown table and a bar chart of the app's primary metric.

``python -m bench.scale_mlflow`` logs every ``*_student_retention*`` entry (or ``--keys``)
to the store that :func:`core.tracking.resolve_tracking_uri` names (``--tracking-uri``,
else ``KEEL_TRACKING_URI`` / ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``).
``python -m bench.scale_bench --mlflow`` logs its own results the same way as it records them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

EXPERIMENT = "keel-scale-bench"
# the metric each app's retention is the ratio of, as its rows name it
PRIMARY = (("rmse_capped", "RMSE (capped), lower is better"), ("cpm", "CPM"), ("pr_auc", "PR-AUC"))
_SAFE = re.compile(r"[^0-9A-Za-z_\-. /]")


def _metric_name(*parts: Any) -> str:
    return _SAFE.sub("_", "/".join(str(p) for p in parts))


def entry_metrics(value: float | None, details: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of one recorded entry: ``<model>/<field>`` for each numeric field of
    each row (``<model>/<field>_b<batch>`` for per-batch rates), ``retention`` (the recorded
    value), ``mean/<name>`` for the means over seeds, ``mean_pr_auc/<model>`` for the fraud
    MLP runs, and the parameter ratio."""
    out: dict[str, float] = {}

    def put(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return
        if math.isfinite(float(v)):
            out[name] = float(v)

    if value is not None:
        put("retention", value)
    for row in details.get("rows", []):
        model = row.get("model")
        if not model:
            continue
        for field, v in row.items():
            if isinstance(v, dict):
                for batch, rate in v.items():
                    put(_metric_name(model, f"{field}_b{batch}"), rate)
            else:
                put(_metric_name(model, field), v)
    for name, v in (details.get("mean_over_seeds") or {}).items():
        put(_metric_name("mean", name), v)
    for model, v in (details.get("mean_pr_auc") or {}).items():
        put(_metric_name("mean_pr_auc", model), v)
    put("teacher_over_student_active_params", details.get("teacher_over_student_active_params"))
    return out


def primary_metric(details: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, label)`` of the app's primary metric in the entry's rows, if any."""
    rows = details.get("rows") or []
    for field, label in PRIMARY:
        if rows and all(field in r for r in rows):
            return field, label
    return None


def comparison_table(key: str, entry: dict[str, Any]) -> str:
    """A Markdown table of the entry's rows (model, primary metric, active parameters)."""
    details = entry.get("details") or {}
    prim = primary_metric(details)
    lines = [
        f"# {key}",
        "",
        f"value (retention): {entry.get('value')}",
        f"machine: {entry.get('machine')}; date: {entry.get('date')}",
        f"command: `{details.get('command') or entry.get('command')}`",
        f"protocol: {details.get('protocol', 'see BENCHMARKS.md')}",
        "",
    ]
    if prim is not None:
        field, label = prim
        lines += [f"| model | {label} | active params |", "|---|---|---|"]
        for r in details["rows"]:
            v = r[field]
            shown = f"{v:.4f}" if isinstance(v, int | float) else "not measured"
            lines.append(f"| {r['model']} | {shown} | {r.get('active_params', '')} |")
    means = details.get("mean_over_seeds") or details.get("mean_pr_auc")
    if means:
        lines += ["", "means over seeds:", ""]
        lines += [f"- {k}: {v}" for k, v in means.items()]
    return "\n".join(lines) + "\n"


def _chart(key: str, details: dict[str, Any], path: Path) -> bool:
    prim = primary_metric(details)
    if prim is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field, label = prim
    rows = [r for r in details["rows"] if isinstance(r[field], int | float)]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([r["model"] for r in rows], [r[field] for r in rows], color="#4472c4")
    for i, r in enumerate(rows):
        ax.text(i, r[field], f"{r[field]:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(label)
    ax.set_title(key, fontsize=9)  # the budget each model had is in the entry
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def log_entry(key: str, entry: dict[str, Any], tracking_uri: str | None = None) -> str:
    """Log one recorded entry as an MLflow run; returns the run id."""
    import tempfile

    import mlflow

    from core import tracking

    details = entry.get("details") or {}
    config = {
        "key": key,
        "command": details.get("command") or entry.get("command"),
        "recorded_machine": entry.get("machine"),
        "recorded_date": entry.get("date"),
        **{
            k: details[k]
            for k in ("alpha", "temperature", "protocol", "student_seeds", "seeds")
            if k in details
        },
    }
    tags = {"keel.bench_key": key, "keel.recorded_machine": str(entry.get("machine"))}
    with tracking.start_run(
        EXPERIMENT, config=config, run_name=key, tags=tags, tracking_uri=tracking_uri
    ) as run:
        mlflow.log_metrics(entry_metrics(entry.get("value"), details))
        mlflow.log_dict(entry, "scale_entry.json")
        mlflow.log_text(comparison_table(key, entry), "comparison.md")
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "comparison.png"
            if _chart(key, details, png):
                mlflow.log_artifact(str(png))
        return run.info.run_id


def distillation_keys(recorded: dict[str, Any]) -> list[str]:
    """The keys of teacher/student/scratch comparisons in a scale.json."""
    return sorted(k for k in recorded if "_student_retention" in k)


def log_recorded(
    path: Path, keys: Iterable[str] | None = None, tracking_uri: str | None = None
) -> dict[str, str]:
    """``{key: run id}`` for the chosen (default: every distillation) entries of ``path``."""
    recorded = json.loads(Path(path).read_text())
    chosen = list(keys) if keys else distillation_keys(recorded)
    missing = [k for k in chosen if k not in recorded]
    if missing:
        raise KeyError(f"{path}: no recorded entry {missing}")
    return {k: log_entry(k, recorded[k], tracking_uri) for k in chosen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS_DIR / "scale.json"))
    ap.add_argument("--keys", nargs="*", default=None, help="default: every *_student_retention*")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    runs = log_recorded(Path(args.results), args.keys, args.tracking_uri)
    for key, run_id in runs.items():
        print(f"{key}: run {run_id} (experiment {EXPERIMENT})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
