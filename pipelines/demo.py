"""``make demo``: the end-to-end job on small data, with MLflow on an embedded sqlite store.

For each app: train small, evaluate under the app's protocol, register as challenger,
promote to champion if better, reload the champion by alias through MLflow, batch-score
a sample file, and print one summary table with where to look.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import mlflow

from core import tracking
from core.spec import load_app_spec
from pipelines.lifecycle import train_register_promote
from pipelines.registry import CHAMPION, model_name
from pipelines.score import score

DEMO_APPS = ["core.examples.synthetic", "fraud", "maintenance", "medical"]


def _demo_input(app: str, spec, out_dir: Path) -> Path | None:
    """A sample input file for batch scoring, provided by the app (``demo_score_input``)."""
    module = __import__(app if "." in app else f"apps.{app}.spec", fromlist=["_"])
    make = getattr(module, "demo_score_input", None)
    if make is None:
        return None
    return make(out_dir, spec.demo_config() if spec.demo_config else spec.config_cls())


def run(apps: list[str], workdir: Path) -> list[dict]:
    uri = tracking.configure(None, workdir)
    out_dir = workdir / "keel_demo_output"
    out_dir.mkdir(exist_ok=True)
    rows = []
    for app in apps:
        t0 = time.time()
        spec = load_app_spec(app)
        print(f"\n=== {spec.name}: train -> evaluate -> register -> promote ===", flush=True)
        rep = train_register_promote(app)
        model_uri = f"models:/{model_name(spec.name)}@{CHAMPION}"
        loaded = mlflow.pyfunc.load_model(model_uri)  # the champion, reloaded by alias
        sample = _demo_input(app, spec, out_dir)
        scored = None
        if sample is not None:
            scored = score(
                model_uri, sample, out_dir / f"{spec.name}_scores.parquet", progress=False
            )
        shown = spec.summary_metrics or tuple(rep.metrics)[:3]
        rows.append(
            {
                "app": spec.name,
                "version": f"v{rep.version} ({'champion' if rep.promoted else 'challenger'})",
                **{
                    "metrics": ", ".join(
                        f"{k}={rep.metrics[k]:.3f}" for k in shown if k in rep.metrics
                    )
                },
                "scored": f"{scored.rows_out} ok / {scored.rows_rejected} rejected"
                if scored
                else "-",
                "loaded_by_alias": type(loaded).__name__,
                "seconds": f"{time.time() - t0:.0f}",
            }
        )
    _print_summary(rows, uri, out_dir)
    return rows


def _print_summary(rows: list[dict], uri: str, out_dir: Path) -> None:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("\n" + "  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    print(f"\nMLflow store: {uri}")
    print(f"Scored outputs: {out_dir}")
    print(f"Look at runs, plots and the registry:  mlflow ui --backend-store-uri {uri}")
    print(f"  (with the venv: .venv/bin/mlflow ui --backend-store-uri {uri})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Keel end-to-end demo on data_samples/")
    parser.add_argument("--apps", nargs="*", default=DEMO_APPS)
    parser.add_argument("--workdir", default=os.getcwd())
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run(args.apps, Path(args.workdir))


if __name__ == "__main__":
    main()
