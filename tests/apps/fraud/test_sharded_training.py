"""The fraud app's training under ``trainer.strategy: fsdp2`` (one gloo process on CPU).

FSDP2 shards the model during training; what the app keeps afterwards must be a plain
single-device model: its predictor scores, and its test metrics are of the same quality as
the unsharded run's (the sharded path's arithmetic equals the unsharded one, tested in
``tests/core/test_sharding.py``; only the data order differs here, since Lightning gives
distributed strategies a distributed sampler)."""

from __future__ import annotations

import numpy as np
import pytest

from apps.fraud.metrics import average_precision
from core.sharding import is_sharded


def test_fsdp2_training_gives_a_plain_model_of_the_same_quality(
    tmp_path, tiny_fraud_run, clean_dist_env
):
    from apps.fraud.training import fit
    from tests.apps.fraud.fraud_model_helpers import tiny_config

    cfg = tiny_config(tmp_path)
    cfg.trainer.strategy = "fsdp2"
    out = fit(cfg)
    model = out.predictor.model
    assert not is_sharded(model)
    assert all(p.device.type == "cpu" for p in model.parameters())

    test = out.data.split.test
    rand = average_precision(out.data.y[test], np.random.default_rng(0).random(len(test)))
    sharded_ap = out.evaluation.metrics["pr_auc"]
    plain_ap = tiny_fraud_run[1].evaluation.metrics["pr_auc"]
    assert sharded_ap > 3 * rand
    assert sharded_ap == pytest.approx(plain_ap, abs=0.15)

    scored = out.predictor.predict(out.data.raw.head(50).to_pandas())
    assert len(scored) == 50 and scored["score"].between(0, 1).all()
