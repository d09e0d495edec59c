"""MLflow tracking with an embedded default.

Where runs go is decided in one place, :func:`resolve_tracking_uri`: an explicit value
from configuration wins, then ``KEEL_TRACKING_URI``, then ``MLFLOW_TRACKING_URI``, then
an sqlite store ``mlflow.db`` in the working directory with artifacts in ``mlartifacts/``
beside it. The sqlite default means a laptop, a notebook and CI all get a real store
(registry and aliases included) with no server to start.

Every run logs the full config, the hardware, the git commit and a fingerprint of the
data, so a number in the registry can always be traced to what produced it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"


def resolve_tracking_uri(explicit: str | None = None, workdir: str | Path | None = None) -> str:
    """Return the tracking URI: explicit > KEEL_TRACKING_URI > MLFLOW_TRACKING_URI > local sqlite."""
    if explicit:
        return explicit
    for var in ("KEEL_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        value = os.environ.get(var)
        if value:
            return value
    base = Path(workdir) if workdir is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB_NAME).resolve()}"


def _artifact_root_for(uri: str) -> str | None:
    """Artifacts live beside a local sqlite store; remote stores choose their own."""
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///") :])
        return (db_path.parent / DEFAULT_ARTIFACT_DIR).resolve().as_uri()
    return None


def configure(explicit: str | None = None, workdir: str | Path | None = None) -> str:
    """Point MLflow's tracking and registry at the resolved store and return its URI."""
    uri = resolve_tracking_uri(explicit, workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def get_or_create_experiment(name: str) -> str:
    """Experiment id for ``name``, created with artifacts beside a local sqlite store."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root_for(mlflow.get_tracking_uri())
    location = f"{root}/{name}" if root else None
    return client.create_experiment(name, artifact_location=location)


def git_commit(repo_dir: str | Path | None = None) -> str:
    """The current commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    cwd = str(repo_dir or Path(__file__).resolve().parents[1])
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware_info() -> dict[str, str]:
    """What the run ran on: enough to explain a throughput or a numerical difference."""
    import torch

    info = {
        "host.platform": platform.platform(),
        "host.python": platform.python_version(),
        "host.cpu_count": str(os.cpu_count()),
        "torch.version": torch.__version__,
        "torch.cuda_available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["torch.cuda_device"] = torch.cuda.get_device_name(0)
        info["torch.cuda_device_count"] = str(torch.cuda.device_count())
        info["torch.cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def fingerprint_paths(paths: Iterable[str | Path]) -> str:
    """sha256 over the bytes of files (folders walked in sorted order), names included."""
    h = hashlib.sha256()
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"cannot fingerprint missing data path: {p}")
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint_frame(frame: Any) -> str:
    """sha256 of a pandas/polars frame's content (schema + values), order-sensitive."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):  # polars and friends
        frame = frame.to_pandas()
    h = hashlib.sha256()
    h.update(json.dumps([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return h.hexdigest()


def config_dict(cfg: Any) -> dict[str, Any]:
    """An app config as the plain mapping :func:`start_run` records (``to_dict`` for the
    YAML configs, the fields otherwise)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict to dotted keys, for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def start_run(
    experiment: str,
    *,
    config: Mapping[str, Any],
    data_fingerprint: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run that records config, hardware, git commit and data fingerprint."""
    if tracking_uri or not mlflow.is_tracking_uri_set():
        configure(tracking_uri)
    exp_id = get_or_create_experiment(experiment)
    all_tags = {"keel.git_commit": git_commit(), **hardware_info(), **(tags or {})}
    if data_fingerprint:
        all_tags["keel.data_fingerprint"] = data_fingerprint
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags) as run:
        params = {k: str(v)[:6000] for k, v in flatten(config).items()}
        # MLflow caps one batch at 100 params.
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_dict(dict(config), "config.yaml")
        yield run


def lightning_logger(run: mlflow.ActiveRun | None) -> Any:
    """A Lightning MLFlowLogger that writes per-epoch metrics into ``run``; ``None`` (no
    logger, as ``core.engine.build_trainer`` reads it) when there is no run, so callers need
    no branch."""
    from lightning.pytorch.loggers import MLFlowLogger

    if run is None:
        return None

    return MLFlowLogger(
        experiment_name=mlflow.get_experiment(run.info.experiment_id).name,
        tracking_uri=mlflow.get_tracking_uri(),
        run_id=run.info.run_id,
        log_model=False,
    )
