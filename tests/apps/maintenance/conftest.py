"""Shared tiny fixtures for the maintenance model/predictor/spec tests (one fit per session)."""

from __future__ import annotations

import pytest
import torch

from apps.maintenance.config import MaintenanceConfig, demo_config

torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from more threads


def tiny_config(**trainer: object) -> MaintenanceConfig:
    """The demo fleet with a tiny model and few epochs (seconds on one core)."""
    cfg = demo_config()
    cfg.model.d_model = 32
    cfg.model.ffn_hidden = 64
    cfg.trainer.max_epochs = int(trainer.pop("max_epochs", 6))
    for k, v in trainer.items():
        setattr(cfg.trainer, k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny_fit():
    from apps.maintenance.training import fit

    cfg = tiny_config()
    return cfg, fit(cfg)
