"""Suite-wide fixtures."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow.tracking._model_registry.utils as registry_utils
import mlflow.tracking._tracking_service.utils as tracking_utils
import pytest

_TRACKING_VARS = ("MLFLOW_TRACKING_URI", "KEEL_TRACKING_URI", "MLFLOW_REGISTRY_URI")


# The longest modules, longest first (their summed test times in a 4-worker run on a 2-core
# machine, 2026-12-01, session 22: 80 s down to 16 s). pytest-xdist's loadscope hands whole
# modules to workers in collection order, so a long module collected last ran alone while the
# other worker sat idle; starting with the longest lets the short ones fill in at the end.
LONGEST_MODULES = (
    "tests/notebooks/test_notebooks.py",
    "tests/pipelines/test_cli_sharded.py",
    "tests/pipelines/test_spark_score.py",
    "tests/bench/test_scale_bench.py",
    "tests/bench/test_fraud_bench_refit.py",
    "tests/bench/test_scale_bench_fraud_mlp.py",
    "tests/bench/test_scale_bench_ddp2.py",
    "tests/apps/maintenance/test_distillation_mixup.py",
    "tests/apps/fraud/test_selection.py",
    "tests/core/test_sharding.py",
    "tests/apps/fraud/test_distill_selection.py",
    "tests/pipelines/test_serving.py",
    "tests/apps/maintenance/test_spec.py",
    "tests/apps/fraud/test_refit.py",
    "tests/pipelines/test_cli_distill.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect :data:`LONGEST_MODULES` first, in that order; every other module, and the
    tests within each module, keep pytest's order (the sort is stable)."""
    rank = {module: i for i, module in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back after each test. Lightning's distributed
    strategies call ``torch.set_num_threads(cpus // processes)`` when ``OMP_NUM_THREADS`` is
    unset (``lightning.fabric.utilities.distributed._set_num_threads_if_needed``; the
    in-process FSDP2 tests unset it through ``clean_dist_env``), and the setting outlives the
    test. Measured here with the other core busy: the maintenance fixture fit after the fraud
    FSDP2 test took 262 s, against 9 s with this fixture, since tiny models on two threads
    stall whenever the other core is taken."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# Taken before any fixture runs: a session fixture (e.g. tests/pipelines' registered_store)
# configures its own store, and restoring to what each test found would carry that store into
# every later test of the process.
_PRISTINE_MLFLOW = (
    {var: os.environ.get(var) for var in _TRACKING_VARS},
    tracking_utils._tracking_uri,
    registry_utils._registry_uri,
)


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking() -> Iterator[None]:
    """Put the MLflow tracking and registry URIs (process-global, and mirrored into the
    environment by ``mlflow.set_tracking_uri`` / ``set_registry_uri``) back to what they were
    when the suite started, after each test. A test that trains and registers into its own
    temporary store then cannot redirect later tests into that store; tests that use a
    shared store configure it themselves. Both URIs matter: a URI left set makes
    ``core.tracking.start_run`` ignore ``KEEL_TRACKING_URI``, and a registry URI left set
    resolves ``models:/`` URIs in another store (both seen under pytest-xdist, whose test
    order differs from a single process's)."""
    yield
    saved_env, saved_uri, saved_registry = _PRISTINE_MLFLOW
    for var, value in saved_env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    tracking_utils._tracking_uri = saved_uri
    registry_utils._registry_uri = saved_registry


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], str]:
    """``sqlite_store(folder) -> uri``: a new, empty, real sqlite MLflow store at
    ``folder/mlflow.db``, for tests, their fixtures of any scope and the CLI processes they
    start. Each is a copy of one empty store made here once per test process: MLflow makes
    its tables and runs every schema migration on the first open of a new sqlite file,
    2-4 s of CPU per store, which every test that wanted a store of its own used to pay."""
    import mlflow

    template = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()

    def make(folder: Path) -> str:
        target = Path(folder) / "mlflow.db"
        if target.exists():
            raise FileExistsError(f"{target}: a store is already there")
        shutil.copyfile(template, target)
        return f"sqlite:///{target}"

    return make


# What Lightning's launcher and torch.distributed read from, and Lightning writes back.
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")


@pytest.fixture
def clean_dist_env(monkeypatch):
    """An in-process distributed run (gloo, one process) that leaves nothing behind: no
    rendezvous variables before it, none of those Lightning set after it, no process group."""
    import torch

    for key in (*DIST_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in DIST_ENV:
        os.environ.pop(key, None)
