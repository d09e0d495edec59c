"""bench/scale_bench.py: the growth experiment's exactness, control run and verdict; the
scoring-throughput summary; the tiny paths run end to end on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import scale_bench as sb
from core.growth import apply_growth

torch.set_num_threads(1)


def _args(*extra: str):
    return sb.parse_args(["--device", "cpu", "--tiny", "--no-record", *extra])


def test_growth_schedule_turns_small_into_large_exactly() -> None:
    args = sb.parse_args(["--growth-small", "d16,L1,F32", "--growth-large", "d64,L4,F256"])
    large, small, large_s, small_s = sb.growth_configs(args)
    torch.manual_seed(0)
    model = sb.rul_model(small, n_channels=14).eval()
    x = torch.randn(6, 40, 14)
    mask = torch.zeros(6, 40, dtype=torch.bool)
    mask[:2, :17] = True  # early-life windows, left padded
    before = model({"x": x, "mask": mask})
    sched = sb.growth_schedule(small_s, large_s, at=0)
    assert [s.operator for s in sched.steps] == ["grow_depth", "grow_width"]
    for step in sched.steps:
        apply_growth(model, step.operator, **step.kwargs)
    after = model({"x": x, "mask": mask})
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    c = model.backbone.cfg
    assert (c.d_model, c.n_layers, c.ffn_hidden, c.attention.n_heads) == (64, 4, 256, 4)
    n_grown = sum(p.numel() for p in model.parameters())
    assert n_grown == sum(p.numel() for p in sb.rul_model(large, 14).parameters())
    # the new channels learn: non-zero gradients reach the zero-initialised rows
    model.train()
    model.loss(model({"x": x, "mask": mask}), {"rul": torch.rand(6) * 150}).backward()
    assert model.patch_embed.proj.weight.grad[16:].abs().sum() > 0
    assert model.rul_head[2].weight.grad[:, 16:].abs().sum() > 0


def test_growth_schedule_rejects_a_smaller_large_model() -> None:
    with pytest.raises(ValueError, match="must not be smaller"):
        sb.growth_schedule(
            {"d_model": 32, "n_layers": 2, "ffn_hidden": 64},
            {"d_model": 16, "n_layers": 4, "ffn_hidden": 64},
            at=10,
        )
    with pytest.raises(ValueError, match="must give d, L and F"):
        sb.parse_size("d16,L1")


def test_growth_verdict_needs_a_control_that_misses_L() -> None:
    # control reached L: the saving is recorded as computed but not valid
    saving, valid, reason = sb.growth_verdict(100.0, 40.0, 300, 0.9, 1.0)
    assert (saving, valid) == (pytest.approx(0.6), False) and "step 300" in reason
    # grown run never reached L
    assert sb.growth_verdict(100.0, None, None, 1.2, 1.0)[:2] == (None, False)
    # the honest case
    assert sb.growth_verdict(100.0, 55.0, None, 1.2, 1.0) == (pytest.approx(0.45), True, None)


def test_throughput_summary_uses_the_largest_batch() -> None:
    rows = [
        {"model": "teacher", "w": {65536: 1e6, 1024: 4e5}},
        {"model": "student_distilled", "w": {65536: 3.5e6, 1024: 5e5}},
        {"model": "student_scratch", "w": {65536: 3.4e6, 1024: 4.8e5}},
    ]
    s = sb.throughput_summary(rows, "w")
    assert s["target_batch"] == 65536
    assert s["student_speedup_at_target_batch"] == pytest.approx(3.5)
    assert s["throughput_target_3x_met"] is True
    assert s["student_distilled_speedup_vs_teacher"][1024] == pytest.approx(1.25)


def test_score_throughput_repeats_rows_up_to_the_batch() -> None:
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, batch):
            calls.append((batch["x"].shape[0], torch.is_inference_mode_enabled(), self.training))
            return batch["x"].sum(-1)

    rate = sb.score_throughput(Probe(), {"x": np.ones((5, 3), np.float32)}, 12, "cpu")
    assert rate > 0
    assert set(calls) == {(12, True, False)}


def test_tiny_growth_run_records_the_control(tmp_path) -> None:
    args = _args("--apps", "maintenance", "--skip-distill")
    assert args.growth_epochs == 2
    out = sb.run_maintenance_growth(args)
    value, d = out["growth_flops_saving"]
    assert d["grown_final_is_large_architecture"] is True
    assert isinstance(d["small_only_reached_L"], bool)
    assert len(d["curve_small_only"]) == len(d["curve_grow"]) == d["epochs"]["grow_and_control"]
    # grown and control runs are the same run until the growth step
    pre = [(s, v) for s, v in d["curve_grow"] if s <= d["grow_at_step"]]
    assert pre, "the tiny run must validate once before it grows"
    assert pre == d["curve_small_only"][: len(pre)]
    assert d["target_val_loss_L"] == min(v for _, v in d["curve_scratch"])
    if d["small_only_reached_L"] or d["grow_step_at_L"] is None:
        assert value is None and d["valid"] is False and d["invalid_reason"]
    else:
        assert d["valid"] is True
        assert value == pytest.approx(1 - d["flops_grow"] / d["flops_scratch"])


@pytest.mark.parametrize("detector", ["token", "dense"])
def test_tiny_medical_distillation_rows(tmp_path, detector) -> None:
    args = _args(
        "--apps",
        "medical",
        "--medical-data",
        str(tmp_path / "npz_data"),
        "--medical-detector",
        detector,
    )
    value, d = sb.run_medical_distill(args)["medical_student_retention"]
    assert all("validation_cpm" in r for r in d["rows"])  # what chose the NMS radius
    assert d["detector"].startswith(detector)
    assert (tmp_path / "npz_data" / "npz").is_dir()  # the medical_bench npz layout
    names = [r["model"] for r in d["rows"]]
    assert names == ["teacher", "student_distilled", "student_scratch"]
    assert d["n_train_series"] + d["n_heldout_series"] == 4 and d["n_heldout_series"] >= 1
    assert d["teacher_over_student_active_params"] >= 4
    teacher, student = d["rows"][0], d["rows"][1]
    assert all(0.0 <= r["cpm"] <= 1.0 for r in d["rows"])
    expected = student["cpm"] / teacher["cpm"] if teacher["cpm"] > 0 else 0.0
    assert value == pytest.approx(expected)
    assert d["rows"][1]["active_params"] == d["rows"][2]["active_params"]


def _saved_dense_teacher(tmp_path):
    """``(argv base, teacher config, data root, saved predictor)``: the tiny npz phantoms
    and an untrained dense detector saved under ``tmp_path / "teacher"``."""
    from apps.medical.predictor import NoduleDetector, build_detector

    data = tmp_path / "npz_data"
    base = ("--apps", "medical", "--medical-data", str(data), "--medical-detector", "dense")
    args = _args(*base)
    root = sb.medical_data(args)
    tcfg, _ = sb.medical_configs(args, root)
    torch.manual_seed(3)
    saved = NoduleDetector(tcfg, build_detector(tcfg), None)
    saved.save(tmp_path / "teacher")
    return base, tcfg, root, saved


def test_tiny_medical_distillation_from_a_saved_teacher(tmp_path) -> None:
    """--medical-teacher-dir: the saved detector is the teacher (not retrained), its rows
    are scored like a trained one, and a teacher on another grid is refused."""
    from apps.medical.predictor import NoduleDetector

    base, tcfg, _, saved = _saved_dense_teacher(tmp_path)
    value, d = sb.run_medical_distill(
        _args(*base, "--medical-teacher-dir", str(tmp_path / "teacher"))
    )["medical_student_retention"]
    assert d["train_seconds"]["teacher"] is None and d["teacher_dir"] == str(tmp_path / "teacher")
    n_saved = sum(p.numel() for p in saved.detector.parameters())
    assert d["rows"][0]["active_params"] <= n_saved
    assert d["teacher_over_student_active_params"] >= 4
    assert 0.0 <= value

    assert d["hidden_matching"] is None
    # hidden-state matching: student block i -> teacher block i * Lt / Ls, trained end to end
    # (with both students' weights averaged, --medical-ema-decay, in the same run)
    args_h = _args(
        *base,
        "--medical-teacher-dir",
        str(tmp_path / "teacher"),
        "--medical-hidden-weight",
        "0.5",
        "--medical-ema-decay",
        "0.9",
    )
    t_h, scfg = sb.medical_configs(args_h, sb.medical_data(args_h))
    assert t_h.detector.trainer.ema_decay is None  # the teacher's recipe is not touched
    assert scfg.detector.trainer.ema_decay == scfg.fp_reduction.trainer.ema_decay == 0.9
    ls, lt = scfg.detector.backbone.n_layers, tcfg.detector.backbone.n_layers
    want = {i: round(i * lt / ls) for i in range(1, ls + 1)}
    assert max(want.values()) == lt
    value_h, d_h = sb.run_medical_distill(args_h)["medical_student_retention_ema0.9"]
    assert d_h["student_ema_decay"] == 0.9
    assert d_h["hidden_matching"] == {"hidden_weight": 0.5, "layer_map": want}
    assert 0.0 <= value_h and d_h["rows"][1]["cpm"] >= 0.0

    other = NoduleDetector.load(tmp_path / "teacher")
    other.config.spacing_zyx = (4.0, 4.0, 4.0)
    other.save(tmp_path / "teacher_4mm")
    with pytest.raises(ValueError, match="spacing"):
        sb.load_medical_teacher(tmp_path / "teacher_4mm", tcfg)


def test_tiny_medical_distillation_with_an_unlabeled_transfer_set(tmp_path) -> None:
    """--medical-unlabeled-series 2: two extra phantoms (their truth never read) join the
    distilled student's crops; the labelled, held-out and scratch sides stay those of the
    4-series set, the figure gets its own key, and a folder without extras is refused."""
    from apps.medical.data import read_truth
    from apps.medical.predictor import NoduleDetector, build_detector
    from bench.medical_bench import EXTRA_TRAIN_FILE

    data = tmp_path / "npz_extra"
    base = ("--apps", "medical", "--medical-data", str(data), "--medical-detector", "dense")
    args = _args(*base, "--medical-unlabeled-series", "2")
    root = sb.medical_data(args)
    extras = (root / EXTRA_TRAIN_FILE).read_text().split()
    assert len(extras) == 2 and not set(extras) & set(read_truth(root).seriesuids)
    tcfg, _ = sb.medical_configs(args, root)
    torch.manual_seed(3)
    NoduleDetector(tcfg, build_detector(tcfg), None).save(tmp_path / "teacher")
    out = sb.run_medical_distill(
        _args(
            *base,
            "--medical-unlabeled-series",
            "2",
            "--medical-teacher-dir",
            str(tmp_path / "teacher"),
            "--medical-skip-scratch",
        )
    )
    value, d = out["medical_student_retention_unlabeled2"]
    assert d["unlabeled_transfer_series"] == 2
    assert d["n_train_series"] + d["n_heldout_series"] == 4
    # --medical-skip-scratch: teacher and distilled student only
    assert [r["model"] for r in d["rows"]] == ["teacher", "student_distilled"]
    assert d["distilled_beats_scratch"] is None and d["train_seconds"]["scratch"] is None
    t_cpm = d["rows"][0]["cpm"]  # an untrained tiny teacher may find nothing
    assert value == pytest.approx(d["rows"][1]["cpm"] / t_cpm if t_cpm > 0 else 0.0)
    (root / EXTRA_TRAIN_FILE).write_text("")
    with pytest.raises(SystemExit, match="holds 0 extra training series"):
        sb.medical_transfer_set(args, root, tcfg)


def test_tiny_medical_scratch_only(tmp_path) -> None:
    """--medical-skip-distilled: teacher and scratch student only, under their own key (the
    scratch twin of a recorded distilled run); skipping both students is refused."""
    base, _, _, _ = _saved_dense_teacher(tmp_path)
    argv = (*base, "--medical-teacher-dir", str(tmp_path / "teacher"))
    out = sb.run_medical_distill(_args(*argv, "--medical-skip-distilled"))
    assert list(out) == ["medical_student_scratch_cpm"]
    value, d = out["medical_student_scratch_cpm"]
    assert [r["model"] for r in d["rows"]] == ["teacher", "student_scratch"]
    assert value == d["rows"][1]["cpm"] and d["train_seconds"]["distill"] is None
    assert d["distilled_beats_scratch"] is None and d["teacher_over_student_active_params"] >= 4
    t_cpm = d["rows"][0]["cpm"]
    assert d["scratch_retention"] == (pytest.approx(value / t_cpm) if t_cpm > 0 else None)
    with pytest.raises(SystemExit):
        _args(*argv, "--medical-skip-distilled", "--medical-skip-scratch")


def test_tiny_medical_scoring_speed(tmp_path) -> None:
    """--medical-scoring-only: teacher and student architecture timed per crop and per whole
    held-out scan (the sliding-window path, equal window batches); no training."""
    from apps.medical.dense import sliding_window_dense
    from apps.medical.predictor import NoduleDetector

    base, tcfg, root, _ = _saved_dense_teacher(tmp_path)
    argv = (*base, "--medical-teacher-dir", str(tmp_path / "teacher"), "--medical-scoring-only")
    value, d = sb.run_medical_scoring_speed(
        _args(*argv, "--medical-scoring-scans", "1", "--medical-scoring-batch", "2")
    )["medical_student_scoring_speedup"]
    teacher, student = d["rows"]
    assert value == pytest.approx(student["scans_per_s"] / teacher["scans_per_s"])
    assert teacher["scans_per_s"] > 0 and student["scans_per_s"] > 0
    assert teacher["active_params"] > student["active_params"]
    assert d["n_scans"] == 1 and d["window_batch"] == 2
    assert d["scoring_target_3x_met"] == (value >= 3.0)
    with pytest.raises(SystemExit, match="needs --medical-teacher-dir"):
        sb.run_medical_scoring_speed(_args(*base, "--medical-scoring-only"))

    # the window batch changes the speed only: the heat map is the same
    from apps.medical.data import load_prepared, read_truth

    scan = load_prepared(tcfg, root, read_truth(root).seriesuids[:1])[0]
    dc = tcfg.detector
    det = NoduleDetector.load(tmp_path / "teacher").detector.eval()
    with torch.inference_mode():
        maps = [
            sliding_window_dense(det, scan.image, dc.crop_zyx, dc.stride_zyx, b) for b in (1, 3)
        ]
    torch.testing.assert_close(maps[0], maps[1], rtol=0, atol=1e-5)


def test_fraud_keys_name_the_set() -> None:
    """A handbook (or any non-ULB) run records under its own key, so it never overwrites
    the ULB figure ``fraud_student_retention``."""
    for config, key in (
        ("ulb", "fraud_student_retention"),
        ("demo", "fraud_student_retention"),
        ("handbook", "fraud_student_retention_handbook"),
        ("configs/mine.yaml", "fraud_student_retention_mine"),
    ):
        assert sb.fraud_key(sb.parse_args(["--fraud-config", config])) == key


def test_tiny_fraud_backbone_student_run() -> None:
    """The default fraud student (the shrunk backbone): teacher, distilled and scratch rows
    on the same test block, retention = distilled AP / teacher AP."""
    args = sb.parse_args(["--device", "cpu", "--tiny", "--apps", "fraud", "--no-record"])
    value, d = sb.run_fraud_distill(args)["fraud_student_retention"]
    names = [r["model"] for r in d["rows"]]
    assert names == ["teacher", "student_distilled", "student_scratch"]
    teacher, dist, scratch = d["rows"]
    assert value == pytest.approx(dist["pr_auc"] / teacher["pr_auc"])
    assert 0.0 < dist["pr_auc"] <= 1.0 and 0.0 < teacher["pr_auc"] <= 1.0
    assert dist["active_params"] == scratch["active_params"] < teacher["active_params"]
    assert d["teacher_over_student_active_params"] == pytest.approx(
        teacher["active_params"] / dist["active_params"]
    )
    assert d["distilled_beats_scratch"] == (dist["pr_auc"] > scratch["pr_auc"])


def test_threads_option_overrides_the_device_default() -> None:
    """--threads sets torch's CPU threads on either device; without it the CPU run keeps at
    most 2 and a CUDA run leaves torch's default alone."""
    assert sb.cpu_threads(sb.parse_args(["--device", "cuda", "--threads", "3"])) == 3
    assert sb.cpu_threads(sb.parse_args(["--device", "cpu", "--threads", "1"])) == 1
    assert sb.cpu_threads(sb.parse_args(["--device", "cuda"])) is None
    assert 1 <= sb.cpu_threads(sb.parse_args(["--device", "cpu"])) <= 2
    with pytest.raises(ValueError, match="--threads 0"):
        sb.cpu_threads(sb.parse_args(["--threads", "0"]))


