"""Shared tiny fixtures for the maintenance model/predictor/spec tests (one fit per session)."""

from __future__ import annotations

import pandas as pd
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


def two_unit_frame() -> pd.DataFrame:
    """Two units (4 and 2 readings) with two sensors and a column no transform should touch;
    small enough to check causal per-unit transforms by hand."""
    return pd.DataFrame(
        {
            "unit": [1, 1, 1, 1, 2, 2],
            "time": [1, 2, 3, 4, 1, 2],
            "a": [1.0, 3.0, 2.0, 6.0, 10.0, 0.0],
            "b": [0.0, 0.0, 4.0, 0.0, -2.0, 2.0],
            "other": [9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
        }
    )


def check_causal_scoring_and_reload(out: object, tmp_path: object) -> object:
    """Scoring a truncated history gives the full trajectory's RUL at that reading, and the saved
    and reloaded predictor scores the same; returns the reloaded predictor. Shared by the tests
    of every causal input transform (smoothing, drift channels)."""
    import numpy as np

    from apps.maintenance.predictor import MaintenancePredictor
    from apps.maintenance.training import input_example

    frame = input_example(out.data, n_units=1, max_rows=60)
    traj = out.predictor.predict_trajectory(frame)
    cut = frame.iloc[:-9]
    np.testing.assert_allclose(
        out.predictor.predict(cut)["rul"].iloc[0], traj["rul"].iloc[len(cut) - 1], rtol=1e-5
    )
    out.predictor.save(tmp_path)
    loaded = MaintenancePredictor.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.predict(frame), out.predictor.predict(frame))
    return loaded
