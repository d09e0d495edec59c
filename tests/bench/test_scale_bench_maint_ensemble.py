"""bench/scale_bench.py, maintenance ``--maint-teacher ensemble``: the FD001 recipe's seed
ensemble as the teacher (the app's distillation with an ensemble teacher is tested in
tests/apps/maintenance/test_distillation_ensemble.py). The bench's teacher and student
configs, its throughput forward over all members, the tiny path end to end with the real
Lightning Trainer on the SYN sample, and the per-seed merging of recorded runs."""

from __future__ import annotations

import copy

import pytest
import torch

from bench import scale_bench as sb
from core.distill import count_active_params

torch.set_num_threads(1)


def _args(*extra: str):
    return sb.parse_args(["--device", "cpu", "--tiny", "--no-record", *extra])


@pytest.fixture(scope="module")
def tiny_teacher():
    """(teacher predictor, data, teacher config, student config): a 3-member tiny ensemble."""
    from apps.maintenance.data import prepare_data
    from apps.maintenance.training import fit

    args = _args("--apps", "maintenance", "--maint-teacher", "ensemble")
    tcfg, scfg = sb.maintenance_configs(args)
    data = prepare_data(tcfg)
    teacher = fit(tcfg, data=data, device="cpu").predictor
    return teacher, data, tcfg, scfg


def test_default_teacher_is_the_single_model_and_students_do_not_change() -> None:
    assert sb.parse_args([]).maint_teacher == "single"
    t_single, s_single = sb.maintenance_configs(sb.parse_args(["--seed", "1"]))
    t_ens, s_ens = sb.maintenance_configs(
        sb.parse_args(["--seed", "1", "--maint-teacher", "ensemble"])
    )
    assert t_single.ensemble_size == 1 and t_single.model.d_model == 64
    assert t_ens.ensemble_size == 3 and t_ens.model.d_model == 32  # fd001.yaml as shipped
    # the student (and so the scratch student) is the same model with either teacher
    assert s_single.model == s_ens.model
    assert (s_ens.model.d_model, s_ens.model.n_layers, s_ens.model.moe) == (32, 2, None)
    assert s_single.ensemble_size == s_ens.ensemble_size == 1
    same_budget = ("steps_per_epoch", "batch_size", "seed", "train_stride", "window")
    assert [getattr(s_single, k) for k in same_budget] == [getattr(s_ens, k) for k in same_budget]
    assert s_single.trainer == s_ens.trainer


def test_active_params_and_throughput_count_every_member(tiny_teacher) -> None:
    from apps.maintenance.model import RULEnsemble
    from apps.maintenance.training import build_model

    teacher, _, tcfg, _ = tiny_teacher
    tcfg = copy.deepcopy(tcfg)
    ens = teacher.model
    n_ch = int(ens.hparams["n_channels"])
    per_member = [count_active_params(m) for m in ens.members]
    assert count_active_params(ens) == sum(per_member) == 3 * per_member[0]
    assert count_active_params(ens.members[0]) == per_member[0]
    # active, not total: with MoE layers (2 of 4 routed experts run) each member counts fewer
    tcfg.model.n_dense_layers = 1
    moe = [build_model(tcfg, n_ch) for _ in range(2)]
    moe_ens = RULEnsemble(moe)
    total = sum(p.numel() for p in moe_ens.parameters())
    assert count_active_params(moe_ens) == 2 * count_active_params(moe[0]) < total
    # the scoring forward runs all members and returns their mean output
    fwd = sb.scoring_module(ens)
    assert isinstance(fwd, sb.AllMembersForward) and sb.scoring_module(moe[0]) is moe[0]
    batch = {
        "x": torch.randn(5, tcfg.window, n_ch),
        "mask": torch.zeros(5, tcfg.window, dtype=torch.bool),
    }
    with torch.no_grad():
        want = torch.stack([m.eval()(batch) for m in ens.members]).mean(0)
        torch.testing.assert_close(fwd.eval()(batch), want)
    assert sb.score_throughput(fwd, {k: v.numpy() for k, v in batch.items()}, 8, "cpu") > 0


