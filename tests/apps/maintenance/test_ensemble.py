"""Per-run ensembles: the mean of independently seeded members, member 0 is the single-model
recipe, and the predictor saves and loads an ensemble."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from apps.maintenance.config import MaintenanceConfig
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.model import RULEnsemble
from apps.maintenance.predictor import MaintenancePredictor
from apps.maintenance.training import fit, input_example, split_windows
from tests.apps.maintenance.conftest import tiny_config


def test_ensemble_is_the_mean_of_its_members_and_member_0_is_the_single_model(tmp_path):
    single_cfg = tiny_config(max_epochs=1)
    single = fit(single_cfg)
    cfg = tiny_config(max_epochs=1)
    cfg.ensemble_size = 2
    out = fit(cfg)
    ens = out.predictor.model
    assert isinstance(ens, RULEnsemble) and len(ens.members) == 2
    # member 0 reproduces the single-model run bit for bit; member 1 is another model
    want = single.predictor.model.state_dict()
    got = ens.members[0].state_dict()
    assert list(got) == list(want)
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)
    w = split_windows(out.predictor, out.data.policy, cfg.window)
    r0, p0 = ens.members[0].predict_windows(w.x, w.mask)
    r1, p1 = ens.members[1].predict_windows(w.x, w.mask)
    assert not np.allclose(r0, r1)
    rul, prob = ens.predict_windows(w.x, w.mask)
    np.testing.assert_allclose(rul, (r0 + r1) / 2, rtol=1e-12)
    np.testing.assert_allclose(prob, (p0 + p1) / 2, rtol=1e-12)
    # the validation figures the recipe is chosen on are the ensemble's
    truth = np.minimum(w.rul, cfg.rul_cap)
    assert out.val_rmse_by_smoothing[1] == pytest.approx(
        float(np.sqrt(np.mean((rul - truth) ** 2))), rel=1e-9
    )
    frame = input_example(out.data, n_units=2, max_rows=40)
    out.predictor.save(tmp_path)
    loaded = MaintenancePredictor.load(tmp_path)
    assert isinstance(loaded.model, RULEnsemble) and len(loaded.model.members) == 2
    pd.testing.assert_frame_equal(loaded.predict(frame), out.predictor.predict(frame))


def test_bad_ensemble_size():
    with pytest.raises(MaintenanceDataError, match="ensemble_size"):
        MaintenanceConfig(ensemble_size=0)
    assert MaintenanceConfig().ensemble_size == 1
