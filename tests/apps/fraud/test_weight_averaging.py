"""Weight averaging for the ULB recipe (issue #3): ``head.weight_average`` maps onto core's
``AveragedWeights`` (whose recurrence, validation and raw-trajectory behaviour
tests/core/test_weight_averaging.py checks), and best-epoch selection keeps averaged
weights."""

from __future__ import annotations

import numpy as np
import pytest

from apps.fraud.config import HeadConfig
from apps.fraud.errors import FraudConfigError
from apps.fraud.training import averaged_weights


def test_weight_average_config_validation():
    with pytest.raises(FraudConfigError, match="weight_average"):
        HeadConfig(weight_average="swa")
    with pytest.raises(FraudConfigError, match="ema_decay"):
        HeadConfig(weight_average="ema", ema_decay=1.0)
    with pytest.raises(FraudConfigError, match="average_start_epoch"):
        HeadConfig(average_start_epoch=-1)
    from apps.fraud.config import FraudConfig

    cfg = FraudConfig()
    assert averaged_weights(cfg) is None
    cfg.head.weight_average, cfg.head.ema_decay = "ema", 0.99
    assert averaged_weights(cfg).decay == 0.99
    cfg.head.weight_average, cfg.head.average_start_epoch = "uniform", 2
    cb = averaged_weights(cfg)
    assert cb.decay is None and cb.start_epoch == 2


@pytest.mark.slow
def test_fit_with_ema_keeps_best_averaged_weights(tmp_path):
    """With ``select_best`` the kept weights are the averaged weights of the best epoch:
    scoring the validation block again reproduces the recorded best validation AP."""
    from tests.apps.fraud.fraud_model_helpers import fit_two_epochs_keeps_best_val_ap, tiny_config

    cfg = tiny_config(tmp_path, select_best="val/ap", weight_average="ema", ema_decay=0.95)
    out = fit_two_epochs_keeps_best_val_ap(cfg)
    assert np.isfinite(out.evaluation.metrics["pr_auc"])
