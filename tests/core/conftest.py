"""Fixtures shared by the core tests."""

from __future__ import annotations

import os

import pytest
import torch

# What Lightning's launcher and torch.distributed read from, and Lightning writes back.
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")


@pytest.fixture
def clean_dist_env(monkeypatch):
    """An in-process distributed run (gloo, one process) that leaves nothing behind: no
    rendezvous variables before it, none of those Lightning set after it, no process group."""
    for key in (*DIST_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in DIST_ENV:
        os.environ.pop(key, None)
