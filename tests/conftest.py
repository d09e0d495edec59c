"""Suite-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

_TRACKING_VARS = ("MLFLOW_TRACKING_URI", "KEEL_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back after each test. Lightning's multi-process
    strategies call ``torch.set_num_threads(cpus // processes)`` when ``OMP_NUM_THREADS`` is
    unset (as ``clean_dist_env`` leaves it), and the setting outlives the test: measured
    here, every later maintenance test then ran 10-20x slower on the shared 2-core machine
    (one fixture fit 7.8 s -> 161 s), since tiny models with two threads stall whenever the
    other core is busy."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking() -> Iterator[None]:
    """Put the MLflow tracking URI (process-global, and mirrored into the environment by
    ``mlflow.set_tracking_uri``) back after each test, so a test that trains and registers
    into its own temporary store cannot redirect later tests into that store."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    saved_env = {var: os.environ.get(var) for var in _TRACKING_VARS}
    saved_uri = tracking_utils._tracking_uri
    yield
    for var, value in saved_env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    tracking_utils._tracking_uri = saved_uri


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
