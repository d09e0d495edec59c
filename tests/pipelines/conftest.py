"""One tiny synthetic model trained and registered once per session in a real sqlite store."""

from __future__ import annotations

import pytest

from core import tracking
from core.config import AttentionConfig, BackboneConfig, MoEConfig


def tiny_config(seed: int = 0):
    from core.engine import OptimConfig, TrainerConfig
    from core.examples.synthetic import SyntheticConfig

    return SyntheticConfig(
        n_train=2400,
        n_val=300,
        n_test=600,
        seed=seed,
        batch_size=128,
        backbone=BackboneConfig(
            d_model=16,
            n_layers=2,
            ffn_hidden=32,
            attention=AttentionConfig(n_heads=2),
            moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=1, expert_hidden=16),
        ),
        optim=OptimConfig(lr=6e-3, warmup_steps=5),
        trainer=TrainerConfig(
            max_epochs=3,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            monitor=None,
            num_sanity_val_steps=0,
        ),
    )


@pytest.fixture(scope="session")
def registered_store(tmp_path_factory, sqlite_store):
    """(workdir, LifecycleReport) of a first training run that became champion."""
    from pipelines.lifecycle import train_register_promote

    workdir = tmp_path_factory.mktemp("store")
    sqlite_store(workdir)  # the store tracking.configure resolves in workdir
    uri = tracking.configure(None, workdir)
    report = train_register_promote("core.examples.synthetic", tiny_config(), tracking_uri=uri)
    return workdir, uri, report