def test_fraud_transfer_rows_and_equal_steps() -> None:
    """``--fraud-transfer-delay`` draws a seeded share of the delay block only, and the
    distilled student's epochs shrink so both students take (nearly) the same steps."""
    from types import SimpleNamespace

    from apps.fraud.config import load_config

    scfg = load_config("demo")
    scfg.head.batch_size, scfg.head.neg_sample_rate, scfg.trainer.max_epochs = 100, 1.0, 32
    y = np.zeros(5_000, dtype=np.int64)
    y[::50] = 1
    split = SimpleNamespace(train=np.arange(0, 1_000), delay=np.arange(2_000, 4_000))
    data = SimpleNamespace(split=split, y=y)
    args = sb.parse_args(["--fraud-transfer-delay", "--fraud-transfer-rate", "0.5"])
    rows = sb.fraud_transfer_rows(args, scfg, data)
    assert set(rows) <= set(split.delay) and 900 < len(rows) < 1_100
    np.testing.assert_array_equal(rows, sb.fraud_transfer_rows(args, scfg, data))
    steps = sb.fraud_student_steps(scfg, data, rows)
    per_all = -(-(1_000 + len(rows)) // 100)
    assert steps["scratch"] == 32 * 10 and steps["scratch_epochs"] == 32
    assert steps["distilled_epochs"] == round(320 / per_all)
    assert steps["distilled"] == steps["distilled_epochs"] * per_all
    assert abs(steps["distilled"] - steps["scratch"]) <= per_all / 2
    assert sb.fraud_student_steps(scfg, data, None)["distilled"] == 320
    assert sb.fraud_transfer_rows(sb.parse_args([]), scfg, data) is None
    split.delay = np.array([], dtype=np.int64)
    with pytest.raises(SystemExit, match="no delay block"):
        sb.fraud_transfer_rows(args, scfg, data)
    with pytest.raises(SystemExit):  # the MLP student has its own delay option
        sb.parse_args(["--fraud-transfer-delay", "--fraud-student", "mlp"])
    with pytest.raises(SystemExit):  # without a transfer set no row is unlabelled
        sb.parse_args(["--fraud-teacher-rows", "unlabelled"])
    both = sb.parse_args(["--fraud-transfer-delay", "--fraud-teacher-rows", "unlabelled"])
    assert sb.fraud_distill_config(both)["teacher_rows"] == "unlabelled"
