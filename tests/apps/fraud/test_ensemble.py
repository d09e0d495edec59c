"""Seed ensembles of the fraud backbone (``ensemble_size``, ``model.FraudEnsemble``): the
mean logit and its attributions against the members, the config checks, and fits through
the real protocol (Lightning Trainer, calibration, threshold) where member 0 is the
single-model run bit for bit and a saved ensemble reloads to the same scores and reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.fraud.config import FraudConfigError, load_config
from apps.fraud.distillation import distill_fit_predictor, distill_mlp_predictor
from apps.fraud.metrics import average_precision
from apps.fraud.model import FraudEnsemble, FraudModel, fraud_model_from_hparams
from apps.fraud.predictor import FraudPredictor
from apps.fraud.training import fit
from core.config import small_backbone
from core.distill import DistillConfig, count_active_params
from core.engine import member_seed
from tests.apps.fraud.fraud_model_helpers import tiny_config


def _member(seed: int, n_numeric: int = 3) -> FraudModel:
    torch.manual_seed(seed)
    return FraudModel(
        small_backbone(d_model=16), n_numeric=n_numeric, cat_cardinalities=[4], row_mlp=(8,)
    ).eval()


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return {
        "x_num": torch.from_numpy(rng.normal(size=(n, 3)).astype(np.float32)),
        "x_cat": torch.from_numpy(rng.integers(0, 4, size=(n, 1))),
    }


def test_ensemble_scores_and_explains_with_the_members_means() -> None:
    members = [_member(0), _member(1), _member(2)]
    ens = FraudEnsemble(members).eval()
    batch = _batch()
    logits = torch.stack([m(batch) for m in members])
    assert logits.std(0).min() > 1e-4  # the members differ, so the mean is a real test
    torch.testing.assert_close(ens(batch), logits.mean(0))
    logit_B, contrib_BK = ens.attributions(batch)
    outs = [m.attributions(batch) for m in members]
    torch.testing.assert_close(logit_B, logits.mean(0))
    torch.testing.assert_close(contrib_BK, torch.stack([o[1] for o in outs]).mean(0))
    assert contrib_BK.shape == (6, 4)  # 3 numeric + 1 categorical, as for one member


def test_ensemble_rebuilds_from_its_hparams() -> None:
    ens = FraudEnsemble([_member(0), _member(1)])
    assert ens.hparams["n_members"] == 2 and ens.history_len == 0
    again = fraud_model_from_hparams(ens.hparams)
    assert isinstance(again, FraudEnsemble) and len(again.members) == 2
    again.load_state_dict(ens.state_dict())
    torch.testing.assert_close(again.eval()(_batch()), ens(_batch()))
    single = fraud_model_from_hparams(dict(_member(0).hparams))
    assert isinstance(single, FraudModel)


def test_ensemble_rejects_members_that_read_different_inputs() -> None:
    with pytest.raises(ValueError, match="different inputs"):
        FraudEnsemble([_member(0, n_numeric=3), _member(1, n_numeric=4)])
    with pytest.raises(ValueError, match="at least one member"):
        FraudEnsemble([])


def test_config_checks_the_ensemble_size() -> None:
    cfg = load_config("demo")
    assert cfg.ensemble_size == 1
    for bad in (0, -2):
        with pytest.raises(FraudConfigError, match=f"ensemble_size={bad}: expected >= 1"):
            cfg.with_overrides({"ensemble_size": bad})
    with pytest.raises(FraudConfigError, match="expected an integer"):
        cfg.with_overrides({"ensemble_size": 2.5})
    with pytest.raises(FraudConfigError, match="refit_on_validation"):
        cfg.with_overrides({"ensemble_size": 2, "refit_on_validation": True})


def test_fit_trains_members_whose_mean_is_the_model(tmp_path) -> None:
    cfg = tiny_config(tmp_path, row_mlp=[16, 8], select_best="val/ap")
    cfg.model.d_model, cfg.model.n_layers, cfg.model.moe = 16, 1, None
    cfg.trainer.max_epochs = 1
    cfg.baseline.enabled = False
    single = fit(cfg)
    cfg.ensemble_size = 2
    out = fit(cfg, data=single.data)
    model = out.predictor.model
    assert isinstance(model, FraudEnsemble) and len(model.members) == 2
    data = out.data
    valid, test = data.split.valid, data.split.test
    arrays = out.inputs.take(test[:300])

    # member 0 is the single-model run to the bit; member 1 is another model
    solo = single.predictor.score_inputs(arrays)[0]
    m0, m1 = (
        FraudPredictor(m, out.inputs, {"method": "none"}, {"alert": 0.5}) for m in model.members
    )
    np.testing.assert_array_equal(m0.score_inputs(arrays)[0], solo)
    assert np.abs(m1.score_inputs(arrays)[0] - solo).max() > 1e-3
    np.testing.assert_allclose(
        out.predictor.score_inputs(arrays)[0],
        (m0.score_inputs(arrays)[0] + m1.score_inputs(arrays)[0]) / 2,
        rtol=0,
        atol=1e-6,
    )
    # what the run reports: each member's own best epoch, the ensemble's validation AP
    assert out.extra["member_seeds"] == [cfg.seed, member_seed(cfg.seed, 1)]
    assert out.extra["best_epoch"][0] == single.extra["best_epoch"]
    assert out.extra["member_best_val_ap"][0] == single.extra["best_val_ap"]
    val_logits = out.predictor.score_inputs(out.inputs.take(valid))[0]
    assert out.extra["best_val_ap"] == pytest.approx(
        average_precision(data.y[valid], val_logits), abs=1e-9
    )

    out.predictor.save(tmp_path / "model")
    loaded = FraudPredictor.load(tmp_path / "model")
    assert isinstance(loaded.model, FraudEnsemble)
    np.testing.assert_allclose(
        loaded.score_inputs(arrays)[1], out.predictor.score_inputs(arrays)[1], rtol=0, atol=1e-7
    )
    assert loaded.explain_inputs(arrays) == out.predictor.explain_inputs(arrays)

    # an ensemble teaches through its logits; hidden-state matching needs one backbone
    student_cfg = tiny_config(tmp_path)
    student_cfg.student.kind, student_cfg.student.epochs = "mlp", 1
    mlp = distill_mlp_predictor(student_cfg, out.predictor, data=data)
    assert mlp.teacher_active_params == 2 * count_active_params(single.predictor.model)
    with pytest.raises(FraudConfigError, match="2-member ensemble teacher"):
        distill_fit_predictor(
            cfg, out.predictor, DistillConfig(hidden_weight=0.5, layer_map={0: 0}), data=data
        )