def test_tiny_ensemble_teacher_run_end_to_end() -> None:
    args = _args("--apps", "maintenance", "--skip-growth", "--maint-teacher", "ensemble")
    value, d = sb.run_maintenance_distill(args)["maintenance_student_retention"]
    names = [r["model"] for r in d["rows"]]
    assert names == ["teacher", "student_distilled", "student_scratch"]
    t, dist, scratch = d["rows"]
    assert value == pytest.approx(t["rmse_capped"] / dist["rmse_capped"])
    assert d["teacher"].startswith("fd001 recipe ensemble: mean of 3 members")
    assert d["teacher_unchanged_by_distillation"] is True
    assert dist["active_params"] == scratch["active_params"]
    assert d["teacher_over_student_active_params"] == pytest.approx(
        t["active_params"] / dist["active_params"]
    )
    assert d["teacher_over_student_active_params"] >= 4
    assert d["distilled_beats_scratch"] == (dist["rmse_capped"] < scratch["rmse_capped"])
    row = d["per_seed"]["0"]
    assert row["retention"] == pytest.approx(value)
    assert set(t["windows_per_s"]) == {256, 64}
    # validation RMSE (policy units) per model, for choosing recipes without the test units
    for r in d["rows"]:
        assert 0 < r["validation_rmse_capped"] < 200
    assert row["distilled_validation_rmse"] == dist["validation_rmse_capped"]
    assert d["run_config"]["distill_mixup"] == 0.0
    assert d["run_config"]["column_weights"] == "task"
    assert d["teacher_column_weights"] == [1.0, 0.1]  # fd001: alarm_loss_weight 0.1


def test_mixup_students_are_a_separate_recorded_comparison() -> None:
    assert sb.maint_retention_key(_args()) == "maintenance_student_retention"
    args = _args("--maint-distill-mixup", "1")
    assert sb.maint_retention_key(args) == "maintenance_student_retention_mixup1"
    assert sb.maint_retention_key(_args("--maint-distill-mixup", "0.5")).endswith("_mixup0.5")
    # the plain-mean teacher term (before session 18) is its own comparison too
    mean = _args("--maint-column-weights", "mean", "--maint-distill-mixup", "1")
    assert sb.maint_retention_key(mean) == "maintenance_student_retention_mixup1_colmean"
    assert sb.maint_column_weights(mean) == [0.5, 0.5] and sb.maint_column_weights(args) == []
    tcfg, scfg = sb.maintenance_configs(args)
    # only the distilled student reads it; the teacher and the scratch fit never do
    assert scfg.distill_mixup == 1.0 and tcfg.distill_mixup == 0.0
    assert sb.maint_run_config(args)["distill_mixup"] == 1.0


def test_merge_seed_runs_averages_seeds_of_the_same_config() -> None:
    def details(seed: int, ret: float, cfg: str) -> dict:
        row = {
            "teacher_rmse": 12.0,
            "distilled_rmse": 12.0 / ret,
            "scratch_rmse": 12.5,
            "retention": ret,
            "scratch_retention": 12.0 / 12.5,
            "distilled_beats_scratch": 12.0 / ret < 12.5,
            "teacher_lead": 20.0,
            "distilled_lead": None,
            "scratch_lead": 22.0,
            "speedup_target_batch": 3.0 + seed,
            "teacher_over_student_active_params": 4.2,
            "wall_seconds": 1.0,
        }
        return {"run_config": {"teacher": cfg}, "per_seed": {str(seed): row}}

    v0, d0 = sb.merge_seed_runs(None, details(0, 1.0, "ens"))
    assert v0 == pytest.approx(1.0) and d0["seeds"] == [0]
    v1, d1 = sb.merge_seed_runs({"value": v0, "details": d0}, details(1, 0.9, "ens"))
    assert v1 == pytest.approx(0.95) and d1["seeds"] == [0, 1]
    m = d1["mean_over_seeds"]
    assert m["speedup_target_batch"] == pytest.approx(3.5) and m["distilled_lead"] is None
    assert m["distilled_beats_scratch_seeds"] == 1 and m["n_seeds"] == 2
    # the same seed again replaces its row; another config starts over
    v2, d2 = sb.merge_seed_runs({"value": v1, "details": d1}, details(1, 0.8, "ens"))
    assert v2 == pytest.approx(0.9) and d2["seeds"] == [0, 1]
    v3, d3 = sb.merge_seed_runs({"value": v2, "details": d2}, details(2, 0.7, "single"))
    assert v3 == pytest.approx(0.7) and d3["seeds"] == [2]
