"""Distillation and progressive growth, measured per app (issue #6).

    python -m bench.scale_bench --device cuda --apps maintenance --skip-distill \
        --data-dir <cmapss>                                  # growth, FD004, H200 ~4 min
    python -m bench.scale_bench --device cuda --apps maintenance --skip-growth \
        --data-dir <cmapss> --teacher-epochs 15 --student-epochs 30 \
        --maint-teacher ensemble --seed S --threads 3     # headline, S = 0-4; H200 ~4 min
    python -m bench.scale_bench --device cuda --apps medical \
        --medical-data keel_outputs/medical_bench_data64               # H200 ~5 min
    python -m bench.scale_bench --device cpu --tiny --no-record --apps maintenance medical

**Distillation** (per app): train a teacher (>= 4x the student's active parameters), distil
a student from it (``apps/<app>/distillation.py``: same data, protocol and evaluation as
the app's training), and train the same student from scratch with the same budget (same
config, epochs, seed). Reported for all three: the app's primary metric on its held-out
data under the official protocol (maintenance: RMSE capped at 125 on the C-MAPSS test
units + median lead time on held-out run-to-failure units; fraud: test-block PR-AUC;
medical: LUNA16 CPM on the held-out synthetic series), active parameters, and scoring
throughput: rows / s of one fp32 forward (the apps' predictors do not autocast) under
``torch.inference_mode`` on inputs already on the device, median after warm-up, at each
``--score-batches`` size (default 65,536 and 1,024 rows: maintenance windows, fraud
rows; medical: stage-1 crops, capped at 1,024). Batch scoring runs large batches, and at
1,024 rows the H200 is launch-bound, so the 3x target is checked at the largest batch
(``details.throughput``). ``<app>_student_retention`` = student metric / teacher metric
oriented so higher is better (maintenance: teacher_rmse / student_rmse; fraud and
medical: student / teacher).

Maintenance teacher (``--maint-teacher``): ``single`` (default; session 4) is one model of the
FD001 recipe widened to ``--maint-teacher-d`` (default d64, 5.4x the student's active
parameters); ``ensemble`` is the FD001 recipe as shipped, ``ensemble_size`` (3) d32 members
with their own seeds, each trained ``--teacher-epochs``, and the teacher term targets the
ensemble's mean prediction (``apps.maintenance.distillation``, stored soft labels). An ensemble's active parameters
are the sum over its members and its throughput is all members' forward (every member runs
on every window). Students (distilled and scratch, d32, 2 blocks) are the same with either
teacher. Each run adds its seed to ``details.per_seed`` of a recorded entry with the same
``run_config``; the recorded value is the mean over those seeds of the per-seed retention.

Fraud: the student is the teacher's backbone shrunk to ``--fraud-student-d`` x
``--fraud-student-layers`` (dense); its teacher term is ``--fraud-distill-kind`` (``binary``:
tempered two-class KL; ``regression``: ``--fraud-distill-loss`` on the logit), optionally
weighted per row like the task loss (``--fraud-class-weighted``: frauds by ``pos_weight``).
Both students keep their best epoch by validation AP. ``--fraud-transfer-delay`` (a protocol
with a delay block) adds a seeded share of the delay block, whose labels are not known at
training time, to the distilled student's batches with the teacher's logits as their only
target (key suffix ``_delay_transfer``); both students still take the same optimizer steps,
so the distilled one gets fewer, longer epochs. ``--fraud-teacher-rows unlabelled`` keeps
the teacher term off the labelled rows (labels there, the teacher on the transfer rows only;
key suffix ``_teacher_unlabelled``). ``--fraud-teacher-dir`` saves the
teacher after training and reuses it in later runs with the same config, epochs and seed.
``--fraud-student mlp``: the student is instead the fastscore MLP
(:mod:`apps.fraud.fastscore`, ``--fraud-mlp-hidden``, default 64, 32) fitted on the
teacher's stored logits over the train + validation rows (soft labels on more data than
the teacher trained on: it only trained on the train block, the validation block chose its
epoch) with core's teacher term (``--fraud-mlp-alpha``, default 1: MSE on the logit alone;
below 1 the rest of the loss is the scratch student's BCE on the labels, key suffix
``_alpha<a>``); the scratch control is the
same MLP with the same seed, rows, batches, steps and optimizer on the labels of those rows
(BCE weighted by the app's ``head.pos_weight`` rule). Fixed settings (``--fraud-mlp-*``),
no epoch selection (the validation rows are training rows). ``--fraud-student-seeds``
repeats the students for several seeds against one teacher; the key is the mean.
``--fraud-delay-soft-labels`` (a protocol with a delay block, e.g. ``--fraud-config
handbook``): a third MLP fits the teacher's logits on the train, validation and delay rows.
The delay block's labels are not known when the model is trained, so the scratch student
cannot use those rows and the teacher can label them: the issue's "soft labels on
unlabelled data". The key (``fraud_student_retention_<config>_delay_soft_labels``) then
reports that student against the scratch ones: the same epochs on the labelled rows, and as
many optimizer steps as the delay student (``student_scratch_same_steps``). With
``--fraud-mlp-alpha`` < 1 the delay student also keeps the labelled rows' labels (the delay
rows' labels are NaN there: teacher term only).

Medical (``--medical-detector``): the token detector with FP reduction, or the dense voxel
heat map (the shipped bench detector; tempered per-voxel KL, ``--medical-temperature``,
default 0.5 as chosen on validation), the ``synthetic_bench`` sizes for the teacher and
dense d=32 2-block students, on the npz phantoms of ``bench/medical_bench.py``
(``--medical-data``, default ``keel_outputs/medical_bench_data64``; made when absent,
which needs pydicom), so it runs without pydicom on a machine that has the folder.

**Growth** (maintenance, ``--growth-subset``, default FD004): a large dense model
(``--growth-large``, default d64 L4 FFN256) trained from scratch for ``--growth-epochs``
reaches validation loss ``L`` (its best per-epoch ``val/loss`` on the policy-validation
units); FLOPs_scratch = training FLOPs until that epoch. A small dense model
(``--growth-small``, default d16 L1 FFN32, ~1/90 of the FLOPs per sample) trains until
``--grow-at`` of the scratch run's steps, is grown by ``TrainerConfig.growth`` into the
large architecture (``grow_depth``: identity blocks; ``grow_width``: d_model with heads of
``--growth-head-dim`` kept, and the FFN; the RUL model's adapter and heads follow through
the ``grow_d_model`` hook of :class:`apps.maintenance.model.RULModel`; function-preserving) and continues
for ``--grow-budget`` x the scratch epochs; FLOPs_grow = training FLOPs until its first
epoch with validation loss <= L. Control: the small model alone, never grown, same budget
and schedule (identical to the grown run up to the growth step). ``growth_flops_saving =
1 - FLOPs_grow / FLOPs_scratch`` is recorded only when the control never reaches L (so the
saving is due to growth); otherwise, or when the grown run never reaches L, the value is
null with ``details.valid = false`` and ``invalid_reason`` (the would-be figure is in
``details.saving_computed``). FLOPs per step = samples x tokens per sample x
``Backbone.flops_per_token(tokens)`` (6 x active matmul params + attention), backbone only
(patch embedding and heads are tiny).

**ddp2** (``python -m bench.train_bench ddp2``, implemented here in :func:`cmd_ddp2`): 1 GPU
vs 2 GPUs with DDP and FSDP2, plain PyTorch and through ``core.engine``: weak-scaling and
same-global-batch throughput, per-GPU bytes of params + grads + AdamW state, loss curves,
sharded-checkpoint reload (``scale.json`` key ``ddp2_scaling_efficiency``); ``--tiny`` runs it
on CPU with gloo. **fsdp2-1gpu** (:func:`cmd_fsdp2_one_gpu`): FSDP2 through the engine against
the unsharded engine run on one device, bf16 and FP8 + compile (``fsdp2_one_gpu_max_loss_gap``).

No MLflow import anywhere on this path; fraud needs polars (skipped with a message when
absent); medical needs neither pydicom nor MONAI once its npz folder exists.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger

from bench.common import machine, record, time_fn
from core.distill import count_active_params
from core.growth import GrowthSchedule, GrowthStep

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


# ============================================================================ helpers


class CurveLogger(Logger):
    """A Lightning logger that only keeps ``(global_step, value)`` of chosen metrics."""

    def __init__(self, keys: tuple[str, ...] = ("val/loss",)) -> None:
        super().__init__()
        self.keys = keys
        self.curves: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}

    @property
    def name(self) -> str:
        return "curve"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Lightning passes the index of the last optimizer step: +1 = steps completed
        for k in self.keys:
            if k in metrics:
                self.curves[k].append((int(step or 0) + 1, float(metrics[k])))


def score_throughput(model: Any, arrays: dict[str, Any], batch: int, device: str) -> float:
    """Rows per second of one ``model(batch)`` forward over ``batch`` rows (the rows of
    ``arrays`` repeated cyclically up to ``batch``), already on ``device``, in eval mode under
    ``torch.inference_mode``, median of timed repetitions after warm-up. fp32 like the apps'
    predictors (none of them autocasts). Batch scoring jobs score large batches: at 1024
    rows an H200 is launch-bound and a 5x smaller model is barely faster, so both sizes
    are reported and the large one decides the 3x target."""
    import numpy as np

    n = len(next(iter(arrays.values())))
    idx = np.arange(batch) % n
    x = {k: torch.as_tensor(np.ascontiguousarray(v[idx]), device=device) for k, v in arrays.items()}
    model = model.to(device).eval()

    def fn() -> None:
        with torch.inference_mode():
            model(dict(x))

    t = time_fn(fn, warmup=2, reps=5 if device == "cpu" else 20)
    model.cpu()
    return batch / (t["median_ms"] / 1e3)


def score_batches(args: argparse.Namespace) -> list[int]:
    """The scoring batch sizes measured, largest first (the first decides the 3x target)."""
    if args.tiny:
        return [256, 64]
    return sorted({int(b) for b in args.score_batches}, reverse=True)


def throughput_summary(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Student / teacher scoring speed-up per batch size; the target check at the largest."""
    teacher = rows[0][key]
    out: dict[str, Any] = {
        f"{r['model']}_speedup_vs_teacher": {b: r[key][b] / teacher[b] for b in teacher}
        for r in rows[1:]
    }
    big = max(teacher, key=int)
    out["target_batch"] = big
    out["student_speedup_at_target_batch"] = rows[1][key][big] / teacher[big]
    out["throughput_target_3x_met"] = out["student_speedup_at_target_batch"] >= 3.0
    return out


def _device_trainer(cfg: Any, device: str, epochs: int, precision: str | None) -> None:
    cfg.trainer.accelerator = "gpu" if device == "cuda" else "cpu"
    cfg.trainer.devices = 1
    cfg.trainer.max_epochs = epochs
    cfg.trainer.enable_progress_bar = False
    cfg.trainer.enable_model_summary = False
    cfg.trainer.enable_checkpointing = False
    if precision:
        cfg.trainer.precision = precision


# ============================================================================ maintenance


def dense_student_model(teacher_model: Any, d_model: int, n_layers: int) -> Any:
    """The teacher's backbone config shrunk to a small dense student (2 heads, FFN 2 x d;
    the attention's gating and top-k kept). Used for every app's student."""
    return dataclasses.replace(
        teacher_model,
        d_model=d_model,
        n_layers=n_layers,
        ffn_hidden=2 * d_model,
        moe=None,
        n_dense_layers=n_layers,
        attention=dataclasses.replace(teacher_model.attention, n_heads=2),
    )


def maintenance_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from apps.maintenance.config import load_config

    teacher = load_config("fd001")
    ensemble = args.maint_teacher == "ensemble"
    if not ensemble:
        # one model: the fd001 recipe averages 3 members; the single teacher is one widened model
        teacher.ensemble_size = 1
    if args.tiny:
        teacher.data.data_dir = str(ROOT / "data_samples/maintenance/cmapss")
        teacher.data.subset = "SYN"
        teacher.data.extra_train_subsets = []  # the sample holds SYN only, not fd001's FD003
        teacher.train_stride = 8
        if getattr(teacher, "steps_per_epoch", None):
            teacher.steps_per_epoch = 4
        teacher.model.d_model, teacher.model.ffn_hidden = 32, 64
        teacher.model.moe.expert_hidden = 32
        teacher.pretrain_epochs = min(teacher.pretrain_epochs, 1)  # the path, not the budget
    else:
        if not ensemble:
            # the FD001 recipe is d_model 32 since session 3, only 1.4x the d32 student's
            # active parameters; the issue asks for a teacher with >= 4x, so the single
            # teacher is widened (default d64 / FFN 128: 137,934 active parameters, 5.4x).
            # The ensemble teacher is the recipe itself: 3 x d32 members, ~4.2x the student
            d = int(args.maint_teacher_d)
            teacher.model.d_model, teacher.model.ffn_hidden = d, 2 * d
            teacher.model.moe.expert_hidden = d
        if args.data_dir:
            teacher.data.data_dir = args.data_dir
    if args.train_stride:
        teacher.train_stride = args.train_stride
    teacher.seed = args.seed
    teacher.trainer.seed = args.seed
    student = copy.deepcopy(teacher)
    student.ensemble_size = 1  # the students are single models with either teacher
    student.model = dense_student_model(teacher.model, 16 if args.tiny else 32, n_layers=2)
    student.distill_mixup = float(getattr(args, "maint_distill_mixup", 0.0))
    _device_trainer(teacher, args.device, args.teacher_epochs, args.precision)
    _device_trainer(student, args.device, args.student_epochs, args.precision)
    return teacher, student


class AllMembersForward(torch.nn.Module):
    """The scoring forward of a :class:`apps.maintenance.model.RULEnsemble` (which has
    none: it scores through ``predict_windows``): every member's forward on the batch and
    the mean of their outputs, so the ensemble's throughput counts all members' work."""

    def __init__(self, ensemble: Any) -> None:
        super().__init__()
        self.members = ensemble.members

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([m(batch) for m in self.members]).mean(0)


def scoring_module(model: Any) -> Any:
    """What :func:`score_throughput` times: the model, or all members of an ensemble."""
    return AllMembersForward(model) if hasattr(model, "members") else model


def _maint_row(
    name: str, predictor: Any, data: Any, cfg: Any, args: argparse.Namespace
) -> dict[str, Any]:
    from apps.maintenance.training import evaluate_prepared, split_windows

    ev = evaluate_prepared(predictor, data, cfg, figures=False)
    m = ev.metrics
    w = split_windows(predictor, data.test, cfg.window)
    arrays = {"x": w.x, "mask": w.mask}
    row = {
        "model": name,
        "rmse_capped": m["rmse_capped"],
        "validation_rmse_capped": validation_rmse(predictor, data, cfg),
        "phm08_capped": m.get("phm08_capped"),
        "lead_time_median": m.get("lead_time_median"),
        "lead_detection_rate": m.get("lead_detection_rate"),
        "active_params": count_active_params(predictor.model),
        "windows_per_s": {
            b: score_throughput(scoring_module(predictor.model), arrays, b, args.device)
            for b in score_batches(args)
        },
    }
    print(json.dumps(row), flush=True)
    return row | {"protocol": ev.protocol}


def validation_rmse(predictor: Any, data: Any, cfg: Any) -> float:
    """RMSE against the capped truth over every window of the policy-validation units (the
    windows that chose each model's epoch; no smoothing): what recipes are compared on, since
    the test units may not choose anything."""
    import numpy as np

    from apps.maintenance.training import split_windows

    w = split_windows(predictor, data.policy, cfg.window)
    rul, _ = predictor.model.predict_windows(w.x, w.mask)
    truth = np.minimum(w.rul, predictor.model.rul_cap)
    return float(np.sqrt(np.mean((np.asarray(rul, np.float64) - truth) ** 2)))


def maint_retention_key(args: argparse.Namespace) -> str:
    """``maintenance_student_retention``, or its ``_mixup<R>`` variant when the distilled
    student trains with teacher-labelled mixup windows, and ``_colmean`` when the teacher
    term is the plain mean over the head's columns (separate recorded comparisons)."""
    r = float(getattr(args, "maint_distill_mixup", 0.0))
    key = "maintenance_student_retention" + (f"_mixup{r:g}" if r > 0 else "")
    return key + ("_colmean" if maint_column_weights(args) else "")


def maint_column_weights(args: argparse.Namespace) -> list[float]:
    """``DistillConfig.column_weights`` for ``--maint-column-weights``: empty for ``task``
    (the app fills in the student's task-loss weights), ``[0.5, 0.5]`` (the plain mean) for
    ``mean``."""
    return [0.5, 0.5] if getattr(args, "maint_column_weights", "task") == "mean" else []


def maint_teacher_description(tcfg: Any, args: argparse.Namespace) -> str:
    m = tcfg.model
    one = f"d{m.d_model}, {m.n_layers} blocks, FFN {m.ffn_hidden}"
    if args.maint_teacher == "ensemble":
        return f"fd001 recipe ensemble: mean of {tcfg.ensemble_size} members ({one}), own seeds"
    return f"single model ({one})"


def maint_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for two seeds' runs to be averaged into one recorded figure."""
    return {
        "maint_teacher": args.maint_teacher,
        "maint_teacher_d": None if args.maint_teacher == "ensemble" else args.maint_teacher_d,
        "teacher_epochs": args.teacher_epochs,
        "student_epochs": args.student_epochs,
        "alpha": args.alpha,
        "distill_mixup": float(getattr(args, "maint_distill_mixup", 0.0)),
        "column_weights": getattr(args, "maint_column_weights", "task"),
        "train_stride": args.train_stride,
        "data_dir": args.data_dir,
        "tiny": args.tiny,
        "device": args.device,
    }


def maint_seed_row(rows: list[dict[str, Any]], details: dict[str, Any], wall_s: float) -> dict:
    """One seed's figures (teacher, distilled, scratch) for ``details.per_seed``."""
    t, d, s = rows
    return {
        "teacher_rmse": t["rmse_capped"],
        "distilled_rmse": d["rmse_capped"],
        "scratch_rmse": s["rmse_capped"],
        "teacher_validation_rmse": t.get("validation_rmse_capped"),
        "distilled_validation_rmse": d.get("validation_rmse_capped"),
        "scratch_validation_rmse": s.get("validation_rmse_capped"),
        "retention": t["rmse_capped"] / d["rmse_capped"],
        "scratch_retention": t["rmse_capped"] / s["rmse_capped"],
        "distilled_beats_scratch": d["rmse_capped"] < s["rmse_capped"],
        "teacher_lead": t["lead_time_median"],
        "distilled_lead": d["lead_time_median"],
        "scratch_lead": s["lead_time_median"],
        "speedup_target_batch": details["throughput"]["student_speedup_at_target_batch"],
        "teacher_over_student_active_params": details["teacher_over_student_active_params"],
        "wall_seconds": wall_s,
    }


def _recorded(area: str, key: str) -> dict[str, Any] | None:
    """The entry already recorded under ``key`` in ``<KEEL_BENCH_RESULTS>/<area>.json``."""
    import os

    from bench.common import RESULTS_DIR

    path = Path(os.environ.get("KEEL_BENCH_RESULTS", RESULTS_DIR)) / f"{area}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(key)


def merge_seed_runs(
    previous: dict[str, Any] | None, details: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """(value, details) with this seed's row merged into a recorded entry of the same
    ``run_config`` (other seeds kept, this seed replaced): value = mean over seeds of the
    per-seed retention (teacher RMSE / distilled RMSE), with the per-seed means of RMSEs,
    lead times and speed-ups. A recorded entry of another config is replaced."""
    import statistics

    per_seed = dict(details["per_seed"])
    prev = (previous or {}).get("details") or {}
    if prev.get("run_config") == details["run_config"]:
        per_seed = {**prev.get("per_seed", {}), **per_seed}
    seeds = sorted(per_seed, key=int)
    ret = [per_seed[s]["retention"] for s in seeds]

    def mean_of(name: str) -> float | None:
        vals = [per_seed[s][name] for s in seeds if per_seed[s].get(name) is not None]
        return statistics.fmean(vals) if vals else None

    summary = {
        name: mean_of(name)
        for name in (
            "teacher_rmse",
            "distilled_rmse",
            "scratch_rmse",
            "teacher_validation_rmse",
            "distilled_validation_rmse",
            "scratch_validation_rmse",
            "teacher_lead",
            "distilled_lead",
            "scratch_lead",
            "speedup_target_batch",
        )
    }
    summary |= {
        "retention_sd": statistics.stdev(ret) if len(ret) > 1 else None,
        "distilled_beats_scratch_seeds": sum(per_seed[s]["distilled_beats_scratch"] for s in seeds),
        "n_seeds": len(seeds),
    }
    out = {
        **details,
        "per_seed": {s: per_seed[s] for s in seeds},
        "seeds": [int(s) for s in seeds],
        "mean_over_seeds": summary,
        "value_definition": "mean over seeds of teacher RMSE / distilled-student RMSE",
    }
    return statistics.fmean(ret), out


def run_maintenance_distill(args: argparse.Namespace) -> dict[str, Any]:
    from apps.maintenance.data import prepare_data
    from apps.maintenance.distillation import distill_fit_predictor
    from apps.maintenance.training import fit

    t_run = time.perf_counter()
    tcfg, scfg = maintenance_configs(args)
    data = prepare_data(tcfg)
    say(f"maintenance: data ready; teacher ({args.maint_teacher})")
    t0 = time.perf_counter()
    teacher = fit(tcfg, data=data, device=args.device).predictor
    t_teacher = time.perf_counter() - t0
    say("maintenance: distilled student")
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    t0 = time.perf_counter()
    # an ensemble teacher's targets are its mean prediction, stored before training (app docs)
    dcfg = {"alpha": args.alpha, "column_weights": maint_column_weights(args)}
    dout = distill_fit_predictor(scfg, teacher, dcfg, data=data)
    distilled = dout.predictor
    t_distill = time.perf_counter() - t0
    after = teacher.model.state_dict()
    teacher_unchanged = before.keys() == after.keys() and all(
        torch.equal(v, after[k]) for k, v in before.items()
    )
    say("maintenance: scratch student")
    t0 = time.perf_counter()
    scratch = fit(scfg, data=data, device=args.device).predictor
    t_scratch = time.perf_counter() - t0
    rows = [
        _maint_row("teacher", teacher, data, tcfg, args),
        _maint_row("student_distilled", distilled, data, scfg, args),
        _maint_row("student_scratch", scratch, data, scfg, args),
    ]
    protocol = rows[0].pop("protocol")
    for r in rows[1:]:
        r.pop("protocol")
    ratio = rows[0]["active_params"] / rows[1]["active_params"]
    retention = rows[0]["rmse_capped"] / rows[1]["rmse_capped"]
    details = {
        "rows": rows,
        "teacher_over_student_active_params": ratio,
        "scratch_retention": rows[0]["rmse_capped"] / rows[2]["rmse_capped"],
        "throughput": throughput_summary(rows, "windows_per_s"),
        "alpha": args.alpha,
        "distill_mixup": scfg.distill_mixup,
        "teacher_column_weights": dout.distill_config.column_weights,
        "epochs": {"teacher": args.teacher_epochs, "student": args.student_epochs},
        "train_seconds": {"teacher": t_teacher, "distill": t_distill, "scratch": t_scratch},
        "data": "SYN sample (tiny)" if args.tiny else "C-MAPSS FD001",
        "protocol": protocol,
        "machine": machine(),
        "seed": args.seed,
        "teacher": maint_teacher_description(tcfg, args),
        "teacher_unchanged_by_distillation": teacher_unchanged,
        "distilled_beats_scratch": rows[1]["rmse_capped"] < rows[2]["rmse_capped"],
        "run_config": maint_run_config(args),
    }
    say(f"maintenance: teacher / student active params {ratio:.2f}x (target >= 4x)")
    if ratio < 4:
        details["warning"] = f"teacher has only {ratio:.1f}x the student's active params"
    seed_row = maint_seed_row(rows, details, time.perf_counter() - t_run)
    details["per_seed"] = {str(args.seed): seed_row}
    key = maint_retention_key(args)
    if not args.no_record:
        retention, details = merge_seed_runs(_recorded("scale", key), details)
    return {key: (retention, details)}


def _samples_at(step: int, n: int, batch: int, steps_per_epoch: int | None = None) -> int:
    """Training samples seen after ``step`` optimizer steps: ``steps_per_epoch`` full random
    batches per epoch when set (the app's recipe), else shuffled passes over ``n`` windows."""
    if steps_per_epoch:
        return step * batch
    spe = math.ceil(n / batch)
    return (step // spe) * n + min((step % spe) * batch, n)


def _first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    for step, v in curve:
        if v <= target:
            return step
    return None


def rul_model(cfg: Any, n_channels: int) -> Any:
    """The RUL model of ``cfg``, built like ``training.fit`` builds it; its ``grow_d_model``
    hook lets ``core.growth`` widen ``d_model``."""
    from apps.maintenance.training import build_model

    return build_model(cfg, n_channels)


def train_curve(cfg: Any, data: Any) -> tuple[list[tuple[int, float]], Any]:
    """Train ``cfg``'s model like ``training.fit`` (same seed, windows, loaders, trainer incl.
    ``cfg.trainer.growth``) and return ``(val/loss per epoch as (step, value), model)``.
    No best-epoch restore, no early stop, no alarm policy: only the loss curve matters."""
    from apps.maintenance.training import batch_loader, split_windows
    from core.engine import build_trainer, seed_everything

    seed_everything(cfg.seed)
    state = _norm_state(data)
    w_train = split_windows(state, data.train, cfg.window, stride=cfg.train_stride)
    w_val = split_windows(state, data.policy, cfg.window)
    model = rul_model(cfg, w_train.x.shape[2])
    g = torch.Generator().manual_seed(cfg.seed)
    train_dl = batch_loader(w_train, cfg.batch_size, True, cfg.steps_per_epoch, g)
    val_dl = batch_loader(w_val, max(cfg.batch_size, 2048), False)
    log = CurveLogger()
    trainer = build_trainer(cfg.trainer, logger=log)
    trainer.fit(model, train_dl, val_dl)
    return log.curves["val/loss"], model.cpu().eval()


def parse_size(spec: str) -> dict[str, int]:
    """``"d16,L1,F32"`` -> ``{"d_model": 16, "n_layers": 1, "ffn_hidden": 32}``."""
    keys = {"d": "d_model", "L": "n_layers", "F": "ffn_hidden"}
    out = {}
    for part in spec.split(","):
        part = part.strip()
        if not part or part[0] not in keys or not part[1:].isdigit():
            raise ValueError(f"model size {spec!r}: expected e.g. 'd16,L1,F32'")
        out[keys[part[0]]] = int(part[1:])
    if set(out) != set(keys.values()):
        raise ValueError(f"model size {spec!r} must give d, L and F")
    return out


def growth_schedule(small: dict[str, int], large: dict[str, int], at: int) -> GrowthSchedule:
    """Steps that turn the ``small`` dense backbone into the ``large`` one at step ``at``:
    ``grow_depth`` spreads the new identity blocks evenly between the old ones, then
    ``grow_width`` widens ``d_model`` (heads keep their width) and the FFN hidden."""
    L0, L1 = small["n_layers"], large["n_layers"]
    if L1 < L0 or large["d_model"] < small["d_model"] or large["ffn_hidden"] < small["ffn_hidden"]:
        raise ValueError(f"the large model {large} must not be smaller than {small}")
    steps = []
    if L1 > L0:  # new block j after old block (j mod L0): spread between the old ones
        at_idx = sorted((j % L0) + 1 for j in range(L1 - L0))
        steps.append(GrowthStep(at, "grow_depth", {"new_layers_at": at_idx}))
    kw = {}
    if large["d_model"] > small["d_model"]:
        kw["new_d_model"] = large["d_model"]
    if large["ffn_hidden"] > small["ffn_hidden"]:
        kw["new_ffn_hidden"] = large["ffn_hidden"]
    if kw:
        steps.append(GrowthStep(at, "grow_width", kw))
    return GrowthSchedule(steps)


def growth_configs(args: argparse.Namespace) -> tuple[Any, Any, dict[str, int], dict[str, int]]:
    """(large config, small config, large size, small size): dense backbones, whole budget,
    no early stop and no best-epoch restore (a grown run must keep its final weights)."""
    from apps.maintenance.config import load_config

    base = load_config(args.growth_subset.lower())
    base.ensemble_size = 1  # growth compares single models' training FLOPs
    if args.tiny:
        base.data.data_dir = str(ROOT / "data_samples/maintenance/cmapss")
        base.data.subset = "SYN"
        base.data.condition_onehot = False
        base.train_stride = 8
        base.steps_per_epoch = 4
    elif args.data_dir:
        base.data.data_dir = args.data_dir
    if args.train_stride:
        base.train_stride = args.train_stride
    base.seed = base.trainer.seed = args.seed
    small_s, large_s = parse_size(args.growth_small), parse_size(args.growth_large)
    if args.tiny:
        small_s, large_s = (
            {"d_model": 8, "n_layers": 1, "ffn_hidden": 16},
            {
                "d_model": 16,
                "n_layers": 2,
                "ffn_hidden": 32,
            },
        )
    head_dim = 4 if args.tiny else args.growth_head_dim

    def make(size: dict[str, int]) -> Any:
        c = copy.deepcopy(base)
        if size["d_model"] % head_dim:
            raise ValueError(f"d_model {size['d_model']} is not a multiple of head_dim {head_dim}")
        c.model = dataclasses.replace(
            base.model,
            **size,
            moe=None,
            n_dense_layers=size["n_layers"],
            attention=dataclasses.replace(
                base.model.attention, n_heads=size["d_model"] // head_dim
            ),
        )
        _device_trainer(c, args.device, args.growth_epochs, args.precision)
        c.trainer.check_val_every_n_epoch = 1
        c.early_stopping_patience = None
        c.restore_best = False
        return c

    return make(large_s), make(small_s), large_s, small_s


def growth_verdict(
    flops_scratch: float,
    flops_grow: float | None,
    control_step_at_L: int | None,
    control_min: float,
    L: float,
) -> tuple[float | None, bool, str | None]:
    """``(1 - FLOPs_grow / FLOPs_scratch or None, valid, reason)``: valid only when the grown
    run reached L and the small model alone (the control) never did; otherwise any saving
    would come from the small model being good enough, not from growing it."""
    saving = None if flops_grow is None else 1.0 - flops_grow / flops_scratch
    if control_step_at_L is not None:
        return (
            saving,
            False,
            f"the small model alone reached L at step {control_step_at_L} (min"
            f" {control_min:.4g} <= L {L:.4g}): the saving would not come from growth",
        )
    if flops_grow is None:
        return None, False, "the grown run never reached L within its budget"
    return saving, True, None


def run_maintenance_growth(args: argparse.Namespace) -> dict[str, Any]:
    from apps.maintenance.data import prepare_data
    from apps.maintenance.training import split_windows
    from core.backbone import Backbone

    large, small, large_s, small_s = growth_configs(args)
    data = prepare_data(large)
    n_train = len(
        split_windows(_norm_state(data), data.train, large.window, stride=large.train_stride).x
    )
    B = large.batch_size
    fixed = large.steps_per_epoch
    spe = fixed or math.ceil(n_train / B)
    total_steps = spe * args.growth_epochs
    grow_at = int(round(args.grow_at * total_steps))
    T = math.ceil(large.window / large.patch_len) + 1  # patches + CLS
    fpt_large = Backbone(large.model).flops_per_token(T) * T
    fpt_small = Backbone(small.model).flops_per_token(T) * T
    budget_epochs = int(math.ceil(args.growth_epochs * args.grow_budget))
    dataset = "SYN sample (tiny)" if args.tiny else f"C-MAPSS {args.growth_subset.upper()}"

    say(f"growth ({dataset}): large {large_s} from scratch ({total_steps} steps)")
    t0 = time.perf_counter()
    curve_s, _ = train_curve(large, data)
    t_scratch = time.perf_counter() - t0
    step_L, L = min(curve_s, key=lambda sv: sv[1])
    flops_scratch = fpt_large * _samples_at(step_L, n_train, B, fixed)

    # control: the small model alone, never grown, same budget and schedule as the grown run
    control = copy.deepcopy(small)
    control.trainer.max_epochs = budget_epochs
    say(f"growth: small {small_s} alone (control), {budget_epochs} epochs")
    t0 = time.perf_counter()
    curve_c, _ = train_curve(control, data)
    t_control = time.perf_counter() - t0
    step_c = _first_reach(curve_c, L)

    grown = copy.deepcopy(control)
    grown.trainer.growth = growth_schedule(small_s, large_s, grow_at)
    say(f"growth: small -> grow at step {grow_at} -> continue, {budget_epochs} epochs")
    t0 = time.perf_counter()
    curve_g, grown_model = train_curve(grown, data)
    t_grow = time.perf_counter() - t0
    fc = grown_model.backbone.cfg
    same_arch = (fc.d_model, fc.n_layers, fc.ffn_hidden) == (
        large_s["d_model"],
        large_s["n_layers"],
        large_s["ffn_hidden"],
    )
    step_g = _first_reach(curve_g, L)

    def flops_grow(step: int) -> float:
        s_small = _samples_at(min(step, grow_at), n_train, B, fixed)
        return fpt_small * s_small + fpt_large * (_samples_at(step, n_train, B, fixed) - s_small)

    small_min = min(v for _, v in curve_c)
    details: dict[str, Any] = {
        "target_val_loss_L": L,
        "scratch_step_at_L": step_L,
        "flops_scratch": flops_scratch,
        "grow_step_at_L": step_g,
        "flops_grow": flops_grow(step_g) if step_g is not None else None,
        "grow_best_val_loss": min(v for _, v in curve_g),
        "small_only_min_val_loss": small_min,
        "small_only_reached_L": step_c is not None,
        "small_only_step_at_L": step_c,
        "small_only_flops_at_L": (
            fpt_small * _samples_at(step_c, n_train, B, fixed) if step_c is not None else None
        ),
        "small_over_large_val_loss": small_min / L,
        "grow_at_step": grow_at,
        "steps_per_epoch": spe,
        "epochs": {"scratch": args.growth_epochs, "grow_and_control": budget_epochs},
        "large": large_s,
        "small": small_s,
        "schedule": grown.trainer.growth.to_dict()["steps"],
        "grown_final_is_large_architecture": same_arch,
        "flops_per_sample": {"large": fpt_large, "small": fpt_small},
        "curve_scratch": curve_s,
        "curve_small_only": curve_c,
        "curve_grow": curve_g,
        "train_seconds": {"scratch": t_scratch, "small_only": t_control, "grow": t_grow},
        "data": dataset,
        "val_loss": f"RULModel val/loss ({large.loss} on RUL/cap + {large.alarm.alarm_loss_weight}"
        " x alarm BCE) on the policy-validation units, per epoch",
        "definition": "1 - FLOPs_grow / FLOPs_scratch, backbone training FLOPs until the first"
        " epoch whose val/loss <= L (the large scratch run's best); valid only when the"
        " small model alone, same budget, never reaches L",
        "machine": machine(),
        "seed": args.seed,
    }
    saving, valid, reason = growth_verdict(
        flops_scratch, details["flops_grow"], step_c, small_min, L
    )
    details["valid"] = valid
    if reason:
        details["invalid_reason"] = reason
    details["saving_computed"] = saving
    print(json.dumps({k: v for k, v in details.items() if not k.startswith("curve")}), flush=True)
    return {"growth_flops_saving": (saving if valid else None, details)}


def _norm_state(data: Any) -> dict[str, Any]:
    from apps.maintenance.predictor import normalizer_state

    return normalizer_state(data.normalizer)


# ============================================================================ fraud


def fraud_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from apps.fraud.config import load_config

    teacher = load_config(args.fraud_config)
    teacher.baseline.enabled = False
    teacher.seed = args.seed
    if args.tiny:  # tests: a smaller backbone reading the card's last 4 transactions
        teacher.model.d_model, teacher.model.ffn_hidden = 32, 64
        teacher.model.moe.expert_hidden = 32
        teacher.head.history_len = min(teacher.head.history_len, 4)
    student = copy.deepcopy(teacher)
    student.model = dense_student_model(
        teacher.model, args.fraud_student_d, n_layers=args.fraud_student_layers
    )
    _device_trainer(teacher, args.device, args.fraud_teacher_epochs, args.precision)
    _device_trainer(student, args.device, args.fraud_student_epochs, args.precision)
    return teacher, student


def _fraud_row(
    name: str, predictor: Any, ev: Any, inputs: Any, args: argparse.Namespace
) -> dict[str, Any]:
    return _score_row(name, ev.metrics, predictor.model, inputs, args)


def _score_row(
    name: str, metrics: dict[str, float], model: Any, inputs: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """One table row: test-block ranking metrics, active parameters, rows/s per batch size."""
    row = {
        "model": name,
        "pr_auc": metrics["pr_auc"],
        "roc_auc": metrics.get("roc_auc"),
        "recall_at_p90": metrics.get("recall_at_precision_0.9"),
        "active_params": count_active_params(model),
        "rows_per_s": {
            b: score_throughput(model, inputs, b, args.device) for b in score_batches(args)
        },
    }
    print(json.dumps(row), flush=True)
    return row


def fraud_distill_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``DistillConfig`` of the fraud student (``--alpha``, ``--fraud-distill-*``)."""
    return {
        "alpha": args.alpha,
        "kind": args.fraud_distill_kind,
        "regression_loss": args.fraud_distill_loss,
        "temperature": args.fraud_temperature,
        "teacher_rows": args.fraud_teacher_rows,
    }


def _fraud_teacher_meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "config": args.fraud_config,
        "epochs": args.fraud_teacher_epochs,
        "seed": args.seed,
        "tiny": args.tiny,
        "precision": args.precision,
    }


def fraud_teacher(
    args: argparse.Namespace, tcfg: Any, dev: str | None
) -> tuple[Any, Any, Any, Any]:
    """``(predictor, data, test-block evaluation, teacher inputs)``: trained here, or loaded
    from ``--fraud-teacher-dir`` when that folder holds a teacher saved by an earlier run
    with the same config, epochs, seed and precision (saved there after training
    otherwise). Reusing a teacher changes nothing in the protocol: the saved predictor has
    the input builder fitted on the training rows, and its test metrics are recomputed."""
    from apps.fraud.predictor import FraudPredictor
    from apps.fraud.training import evaluate_inputs, fit, load_data

    folder = Path(args.fraud_teacher_dir) if args.fraud_teacher_dir else None
    meta = _fraud_teacher_meta(args)
    if folder is not None and (folder / "bench_meta.json").exists():
        saved = json.loads((folder / "bench_meta.json").read_text())
        if saved != meta:
            raise ValueError(
                f"{folder}: the saved teacher was trained with {saved}, this run needs {meta};"
                " use another --fraud-teacher-dir"
            )
        say(f"fraud: teacher loaded from {folder}")
        predictor = FraudPredictor.load(folder)
        data = load_data(tcfg)
        inputs = predictor.inputs.transform(data.frame)
        return (
            predictor,
            data,
            evaluate_inputs(tcfg, data, predictor, inputs, figures=False),
            inputs,
        )
    say("fraud: teacher")
    tout = fit(tcfg, device=dev)
    if folder is not None:
        tout.predictor.save(folder)
        tmp = folder / "bench_meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(folder / "bench_meta.json")  # atomic: the folder is complete only now
    return tout.predictor, tout.data, tout.evaluation, tout.inputs


def _fraud_teacher_or_skip(args: argparse.Namespace) -> tuple[Any, ...] | None:
    """``(teacher config, student config, teacher, data, evaluation, inputs, seconds)`` of
    :func:`fraud_teacher`; ``None`` (fraud skipped) where the fraud app cannot load."""
    try:
        import apps.fraud.training  # noqa: F401  (needs polars)
    except ImportError as err:  # polars missing on the GPU machine
        print(f"fraud skipped: {err}", flush=True)
        return None
    tcfg, scfg = fraud_configs(args)
    dev = "cuda" if args.device == "cuda" else None
    t0 = time.perf_counter()
    teacher, data, t_ev, t_inputs = fraud_teacher(args, tcfg, dev)
    return tcfg, scfg, teacher, data, t_ev, t_inputs, time.perf_counter() - t0


def run_fraud_distill(args: argparse.Namespace) -> dict[str, Any]:
    loaded = _fraud_teacher_or_skip(args)
    if loaded is None:
        return {}
    from apps.fraud.distillation import distill_fit_predictor
    from apps.fraud.training import evaluate_inputs, fit

    tcfg, scfg, teacher, data, t_ev, t_inputs, t_teacher = loaded
    dev = "cuda" if args.device == "cuda" else None
    say("fraud: distilled student")
    dcfg = fraud_distill_config(args)
    transfer = fraud_transfer_rows(args, scfg, data)
    steps = fraud_student_steps(scfg, data, transfer)
    dscfg = copy.deepcopy(scfg)
    dscfg.trainer.max_epochs = steps["distilled_epochs"]
    t0 = time.perf_counter()
    dout = distill_fit_predictor(
        dscfg,
        teacher,
        dcfg,
        data=data,
        device=dev,
        class_weighted=args.fraud_class_weighted,
        transfer_rows=transfer,
    )
    t_distill = time.perf_counter() - t0
    say("fraud: scratch student")
    t0 = time.perf_counter()
    sout = fit(scfg, data=data, device=dev)
    t_scratch = time.perf_counter() - t0
    test_inputs = t_inputs.take(data.split.test)
    s_ev = evaluate_inputs(scfg, data, sout.predictor, sout.inputs, figures=False)
    rows = [
        _fraud_row("teacher", teacher, t_ev, test_inputs, args),
        _fraud_row("student_distilled", dout.predictor, dout.evaluation, test_inputs, args),
        _fraud_row(
            "student_scratch",
            sout.predictor,
            s_ev,
            sout.inputs.take(data.split.test),
            args,
        ),
    ]
    ratio = rows[0]["active_params"] / rows[1]["active_params"]
    details = {
        "rows": rows,
        "teacher_over_student_active_params": ratio,
        "scratch_retention": rows[2]["pr_auc"] / rows[0]["pr_auc"],
        "distilled_beats_scratch": rows[1]["pr_auc"] > rows[2]["pr_auc"],
        "throughput": throughput_summary(rows, "rows_per_s"),
        "alpha": args.alpha,
        "distill_config": dcfg,
        "class_weighted": args.fraud_class_weighted,
        "transfer_rows": dout.extra["transfer_rows"],
        "optimizer_steps": steps,
        "student": {"d_model": args.fraud_student_d, "n_layers": args.fraud_student_layers},
        "best_epoch": {
            "student_distilled": dout.extra.get("best_epoch"),
            "student_scratch": sout.extra.get("best_epoch"),
        },
        "best_val_ap": {
            "student_distilled": dout.extra.get("best_val_ap"),
            "student_scratch": sout.extra.get("best_val_ap"),
        },
        "teacher_dir": args.fraud_teacher_dir,
        "config": args.fraud_config,
        "epochs": {"teacher": args.fraud_teacher_epochs, "student": args.fraud_student_epochs},
        "train_seconds": {"teacher": t_teacher, "distill": t_distill, "scratch": t_scratch},
        "protocol": t_ev.protocol,
        "machine": machine(),
        "seed": args.seed,
    }
    if ratio < 4:
        details["warning"] = f"teacher has only {ratio:.1f}x the student's active params"
    key = fraud_key(args) + ("_delay_transfer" if transfer is not None else "")
    key += "_teacher_unlabelled" if args.fraud_teacher_rows == "unlabelled" else ""
    return {key: (rows[1]["pr_auc"] / rows[0]["pr_auc"], details)}


def fraud_transfer_rows(args: argparse.Namespace, scfg: Any, data: Any) -> np.ndarray | None:
    """``--fraud-transfer-delay``: a seeded share (``--fraud-transfer-rate``, default the
    config's ``neg_sample_rate``, the share of legitimate training rows kept) of the delay
    block, the transactions between the training cut-off and the test block whose labels
    are not known yet; the distilled student trains on them against the teacher's logits."""
    if not args.fraud_transfer_delay:
        return None
    delay = np.sort(np.asarray(data.split.delay))
    if len(delay) == 0:
        raise SystemExit(f"--fraud-transfer-delay: {args.fraud_config} has no delay block")
    rate = args.fraud_transfer_rate
    rate = scfg.head.neg_sample_rate if rate is None else rate
    keep = np.random.default_rng(args.seed + 10_000).random(len(delay)) < rate
    return delay[keep]


def fraud_student_steps(scfg: Any, data: Any, transfer: np.ndarray | None) -> dict[str, int]:
    """Equal optimizer steps for both students: with a transfer set the distilled student's
    epochs are longer, so it gets proportionally fewer of them (rounded, at least 1)."""
    from apps.fraud.training import training_rows

    bs, epochs = scfg.head.batch_size, scfg.trainer.max_epochs
    n_lab = len(training_rows(data, scfg)[0])
    n_all = n_lab + (0 if transfer is None else len(transfer))
    per_lab, per_all = -(-n_lab // bs), -(-n_all // bs)
    d_epochs = max(1, round(epochs * per_lab / per_all))
    return {
        "distilled_epochs": d_epochs,
        "distilled": d_epochs * per_all,
        "scratch_epochs": epochs,
        "scratch": epochs * per_lab,
    }


def fraud_key(args: argparse.Namespace, name_set: bool = False) -> str:
    """``fraud_student_retention`` for ULB (and the demo), ``..._<config>`` for another
    set (or always, with ``name_set``), so a handbook run never overwrites the ULB figure."""
    key = "fraud_student_retention"
    if name_set or args.fraud_config not in ("ulb", "demo"):
        key += f"_{Path(str(args.fraud_config)).stem}"
    return key


# ---------------------------------------------------------------- fraud: MLP student


class XNumScorer(torch.nn.Module):
    """A :class:`apps.fraud.fastscore.StudentMLP` behind the backbone's batch-dict call
    (it reads ``x_num`` only), so :func:`score_throughput` times the same kind of call
    for the teacher and both students: the model's forward on prepared inputs."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.student(batch["x_num"])


def fraud_student_rows(data: Any) -> Any:
    """Rows both MLP students fit on, in time order: the train and validation blocks, every
    row (no negative subsampling). Never the delay, test or removed rows."""
    import numpy as np

    return np.sort(np.concatenate([data.split.train, data.split.valid]))


def student_pos_weight(rule: Any, y_N: Any) -> float:
    """The fraud app's positive-class weight rule (``head.pos_weight``; ``"sqrt"``:
    sqrt(negatives / positives)) on the scratch student's rows."""
    n_pos = int(y_N.sum())
    if n_pos == 0:
        raise ValueError(f"no fraud in the {len(y_N)} student rows; cannot weight the classes")
    return math.sqrt((len(y_N) - n_pos) / n_pos) if rule == "sqrt" else float(rule or 1.0)


def _span(ts: Any, y: Any, idx: Any) -> dict[str, Any]:
    return {
        "n": len(idx),
        "frauds": int(y[idx].sum()),
        "first": str(ts[idx].min()) if len(idx) else None,
        "last": str(ts[idx].max()) if len(idx) else None,
    }


def mlp_settings(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The fastscore MLP's architecture and loop (``--fraud-mlp-*``), shared by every
    student of one run so that they differ only in rows and targets."""
    return {
        "hidden": tuple(args.fraud_mlp_hidden),
        "epochs": args.fraud_mlp_epochs,
        "batch_size": args.fraud_mlp_batch,
        "lr": args.fraud_mlp_lr,
        "seed": seed,
    }


def mlp_distill_config(args: argparse.Namespace) -> dict[str, Any]:
    """The MLP student's teacher term (:func:`apps.fraud.fastscore.student_distill_config`):
    ``--fraud-mlp-alpha`` 1 fits the teacher's logits alone; below 1 it adds ``1 - alpha``
    of the scratch student's class-weighted BCE on the same rows' labels."""
    return {"alpha": float(args.fraud_mlp_alpha)}


def fit_mlp_students(
    args: argparse.Namespace, x_NF: Any, soft_N: Any, y_N: Any, pos_weight: float, seed: int
) -> tuple[Any, Any, dict[str, float]]:
    """``(distilled, scratch, seconds)``: the same MLP, loop, rows, batches and steps
    (:mod:`apps.fraud.fastscore`); the distilled one fits the teacher's logits with core's
    teacher term, the scratch one the labels with class-weighted BCE."""
    from apps.fraud.fastscore import distill_student, scratch_student

    kw = mlp_settings(args, seed)
    t0 = time.perf_counter()
    distilled = distill_student(
        x_NF, soft_N, cfg=mlp_distill_config(args), y_N=y_N, pos_weight=pos_weight, **kw
    )
    t1 = time.perf_counter()
    scratch = scratch_student(x_NF, y_N, pos_weight, **kw)
    t2 = time.perf_counter()
    return distilled, scratch, {"distill": t1 - t0, "scratch": t2 - t1}


def paired_difference(
    per_seed: list[dict[str, Any]],
    distilled: str = "student_distilled",
    scratch: str = "student_scratch",
) -> dict[str, Any]:
    """Distilled minus scratch test PR-AUC, paired by student seed (same initial weights and
    batches): mean, sd, standard error and wins. A mean under about two standard errors
    does not show that either student is better."""
    import statistics

    diff = [r[f"{distilled}_pr_auc"] - r[f"{scratch}_pr_auc"] for r in per_seed]
    sd = statistics.stdev(diff) if len(diff) > 1 else None
    return {
        "mean": statistics.fmean(diff),
        "sd": sd,
        "standard_error": None if sd is None else sd / math.sqrt(len(diff)),
        "distilled_wins": sum(d > 0 for d in diff),
        "n_seeds": len(diff),
    }


def run_fraud_mlp_distill(args: argparse.Namespace) -> dict[str, Any]:
    """``--fraud-student mlp``: the teacher of :func:`run_fraud_distill` (same config, or
    loaded from ``--fraud-teacher-dir``) distilled into the fastscore MLP on stored soft
    labels (its logits on the train + validation rows), against the same MLP trained from
    scratch on the labels of those rows; per student seed (``--fraud-student-seeds``)."""
    loaded = _fraud_teacher_or_skip(args)
    if loaded is None:
        return {}
    import numpy as np

    from apps.fraud.fastscore import student_distill_config, student_logits
    from apps.fraud.metrics import fraud_metrics
    from apps.fraud.schema import TS
    from apps.fraud.training import training_rows

    tcfg, _, teacher, data, t_ev, t_inputs, t_teacher = loaded
    split, y = data.split, data.y
    rows = fraud_student_rows(data)
    say(f"fraud: teacher logits on {len(rows)} train + validation rows (soft labels)")
    t0 = time.perf_counter()
    soft_N = teacher.score_inputs(t_inputs.take(rows))[0]
    t_soft = time.perf_counter() - t0
    x_NF, y_N = t_inputs.x_num[rows], y[rows]
    pos_weight = student_pos_weight(tcfg.head.pos_weight, y_N)
    delay = np.sort(split.delay) if args.fraud_delay_soft_labels else None
    if delay is not None:
        if len(delay) == 0:
            raise SystemExit(
                f"--fraud-delay-soft-labels: the {split.protocol!r} split has no delay block"
                " (the handbook's 7/7/7 protocol has one; ULB's time fraction does not)"
            )
        # The delay block's labels are not known yet when the model is trained (that is
        # the delay); its transactions are. The teacher labels them: soft labels only.
        say(f"fraud: teacher logits on {len(delay)} delay-block rows (unlabelled)")
        delay_rows = np.concatenate([rows, delay])
        x_delay = t_inputs.x_num[delay_rows]
        soft_delay = np.concatenate([soft_N, teacher.score_inputs(t_inputs.take(delay))[0]])
        # with --fraud-mlp-alpha < 1 the labelled rows keep their labels in the task term;
        # the delay block's are unknown (NaN: teacher term only, never read from the data)
        y_delay = np.concatenate([y_N.astype(np.float64), np.full(len(delay), np.nan)])
        # the delay student takes more steps (more rows, same epochs): a second scratch
        # control gets as many steps on its labelled rows, so the budget is equal too
        same_steps_epochs = round(args.fraud_mlp_epochs * len(delay_rows) / len(rows))
    x_test, y_test = t_inputs.x_num[split.test], y[split.test]
    table = [_fraud_row("teacher", teacher, t_ev, t_inputs.take(split.test), args)]
    seeds = args.fraud_student_seeds or [args.seed]
    # the distilled student that the key reports: with the delay block's soft labels if asked
    headline = "student_distilled_delay" if delay is not None else "student_distilled"
    per_seed: list[dict[str, Any]] = []
    for i, seed in enumerate(seeds):
        say(f"fraud: MLP students, seed {seed}")
        distilled, scratch, secs = fit_mlp_students(args, x_NF, soft_N, y_N, pos_weight, seed)
        students = [("student_distilled", distilled), ("student_scratch", scratch)]
        if delay is not None:  # the same MLP and loop on the soft labels of both spans
            from apps.fraud.fastscore import distill_student, scratch_student

            t_d = time.perf_counter()
            with_delay = distill_student(
                x_delay,
                soft_delay,
                cfg=mlp_distill_config(args),
                y_N=y_delay,
                pos_weight=pos_weight,
                **mlp_settings(args, seed),
            )
            secs["distill_with_delay"] = time.perf_counter() - t_d
            students.append(("student_distilled_delay", with_delay))
            t_s = time.perf_counter()
            same_steps = scratch_student(
                x_NF, y_N, pos_weight, **{**mlp_settings(args, seed), "epochs": same_steps_epochs}
            )
            secs["scratch_same_steps"] = time.perf_counter() - t_s
            students.append(("student_scratch_same_steps", same_steps))
        m = {
            name: fraud_metrics(y_test, student_logits(model, x_test).astype(np.float64))
            for name, model in students
        }
        per_seed.append(
            {
                "seed": seed,
                **{f"{k}_pr_auc": v["pr_auc"] for k, v in m.items()},
                **{f"{k}_roc_auc": v["roc_auc"] for k, v in m.items()},
                **{f"{k}_recall_at_p90": v["recall_at_precision_0.9"] for k, v in m.items()},
                "retention": m[headline]["pr_auc"] / table[0]["pr_auc"],
                # against every scratch control of the run (equal epochs; equal steps too)
                "distilled_beats_scratch": all(
                    m[headline]["pr_auc"] > m[k]["pr_auc"]
                    for k in m
                    if k.startswith("student_scratch")
                ),
                "optimizer_steps": {name: model.fit_steps for name, model in students},
                "train_seconds": secs,
            }
        )
        print(json.dumps(per_seed[-1]), flush=True)
        if i == 0:  # speed does not depend on the weights: timed for the first seed only
            xs = {"x_num": x_test}
            table.append(
                _score_row(
                    "student_distilled", m["student_distilled"], XNumScorer(distilled), xs, args
                )
            )
            table.append(
                _score_row("student_scratch", m["student_scratch"], XNumScorer(scratch), xs, args)
            )
            arch = {
                "hidden": [distilled.hidden, scratch.hidden],
                "n_features": [distilled.n_features, scratch.n_features],
            }
    ts = data.frame.get_column(TS).to_numpy()
    teacher_rows, _ = training_rows(data, tcfg)
    rate = tcfg.head.neg_sample_rate
    mean = {
        k: float(np.mean([r[f"{k}_pr_auc"] for r in per_seed]))
        for k in (
            "student_distilled",
            "student_scratch",
            "student_distilled_delay",
            "student_scratch_same_steps",
        )
        if f"{k}_pr_auc" in per_seed[0]
    }
    scratch_keys = [k for k in mean if k.startswith("student_scratch")]
    beats = all(mean[headline] > mean[k] for k in scratch_keys)
    retention = mean[headline] / table[0]["pr_auc"]
    ratio = table[0]["active_params"] / table[1]["active_params"]
    throughput = throughput_summary(table, "rows_per_s")
    steps = per_seed[0]["optimizer_steps"]
    details = {
        "student_kind": "mlp",
        "rows": table,
        "per_seed": per_seed,
        "student_seeds": seeds,
        "retention_is": "mean over student seeds of distilled AP / teacher AP"
        if len(seeds) > 1
        else "distilled AP / teacher AP",
        "mean_pr_auc": mean,
        "teacher_over_student_active_params": ratio,
        "scratch_retention": mean["student_scratch"] / table[0]["pr_auc"],
        "headline_student": headline,
        "distilled_beats_scratch": beats,
        "paired_pr_auc_difference": paired_difference(per_seed, headline),
        **(
            {
                "paired_pr_auc_difference_same_steps": paired_difference(
                    per_seed, headline, "student_scratch_same_steps"
                )
            }
            if "student_scratch_same_steps" in mean
            else {}
        ),
        "throughput": throughput,
        "targets_met": {
            "retention_0.97": retention >= 0.97,
            "beats_scratch": beats,
            "params_quarter": ratio >= 4,
            "throughput_3x": throughput["throughput_target_3x_met"],
        },
        "trained_on": {
            "teacher": {
                **_span(ts, y, teacher_rows),
                "rows": "train block only: all its frauds + a seeded "
                f"{rate:g} share of its legitimate rows (head.neg_sample_rate); the "
                "validation block only chose its best epoch (val/ap), calibration and "
                "threshold",
            },
            "student_distilled": {
                **_span(ts, y, rows),
                "rows": "train + validation blocks, every row; targets: the teacher's "
                "logits on them (stored soft labels)",
            },
            "student_scratch": {
                **_span(ts, y, rows),
                "rows": "the same train + validation rows, same batches; targets: labels",
            },
            **(
                {
                    "student_distilled_delay": {
                        **_span(ts, y, delay_rows),
                        "rows": "train + validation blocks and the delay block, every row;"
                        " targets: the teacher's logits (the delay block's labels are"
                        " never read: they are not known yet at training time); with"
                        " --fraud-mlp-alpha < 1 also the labels of the labelled rows",
                    },
                    "student_scratch_same_steps": {
                        **_span(ts, y, rows),
                        "rows": "the train + validation rows' labels, for "
                        f"{same_steps_epochs} epochs: as many optimizer steps as the delay"
                        " student",
                    },
                }
                if delay is not None
                else {}
            ),
            "test": _span(ts, y, split.test),
        },
        "student_rows_in_test": int(
            np.isin(rows if delay is None else delay_rows, split.test).sum()
        ),
        "same_architecture": arch["hidden"][0] == arch["hidden"][1]
        and arch["n_features"][0] == arch["n_features"][1],
        "same_optimizer_steps": steps["student_distilled"] == steps["student_scratch"],
        "mlp": {
            **arch,
            "epochs": args.fraud_mlp_epochs,
            "batch_size": args.fraud_mlp_batch,
            "lr": args.fraud_mlp_lr,
            "optimizer": "AdamW (weight decay 1e-4), one-cycle LR",
            "optimizer_steps": steps,
            "features": "the teacher's scaled x_num (its InputBuilder, fitted on train rows)",
            "distill_config": student_distill_config(mlp_distill_config(args)).to_dict(),
            "scratch_loss": f"BCE with pos_weight {pos_weight:.3f} "
            f"(head.pos_weight={tcfg.head.pos_weight!r} on the student rows)",
        },
        "teacher_dir": args.fraud_teacher_dir,
        "config": args.fraud_config,
        "epochs": {"teacher": args.fraud_teacher_epochs, "student": args.fraud_mlp_epochs},
        "train_seconds": {
            "teacher": t_teacher,
            "soft_labels": t_soft,
            "students": [r["train_seconds"] for r in per_seed],
        },
        "protocol": t_ev.protocol,
        "machine": machine(),
        "seed": args.seed,
    }
    if ratio < 4:
        details["warning"] = f"teacher has only {ratio:.1f}x the student's active params"
    print(json.dumps({k: details[k] for k in ("mean_pr_auc", "targets_met")}), flush=True)
    key = fraud_key(args, name_set=delay is not None)  # a delay-block key names its set
    if delay is not None:
        key += "_delay_soft_labels"
    if args.fraud_mlp_alpha < 1.0:  # labels mixed into the teacher term: its own key
        key += f"_alpha{args.fraud_mlp_alpha:g}"
    return {key: (retention, details)}


# ============================================================================ medical


def medical_configs(args: argparse.Namespace, root: Path) -> tuple[Any, Any]:
    """(teacher, student) configs: ``synthetic_bench`` with the token detector (the one
    ``apps/medical/distillation.py`` distils) and FP reduction on; the student has small
    dense backbones in both stages. ``--tiny``: 8 mm voxels, 16^3 crops, tiny backbones."""
    from apps.medical.config import MedicalConfig

    t = MedicalConfig.named("synthetic_bench")
    t.data.generate, t.data.root = None, str(root)
    dense = args.medical_detector == "dense"
    if dense:  # the shipped detector: voxel heat map, no stage 2 (as synthetic_bench)
        t.fp_reduction.enabled = False
        t.detector.train_minutes = args.medical_minutes
    else:
        t.detector.kind = "token"
        t.fp_reduction.enabled = True
    if not dense or args.medical_grid_mm == 3.0:
        # the 3 mm grid; otherwise synthetic_bench's own (1.5 mm / 36^3 crops since session 6)
        t.spacing_zyx = (3.0, 3.0, 3.0)
        t.detector.crop_zyx, t.detector.stride_zyx = (24, 24, 24), (16, 16, 16)
    t.seed = args.seed
    if args.tiny:
        t.spacing_zyx = (8.0, 8.0, 8.0)
        t.detector.crop_zyx, t.detector.stride_zyx = (16, 16, 16), (16, 16, 16)
        t.detector.crops_per_nodule, t.detector.neg_crops_per_scan = 2, 2
        t.detector.batch_size, t.detector.threshold = 4, 0.0
        t.detector.samples_per_epoch, t.detector.stem_channels = 32, 4
        t.detector.max_candidates = 10
        t.fp_reduction.crop_zyx = (4, 4, 4)
        t.fp_reduction.crops_per_nodule, t.fp_reduction.random_neg_per_scan = 1, 2
        t.fp_reduction.max_hard_neg_per_scan, t.fp_reduction.batch_size = 3, 8
        for stage in (t.detector, t.fp_reduction):
            b = stage.backbone
            b.d_model, b.n_layers, b.ffn_hidden = 32, 2, 64
            b.attention.n_heads = 4
            b.moe.n_routed_experts, b.moe.expert_hidden = 4, 32
    elif args.device == "cuda":
        t.detector.trainer.precision = t.fp_reduction.trainer.precision = "bf16-mixed"
    for stage in (t.detector, t.fp_reduction):
        stage.trainer.max_epochs = args.medical_epochs
        stage.trainer.accelerator = "gpu" if args.device == "cuda" else "cpu"
        stage.trainer.devices = 1
        stage.trainer.log_every_n_steps = 1 if args.tiny else 10
    s = copy.deepcopy(t)
    d, n = (8, 1) if args.tiny else (args.medical_student_d, 2)
    for stage in (s.detector, s.fp_reduction):
        stage.backbone = dense_student_model(stage.backbone, d, n)
    reshape_dense_student(
        s.detector,
        stem=getattr(args, "medical_student_stem", None),
        patch=getattr(args, "medical_student_patch", None),
        full_attention=getattr(args, "medical_student_full_attention", False),
    )
    ema = getattr(args, "medical_ema_decay", None)
    if ema is not None:
        # both students, so the distilled-vs-scratch comparison keeps one recipe
        for stage in (s.detector, s.fp_reduction):
            stage.trainer = dataclasses.replace(stage.trainer, ema_decay=float(ema))
    return t, s


def reshape_dense_student(
    det: Any, stem: int | None = None, patch: int | None = None, full_attention: bool = False
) -> None:
    """In place, on a detector config: ``stem`` channels, ``patch`` edge (must divide the
    crop), and ``full_attention`` (``top_k`` None: every key, one fused attention call);
    ``None`` / ``False`` keep what ``det`` has."""
    if stem:
        det.stem_channels = int(stem)
    if full_attention:
        b = det.backbone
        det.backbone = dataclasses.replace(
            b, attention=dataclasses.replace(b.attention, top_k=None)
        )
    if patch:
        p = int(patch)
        if any(c % p for c in det.crop_zyx):
            raise SystemExit(f"student patch {p} must divide the crop {tuple(det.crop_zyx)}")
        det.patch_zyx = (p, p, p)


def dense_student_summary(det: Any) -> dict[str, Any]:
    """The settings that tell the bench's dense students apart, for the record."""
    b = det.backbone
    return {
        "d_model": b.d_model,
        "n_layers": b.n_layers,
        "stem_channels": det.stem_channels,
        "patch_zyx": list(det.patch_zyx),
        "attention_top_k": b.attention.top_k,
    }


def medical_data(args: argparse.Namespace) -> Path:
    """The npz dataset folder (``bench.medical_bench --prepare`` layout), made when absent
    (making it needs pydicom; the GPU machine gets a prepared folder)."""
    from apps.medical.config import MedicalConfig
    from bench.medical_bench import prepare

    cfg = MedicalConfig.named("synthetic_bench")
    if args.tiny:
        out = Path(args.medical_data or ROOT / "keel_outputs/scale_bench_medical_tiny")
        cfg.data.generate = {"n_series": 4, "size": "tiny", "seed": 5}
    else:
        out = Path(args.medical_data or ROOT / "keel_outputs/medical_bench_data64")
    n_unlabeled = int(getattr(args, "medical_unlabeled_series", 0))
    if n_unlabeled:  # made as training-only extras; their truth is never read here
        cfg.data.generate = {**(cfg.data.generate or {}), "extra_train_series": n_unlabeled}
    if not (out / "seriesuids.csv").is_file():
        say(f"medical: preparing {out}")
        prepare(out, cfg, workers=1 if args.tiny else None)
    return out


def _medical_row(
    name: str, predictor: Any, held: list[Any], truth: Any, crops: Any, args: argparse.Namespace
) -> dict[str, Any]:
    from apps.medical.evaluation import evaluate_scans, froc_metrics

    dev = "cuda" if args.device == "cuda" else "cpu"
    predictor.detector.to(dev)
    if predictor.fp_model is not None:
        predictor.fp_model.to(dev)
    result, _ = evaluate_scans(predictor.detect_volume, held, truth)
    m = froc_metrics(result)
    params = count_active_params(predictor.detector) + (
        count_active_params(predictor.fp_model) if predictor.fp_model is not None else 0
    )
    val_cpm = getattr(predictor.detector, "validation_cpm_", None)  # chose the NMS radius
    row = {
        "model": name,
        "cpm": float(m["cpm"]),
        "validation_cpm": None if val_cpm is None else float(val_cpm),
        "sensitivity_at_4fp": float(m["sensitivity_at_4fp"]),
        "active_params": params,
        "stage1_crops_per_s": crop_rates(predictor.detector, crops, args),
    }
    predictor.detector.cpu()
    if predictor.fp_model is not None:
        predictor.fp_model.cpu()
    print(json.dumps(row), flush=True)
    return row


def crop_rates(detector: Any, crops: Any, args: argparse.Namespace) -> dict[int, float]:
    """Stage-1 crops per second at each scoring batch (:func:`score_throughput`; the filter
    bank runs on every crop), largest batch first."""
    dev = "cuda" if args.device == "cuda" else "cpu"
    batches = {min(b, 64 if args.tiny else 1024) for b in score_batches(args)}
    return {
        b: score_throughput(detector, {"image": crops}, b, dev)
        for b in sorted(batches, reverse=True)
    }


def heatmap_scans_per_s(
    detector: Any, scans: list[Any], cfg: Any, batch: int, device: str, reps: int = 3
) -> float:
    """Scans per second of the dense detector's whole-scan scoring path
    (:func:`apps.medical.dense.sliding_window_dense`, what ``detect`` runs: the filter bank
    once per scan, then overlapping windows of its features in batches of ``batch``, bf16 on
    CUDA, and the weighted accumulation), without candidate extraction (its cost depends on
    the weights; the heat map's does not). The per-crop rate of :func:`_medical_row` charges
    the filter bank to every crop, which whole-scan scoring does not."""
    from apps.medical.dense import sliding_window_dense

    dc = cfg.detector
    stride = dc.infer_stride_zyx or dc.stride_zyx
    detector = detector.to(device).eval()

    def fn() -> None:
        with torch.inference_mode():
            for s in scans:
                sliding_window_dense(detector, s.image, dc.crop_zyx, stride, batch, dc.tta_flips)

    t = time_fn(fn, warmup=1, reps=reps)
    detector.cpu()
    return len(scans) / (t["median_ms"] / 1e3)


def run_medical_scoring_speed(args: argparse.Namespace) -> dict[str, Any]:
    """``--medical-scoring-only``: the teacher (``--medical-teacher-dir``) against the
    student architecture (untrained: speed does not depend on the weights), per crop
    (:func:`score_throughput`, filter bank included per crop, fp32) and per whole scan
    (:func:`heatmap_scans_per_s`, equal window batches ``--medical-scoring-batch``) on the
    first ``--medical-scoring-scans`` held-out series. No training, no CPM."""
    import numpy as np

    from apps.medical.data import load_prepared, read_truth, split_series
    from apps.medical.predictor import build_detector
    from apps.medical.training import detector_samples

    if not args.medical_teacher_dir or args.medical_detector != "dense":
        raise SystemExit("--medical-scoring-only needs --medical-teacher-dir and a dense detector")
    root = medical_data(args)
    tcfg, scfg = medical_configs(args, root)
    teacher = load_medical_teacher(Path(args.medical_teacher_dir), tcfg)
    student = build_detector(scfg)
    truth = read_truth(root)
    train, held = split_series(truth.seriesuids, tcfg.data.heldout_fraction, tcfg.data.split_seed)
    scans = load_prepared(tcfg, root, held[: args.medical_scoring_scans])
    crop_scans = load_prepared(tcfg, root, train[:4])
    crops = detector_samples(tcfg, crop_scans, truth.subset(train[:4]), np.random.default_rng(0))
    dev = "cuda" if args.device == "cuda" else "cpu"
    rows = []
    for name, model in (("teacher", teacher.detector), ("student", student)):
        rows.append(
            {
                "model": name,
                "active_params": count_active_params(model),
                "stage1_crops_per_s": crop_rates(model, crops["image"], args),
                "scans_per_s": heatmap_scans_per_s(
                    model, scans, tcfg, args.medical_scoring_batch, dev
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    t, st = rows
    per_scan = st["scans_per_s"] / t["scans_per_s"]
    details = {
        "rows": rows,
        "scan_speedup": per_scan,
        "crop_speedup": throughput_summary(rows, "stage1_crops_per_s"),
        "scoring_target_3x_met": per_scan >= 3.0,
        "n_scans": len(scans),
        "window_batch": args.medical_scoring_batch,
        "windows": f"crop {tuple(tcfg.detector.crop_zyx)}, stride "
        f"{tuple(tcfg.detector.infer_stride_zyx or tcfg.detector.stride_zyx)}, "
        f"tta_flips {tcfg.detector.tta_flips}",
        "student": "untrained, the architecture of the distilled / scratch students",
        "student_detector": dense_student_summary(scfg.detector),
        "teacher_dir": args.medical_teacher_dir,
        "machine": machine(),
    }
    print(json.dumps({"scan_speedup": per_scan}), flush=True)
    return {"medical_student_scoring_speedup": (per_scan, details)}


def load_medical_teacher(path: Path, tcfg: Any) -> Any:
    """A saved :class:`NoduleDetector` as the teacher; its detector kind and grid must be the
    ones the students are built for, or the distillation compares different tasks."""
    from apps.medical.predictor import NoduleDetector

    teacher = NoduleDetector.load(path)
    tc, want = teacher.config, tcfg
    got_key = (tc.detector.kind, tuple(tc.spacing_zyx), tuple(tc.detector.crop_zyx))
    want_key = (want.detector.kind, tuple(want.spacing_zyx), tuple(want.detector.crop_zyx))
    if got_key != want_key:
        raise ValueError(
            f"--medical-teacher-dir {path}: teacher is (kind, spacing, crop) {got_key}, the "
            f"students are built for {want_key}"
        )
    return teacher


def medical_hidden_matching(args: argparse.Namespace, tcfg: Any, scfg: Any) -> dict[str, Any]:
    """``DistillConfig`` fields for ``--medical-hidden-weight`` (empty when 0): student block
    ``i`` of ``Ls`` matches teacher block ``round(i * Lt / Ls)`` (the output of the same share
    of the depth; FitNets-style, through core's learned projection d_student -> d_teacher).
    Feature imitation is what detection distillation leans on most; the heat map alone
    carries a few peaks per crop."""
    w = float(getattr(args, "medical_hidden_weight", 0.0))
    if w <= 0:
        return {}
    ls = int(scfg.detector.backbone.n_layers)
    lt = int(tcfg.detector.backbone.n_layers)
    return {"hidden_weight": w, "layer_map": {i: round(i * lt / ls) for i in range(1, ls + 1)}}


def run_medical_distill(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher, distilled student, scratch student (same budget) of the medical detector
    (``--medical-detector``: the two-stage token detector, or the dense voxel heat map alone)
    on the npz phantoms; LUNA16 CPM on the held-out series (split by series UID). The
    teacher is trained here, or loaded with ``--medical-teacher-dir``."""
    import numpy as np

    from apps.medical.data import load_prepared, load_raw_scan, read_truth, split_series
    from apps.medical.distillation import distill_fit_predictor
    from apps.medical.predictor import NoduleDetector
    from apps.medical.training import detector_samples, fit_detector, fit_fp_reduction

    root = medical_data(args)
    tcfg, scfg = medical_configs(args, root)
    truth = read_truth(root)
    train, held = split_series(truth.seriesuids, tcfg.data.heldout_fraction, tcfg.data.split_seed)
    tr_truth, held_truth = truth.subset(train), truth.subset(held)
    # on the GPU when there is one (scipy on the CPU took 163 s of a 574 s H200 call)
    scans = load_prepared(tcfg, root, train)
    unlabeled = medical_transfer_set(args, root, tcfg)

    def two_stage(cfg: Any) -> Any:
        det = fit_detector(cfg, scans, tr_truth)
        fp = fit_fp_reduction(cfg, det, scans, tr_truth) if cfg.fp_reduction.enabled else None
        return NoduleDetector(cfg, det, fp)

    t0 = time.perf_counter()
    if args.medical_teacher_dir:
        teacher = load_medical_teacher(Path(args.medical_teacher_dir), tcfg)
        say(f"medical: teacher loaded from {args.medical_teacher_dir}")
        t_teacher = None  # trained elsewhere (e.g. by bench.medical_bench on the same split)
    else:
        say(f"medical: teacher ({len(train)} training series, {len(held)} held out)")
        teacher = two_stage(tcfg)
        t_teacher = time.perf_counter() - t0
    hidden = medical_hidden_matching(args, tcfg, scfg)
    distilled, t_distill = None, None
    if not getattr(args, "medical_skip_distilled", False):
        say("medical: distilled student")
        t0 = time.perf_counter()
        dcfg = {"alpha": args.alpha, "temperature": args.medical_temperature, **hidden}
        distilled = distill_fit_predictor(
            scfg, teacher, dcfg, scans=scans, unlabeled_scans=unlabeled
        ).predictor
        t_distill = time.perf_counter() - t0
    scratch, t_scratch = None, None
    if not getattr(args, "medical_skip_scratch", False):
        say("medical: scratch student")
        t0 = time.perf_counter()
        scratch = two_stage(scfg)
        t_scratch = time.perf_counter() - t0
    crops = detector_samples(tcfg, scans[:4], tr_truth, np.random.default_rng(0))["image"]
    held_scans = [load_raw_scan(root, u) for u in held]
    rows = [
        _medical_row(n, p, held_scans, held_truth, crops, args)
        for n, p in (
            ("teacher", teacher),
            ("student_distilled", distilled),
            ("student_scratch", scratch),
        )
        if p is not None
    ]
    by_name = {r["model"]: r for r in rows}
    dist_row, scratch_row = by_name.get("student_distilled"), by_name.get("student_scratch")
    ratio = rows[0]["active_params"] / rows[1]["active_params"]
    teacher_cpm = rows[0]["cpm"]
    details: dict[str, Any] = {
        "rows": rows,
        "teacher_over_student_active_params": ratio,
        "scratch_retention": (
            scratch_row["cpm"] / teacher_cpm if scratch_row and teacher_cpm > 0 else None
        ),
        "distilled_beats_scratch": (
            dist_row["cpm"] > scratch_row["cpm"] if dist_row and scratch_row else None
        ),
        "throughput": throughput_summary(rows, "stage1_crops_per_s"),
        "alpha": args.alpha,
        "temperature": args.medical_temperature,
        "hidden_matching": hidden or None,
        "unlabeled_transfer_series": len(unlabeled),
        "epochs_per_stage": args.medical_epochs,
        "train_seconds": {"teacher": t_teacher, "distill": t_distill, "scratch": t_scratch},
        "data": f"{len(truth.seriesuids)} synthetic phantoms ({root.name}), npz",
        "n_train_series": len(train),
        "n_heldout_series": len(held),
        "n_heldout_nodules": len(held_truth.annotations),
        "detector": (
            f"dense voxel heat map, {tcfg.spacing_zyx[0]:g} mm grid, stage 1 only"
            if args.medical_detector == "dense"
            else "token heat map + FP reduction (synthetic_bench sizes for the teacher)"
        ),
        "minutes_per_model": args.medical_minutes,
        "teacher_dir": args.medical_teacher_dir,
        "student_detector": dense_student_summary(scfg.detector),
        "student_ema_decay": scfg.detector.trainer.ema_decay,
        "protocol": "LUNA16 FROC / CPM (apps/medical/froc.py) on held-out synthetic series",
        "machine": machine(),
        "seed": args.seed,
    }
    if ratio < 4:
        details["warning"] = f"teacher has only {ratio:.1f}x the student's active params"
    if teacher_cpm <= 0:
        details["warning_cpm"] = "teacher CPM is 0: retention undefined, recorded as 0"
    if dist_row is None:  # --medical-skip-distilled: the scratch twin of a recorded run
        return {"medical_student_scratch_cpm": (scratch_row["cpm"], details)}
    retention = dist_row["cpm"] / teacher_cpm if teacher_cpm > 0 else 0.0
    key = "medical_student_retention" + (f"_unlabeled{len(unlabeled)}" if unlabeled else "")
    if scfg.detector.trainer.ema_decay is not None:
        key += f"_ema{scfg.detector.trainer.ema_decay:g}"
    return {key: (retention, details)}


def medical_transfer_set(args: argparse.Namespace, root: Path, tcfg: Any) -> list[Any]:
    """``--medical-unlabeled-series N``: the N training-only extra phantoms of ``root``
    (:func:`bench.medical_bench.extra_train_uids`: the folder must hold exactly N), prepared on the students' grid, as the
    distilled student's transfer set; their truth rows are never read. Empty when 0."""
    from apps.medical.data import load_prepared
    from bench.medical_bench import extra_train_uids

    n = int(getattr(args, "medical_unlabeled_series", 0))
    if n <= 0:
        return []
    want = copy.deepcopy(tcfg)
    want.data.generate = {"extra_train_series": n}
    return load_prepared(tcfg, root, extra_train_uids(root, want))


# ============================================================================ ddp2


def _state_bytes(model: Any, opt: torch.optim.Optimizer) -> dict[str, float]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards under FSDP2)."""

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(nbytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return {
        "params_gb": params / 2**30,
        "grads_gb": grads / 2**30,
        "optim_gb": state / 2**30,
        "total_gb": (params + grads + state) / 2**30,
    }


def _lm_config(a: dict) -> Any:
    from core.config import AttentionConfig, BackboneConfig, MoEConfig

    return BackboneConfig(
        d_model=a["d"],
        n_layers=a["layers"],
        ffn_hidden=4 * a["d"],
        attention=AttentionConfig(n_heads=max(1, a["d"] // 64), gated=True, top_k=None),
        moe=MoEConfig(n_routed_experts=8, top_k=2, n_shared_experts=1, expert_hidden=2 * a["d"]),
        n_dense_layers=1,
    )


def _lm_settings(args: argparse.Namespace, tiny: bool) -> dict[str, Any]:
    """The bench LM's size and optimizer settings: the GPU flags, or the CPU smoke sizes."""
    return {
        "device": "cpu" if tiny else "cuda",
        "d": 64 if tiny else args.d_model,
        "layers": 2 if tiny else args.layers,
        "seq": 32 if tiny else args.seq,
        "vocab": 256 if tiny else 8192,
        "lr": 1e-3,
        "warmup": 1 if tiny else args.warmup,
    }


def _lm_batch(a: dict, rows: int, step: int, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: random tokens whose target is a fixed per-token map, so
    the loss falls within tens of steps and loss curves can be compared."""
    g = torch.Generator(device="cpu").manual_seed(1000 + step)
    ids = torch.randint(0, a["vocab"], (rows, a["seq"]), generator=g)
    return ids.to(dev), ((ids * 31 + 7) % a["vocab"]).to(dev)


def _dist_init(rank: int, world: int, port: int, cuda: bool) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)


def _ddp2_worker(rank: int, world: int, mode: str, a: dict, out: str) -> None:
    """One rank of a plain-PyTorch run. Rank r takes micro-batch r of each global batch of
    ``world * accum * batch`` rows; ``accum`` > 1 on one GPU accumulates the micro-batches
    that the ranks of a larger world take, so those runs compute the same losses."""
    import torch.distributed as dist
    from torch import nn

    from bench.train_bench import LMBench

    cuda = a["device"] == "cuda"
    dev = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = LMBench(_lm_config(a), a["vocab"]).to(dev)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        fn = DistributedDataParallel(
            model, device_ids=[rank] if cuda else None, gradient_as_bucket_view=True
        )
    elif mode == "fsdp2":
        # what core.engine.fully_shard_task does under bf16-mixed: bf16 gathers, fp32 reduces
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {}
        if cuda:
            kw["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        for block in model.backbone.blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        fn = model
    else:
        fn = model
    opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(0.9, 0.95))
    b, vocab, accum = a["batch"], a["vocab"], a["accum"]
    losses, times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(a["warmup"] + a["steps"]):
        ids, target = _lm_batch(a, world * accum * b, step, dev)
        mine = [slice((rank * accum + m) * b, (rank * accum + m + 1) * b) for m in range(accum)]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        for sl in mine:
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                logits = fn(ids[sl])
            loss = nn.functional.cross_entropy(
                logits.float().view(-1, vocab), target[sl].reshape(-1)
            )
            (loss / accum).backward()
            total += loss.detach() / accum
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        if step >= a["warmup"]:
            times.append((time.perf_counter() - t0) * 1e3)
        if world > 1:
            dist.all_reduce(total)
            total = total / world
        losses.append(float(total))
    mem = _state_bytes(model, opt)
    mem["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if rank == 0:
        _write_run(out, mode, world, a, times, losses, mem)


def _write_run(
    out: str,
    mode: str,
    world: int,
    a: dict,
    times: list[float],
    losses: list[float],
    mem: dict[str, Any],
    **extra: Any,
) -> None:
    """One run's record (median step time, tokens/s, losses, memory, ``extra``) as JSON."""
    times = sorted(times)
    step_ms = times[len(times) // 2]
    rows = world * a["accum"] * a["batch"]
    res = {
        "mode": mode,
        "world": world,
        "accum": a["accum"],
        "batch_per_rank": a["batch"],
        "step_ms": step_ms,
        "tokens_per_s": rows * a["seq"] / (step_ms / 1e3),
        "losses": losses,
        "mem_per_rank": mem,
        **extra,
    }
    Path(out).write_text(json.dumps(res))


def _lightning_worker(rank: int, world: int, a: dict, out: str) -> None:
    """One rank of the same LM trained through core.engine (Lightning Trainer, bf16-mixed;
    ``world`` 2: ``strategy="fsdp2"``, Lightning's ModelParallelStrategy). Each rank is set
    up as torchrun would (env rendezvous), so Lightning joins instead of launching. Rank 0
    then checks the way back to one device: the sharded checkpoint directory and the
    in-memory gather give the same logits as the sharded model."""
    import os

    import lightning
    import torch.distributed as dist
    from torch import nn

    # Runs share a process (1-GPU jobs one after another, the pair jobs in the same two
    # ranks). Sharing it with earlier compiled runs halved compiled FSDP2 runs on the H200
    # (session 7) while fresh processes did not, so each run starts from a clean dynamo.
    torch._dynamo.reset()

    from core.engine import TaskModule, TrainerConfig, build_trainer
    from core.sharding import load_module, single_device_copy

    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    cuda = a["device"] == "cuda"

    class LMTask(TaskModule):
        def __init__(self, backbone_config, optim_config=None, vocab: int = 256) -> None:
            super().__init__(backbone_config, optim_config, vocab=vocab)
            self.embed = nn.Embedding(vocab, self.backbone_config.d_model)
            self.head = nn.Linear(self.backbone_config.d_model, vocab, bias=False)

        def tokens(self, batch):
            return self.embed(batch[0]), None

        def head_forward(self, out, batch):
            return self.head(out.last_hidden)

        def loss(self, preds, batch):
            return nn.functional.cross_entropy(
                preds.float().reshape(-1, preds.shape[-1]), batch[1].reshape(-1)
            )

    class Steps(torch.utils.data.IterableDataset):
        """This rank's micro-batch of each global step (the same rows as above). Iterable, so
        Lightning adds no distributed sampler that would deal whole steps to the ranks."""

        def __iter__(self):
            for i in range(a["warmup"] + a["steps"]):
                ids, target = _lm_batch(a, world * a["batch"], i, "cpu")
                sl = slice(rank * a["batch"], (rank + 1) * a["batch"])
                yield ids[sl], target[sl]

    class Timer(lightning.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"].detach().clone()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            if cuda:
                torch.cuda.synchronize()
            if batch_idx >= a["warmup"]:
                self.times.append((time.perf_counter() - self.t0) * 1e3)
            self.losses.append(float(loss))

    torch.manual_seed(0)
    module = LMTask(
        _lm_config(a),
        {"lr": a["lr"], "warmup_steps": 0, "weight_decay": 0.0, "min_lr_ratio": 1.0},
        vocab=a["vocab"],
    )
    timer = Timer()
    tcfg = TrainerConfig(
        accelerator="gpu" if cuda else "cpu",
        devices=world,
        strategy=a.get("strategy") or ("fsdp2" if world > 1 else "auto"),
        precision=a.get("precision") or ("bf16-mixed" if cuda else "32"),
        compile=bool(a.get("compile")),
        fp8_min_features=a.get("fp8_min_features", 2048),
        max_steps=a["warmup"] + a["steps"],
        default_root_dir=str(Path(out).parent / f"lightning{world}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10_000,
        seed=0,
    )
    trainer = build_trainer(tcfg, extra_callbacks=[timer], logger=False)
    if cuda:  # 1-GPU jobs share one process: each peak is its own run's
        torch.cuda.reset_peak_memory_stats()
    # the Steps dataset already holds this rank's share: no distributed sampler on top
    trainer.fit(module, torch.utils.data.DataLoader(Steps(), batch_size=None, shuffle=False))
    mem = _state_bytes(module, trainer.optimizers[0])
    mem["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    reload_gap = None
    if tcfg.strategy == "fsdp2":
        ckpt = Path(out).with_suffix(".ckpt")
        trainer.save_checkpoint(ckpt)
        ids, _ = _lm_batch(a, 2, 10_000, "cpu")
        module.eval()
        with torch.no_grad():  # the sharded model itself, in fp32 (no autocast)
            sharded = module((ids.to(module.device), None)).float().cpu()
        plain = single_device_copy(module).eval()
        if rank == 0:
            loaded = load_module(ckpt, LMTask)
            with torch.no_grad():
                ref = plain((ids, None)).float()
                reload_gap = {
                    "checkpoint_vs_gathered": float(
                        (loaded((ids, None)).float() - ref).abs().max()
                    ),
                    "gathered_vs_sharded": float((ref - sharded).abs().max()),
                    "logit_scale": float(ref.abs().max()),
                }
    if rank == 0:
        _write_run(
            out,
            f"lightning_{tcfg.strategy}",
            world,
            {**a, "accum": 1},
            timer.times,
            timer.losses,
            mem,
            reload_max_abs_gap=reload_gap,
        )


def _spawn(fn: Any, world: int, args: tuple, limit_s: float = 300.0) -> None:
    """``fn(rank, world, *args)`` on ``world`` processes; a run that has not finished within
    ``limit_s`` (a rank that never joined the rendezvous, a collective left waiting) is
    killed and raised as ``TimeoutError`` instead of holding the machine."""
    import torch.multiprocessing as mp

    if world == 1:
        fn(0, 1, *args)
        return
    ctx = mp.spawn(fn, args=(world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            alive = [p.pid for p in ctx.processes if p.is_alive()]
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(
                f"{fn.__name__} x{world}: not done after {limit_s:.0f} s (alive: {alive})"
            )


def _pair_worker(rank: int, world: int, jobs: list, port: int, cuda: bool) -> None:
    """Every multi-GPU job of the bench in one set of processes and one process group, in
    order, with a barrier between jobs (one rendezvous instead of one per job)."""
    import torch.distributed as dist

    _dist_init(rank, world, port, cuda)
    try:
        for worker, a, out in jobs:  # worker: "lightning", or a _ddp2_worker mode
            if worker == "lightning":
                _lightning_worker(rank, world, a, out)
            else:
                _ddp2_worker(rank, world, worker, a, out)
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def ddp2_plan(
    small: int,
    large: int,
    steps: tuple[int, int],
    fp8_compile: bool = False,
    engine_only: bool = False,
) -> list[tuple[str, str, int, dict[str, Any]]]:
    """The ddp2 bench's runs, ``(name, worker, world, settings)``; ``steps`` = (steps of the
    loss-curve runs, steps of the speed-only runs).

    The full plan: hand-written DDP / FSDP2 at ``small`` and ``large`` sequences per GPU, and
    the engine (Lightning) pair at ``small`` per rank against one GPU taking both ranks' rows
    in one micro-batch (the same global batches: loss-curve and reload checks).
    ``engine_only``: that engine pair, plus an engine weak-scaling pair at ``large``
    sequences per GPU (one GPU at the same micro-batch), which measures the engine's own
    2-GPU efficiency where compute can hide the gathers. ``fp8_compile`` repeats each engine
    pair under FP8 (torchao) + compile (``_fp8`` in the name).
    """
    curve, speed = steps
    pairs = [("", 2 * small, small, curve)]  # (name suffix, 1-GPU batch, per-rank batch, steps)
    if engine_only:
        pairs.append(("_large", large, large, speed))
    variants = [("", {})]
    if fp8_compile:
        variants.append(("_fp8", {"precision": "fp8", "compile": True, "fp8_min_features": 1024}))
    engine = []
    for tag, extra in variants:
        for suffix, one_batch, rank_batch, n in pairs:
            for world, mode, batch in ((1, "single", one_batch), (2, "fsdp2", rank_batch)):
                settings = {**extra, "batch": batch, "accum": 1, "steps": n}
                engine.append((f"lightning_{mode}{tag}{suffix}", "lightning", world, settings))
    if engine_only:
        return engine
    hand = [
        ("single_accum", "single", 1, {"batch": small, "accum": 2, "steps": curve}),
        ("ddp", "ddp", 2, {"batch": small, "accum": 1, "steps": curve}),
        ("fsdp2", "fsdp2", 2, {"batch": small, "accum": 1, "steps": curve}),
        ("single", "single", 1, {"batch": small, "accum": 1, "steps": speed}),
        ("single_large", "single", 1, {"batch": large, "accum": 1, "steps": speed}),
        ("ddp_large", "ddp", 2, {"batch": large, "accum": 1, "steps": speed}),
        ("fsdp2_large", "fsdp2", 2, {"batch": large, "accum": 1, "steps": speed}),
    ]
    return hand + engine


def cmd_ddp2(args: argparse.Namespace) -> tuple[float, dict] | None:
    """1 GPU vs 2 GPUs (DDP, FSDP2), plain PyTorch and through core.engine (Lightning).

    * Weak scaling (``ddp2_scaling_efficiency``): each GPU runs the same micro-batch per step
      (``--batch`` and ``--large-batch`` sequences); efficiency = tokens/s on 2 GPUs /
      (2 x tokens/s on 1 GPU), DDP and FSDP2 (bf16 gathers, fp32 reduces) both reported; the
      headline is DDP at ``--large-batch``, the full-sharding figures sit beside it.
    * Same loss curve: the 1-GPU run accumulates the two micro-batches the two ranks take,
      so all three runs see the same global batches; max |loss gap| over the steps.
    * Memory: this rank's parameters + gradients + AdamW state (local shards under FSDP2).
    * Lightning: the same model as a TaskModule through ``core.engine.build_trainer``
      (1 GPU with both ranks' rows in one batch, and ``strategy="fsdp2"`` on 2: the same
      global batches), then the sharded checkpoint and the gathered copy checked against
      the sharded model's logits.

    * ``--engine-only``: only the engine runs, plus an engine weak-scaling pair at
      ``--large-batch`` (see :func:`ddp2_plan`), recorded as
      ``ddp2_engine_weak_scaling_efficiency`` (the headline key is left alone).

    ``--tiny``: the same code on CPU with 2 gloo processes (a smoke check, not a measurement).
    Entry points: ``python -m bench.train_bench ddp2 [--tiny] [--engine-only]`` or this function.
    """
    import tempfile

    tiny = getattr(args, "tiny", False)
    base = _lm_settings(args, tiny)
    device = base["device"]
    if device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"ddp2 needs 2 GPUs; found {torch.cuda.device_count()}")
    small, large = (2, 4) if tiny else (args.batch, args.large_batch)
    curve_steps, speed_steps = (4, 2) if tiny else (args.steps, max(10, args.steps // 3))
    engine_only = bool(getattr(args, "engine_only", False))
    fp8_compile = bool(getattr(args, "fp8_compile", False))
    plan = ddp2_plan(small, large, (curve_steps, speed_steps), fp8_compile, engine_only)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        pair_jobs = []
        for name, worker, world, extra in plan:
            a, out = {**base, **extra}, f"{tmp}/{name}.json"
            if world > 1:
                pair_jobs.append((worker, a, out))
                continue
            try:
                if worker == "lightning":
                    _lightning_worker(0, 1, a, out)
                else:
                    _ddp2_worker(0, 1, worker, a, out)
            except Exception as err:  # an optional (FP8) job must not cost the others
                if "fp8" not in name:
                    raise
                print(f"{name} failed: {err!r}", flush=True)
        print(f"1-GPU runs done ({time.time() - t0:.0f} s)", flush=True)
        try:  # the FP8 jobs run last: what finished before a failure is kept
            _spawn(_pair_worker, 2, (pair_jobs, 29533, device == "cuda"), limit_s=540)
        except Exception as err:
            print(f"2-GPU runs stopped: {err!r}", flush=True)
        print(f"2-GPU runs done ({time.time() - t0:.0f} s)", flush=True)
        for name, *_ in plan:
            path = Path(f"{tmp}/{name}.json")
            if not path.exists() and "fp8" in name:
                continue
            results[name] = r = json.loads(path.read_text())
            print(
                f"{name}: {r['tokens_per_s']:.0f} tok/s, step {r['step_ms']:.1f} ms, state/rank"
                f" {r['mem_per_rank']['total_gb']:.3f} GB, loss {r['losses'][0]:.3f} ->"
                f" {r['losses'][-1]:.4f}",
                flush=True,
            )

    def eff(two: str, one: str) -> float:
        return results[two]["tokens_per_s"] / (2 * results[one]["tokens_per_s"])

    def gap(x: str, y: str) -> float:
        pairs = zip(results[x]["losses"], results[y]["losses"], strict=True)
        return max(abs(p - q) for p, q in pairs)

    if engine_only:
        return _engine_only_result(
            args, tiny, results, eff, gap, {**base, "batch": small, "large_batch": large}
        )
    details = {
        "settings": {**base, "batch": small, "large_batch": large},
        "weak_scaling_efficiency": {
            f"ddp_batch{small}": eff("ddp", "single"),
            f"fsdp2_batch{small}": eff("fsdp2", "single"),
            f"ddp_batch{large}": eff("ddp_large", "single_large"),
            f"fsdp2_batch{large}": eff("fsdp2_large", "single_large"),
        },
        "same_global_batch_efficiency": {
            "ddp": eff("ddp", "single_accum"),
            "fsdp2": eff("fsdp2", "single_accum"),
            "lightning_fsdp2_vs_lightning_1gpu_double_batch": eff(
                "lightning_fsdp2", "lightning_single"
            ),
        },
        "state_gb_per_rank": {m: r["mem_per_rank"]["total_gb"] for m, r in results.items()},
        "peak_allocated_gb": {
            m: r["mem_per_rank"]["peak_allocated_gb"] for m, r in results.items()
        },
        "max_loss_gap_vs_single_accum": {m: gap(m, "single_accum") for m in ("ddp", "fsdp2")},
        "lightning_max_loss_gap_fsdp2_vs_single": gap("lightning_fsdp2", "lightning_single"),
        "lightning_reload_max_abs_gap": results["lightning_fsdp2"].get("reload_max_abs_gap"),
        **(
            {
                "lightning_fp8_compile": {
                    "efficiency_vs_1gpu_double_batch": eff(
                        "lightning_fsdp2_fp8", "lightning_single_fp8"
                    ),
                    "max_loss_gap_fsdp2_vs_single": gap(
                        "lightning_fsdp2_fp8", "lightning_single_fp8"
                    ),
                    "speedup_over_bf16_fsdp2": results["lightning_fsdp2_fp8"]["tokens_per_s"]
                    / results["lightning_fsdp2"]["tokens_per_s"],
                    "reload_max_abs_gap": results["lightning_fsdp2_fp8"].get("reload_max_abs_gap"),
                }
            }
            if {"lightning_fsdp2_fp8", "lightning_single_fp8"} <= results.keys()
            else {}
        ),
        "loss_first_last": {m: (r["losses"][0], r["losses"][-1]) for m, r in results.items()},
        "runs": results,
        "definition": (
            "weak scaling: tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU), the same micro-batch"
            f" per GPU per step; headline: DDP at {large} x {base['seq']} tokens per GPU"
            " (bf16 autocast, AdamW); same_global_batch_efficiency: the 1-GPU run accumulates"
            " both micro-batches per optimizer step (stricter: its optimizer step is shared)"
        ),
    }
    value = eff("ddp_large", "single_large")
    if getattr(args, "return_results", False):
        return value, details
    if tiny:
        print(
            json.dumps({"ddp2_scaling_efficiency(cpu smoke)": value, **details}, default=str)[:3000]
        )
    else:
        record("scale", "ddp2_scaling_efficiency", value, details)


def _engine_only_result(
    args: argparse.Namespace,
    tiny: bool,
    results: dict[str, dict],
    eff: Any,
    gap: Any,
    settings: dict[str, Any],
) -> tuple[float, dict] | None:
    """``ddp2 --engine-only``: the engine's (Lightning FSDP2) 2-GPU figures, recorded as
    ``ddp2_engine_weak_scaling_efficiency`` (bf16-mixed at ``--large-batch`` sequences per
    GPU); the hand-written headline ``ddp2_scaling_efficiency`` is left as it is."""
    fp8_runs = {f"lightning_{m}_fp8{x}" for m in ("single", "fsdp2") for x in ("", "_large")}
    tags = [""] + (["_fp8"] if fp8_runs <= results.keys() else [])  # an FP8 failure is skipped
    details: dict[str, Any] = {"settings": settings, "runs": results}
    for tag in tags:
        one, two = f"lightning_single{tag}", f"lightning_fsdp2{tag}"
        every = (one, two, f"{one}_large", f"{two}_large")
        details[f"engine{tag or '_bf16'}"] = {
            "weak_scaling_efficiency_large_batch": eff(f"{two}_large", f"{one}_large"),
            "same_global_batch_efficiency": eff(two, one),
            "max_loss_gap_fsdp2_vs_single": gap(two, one),
            "reload_max_abs_gap": results[two].get("reload_max_abs_gap"),
            "tokens_per_s": {n: results[n]["tokens_per_s"] for n in every},
            "state_gb_per_rank": {n: results[n]["mem_per_rank"]["total_gb"] for n in (one, two)},
            "peak_allocated_gb": {
                n: results[n]["mem_per_rank"]["peak_allocated_gb"] for n in every
            },
        }
    details["definition"] = (
        "engine (core.engine.build_trainer, Lightning ModelParallelStrategy) weak scaling: tokens/s"
        " of fsdp2 on 2 GPUs / (2 x tokens/s on 1 GPU), both at large_batch sequences per GPU;"
        " same_global_batch_efficiency: 2 GPUs at batch per rank vs 1 GPU taking both ranks' rows"
    )
    value = details["engine_bf16"]["weak_scaling_efficiency_large_batch"]
    if getattr(args, "return_results", False):
        return value, details
    if tiny:
        print(json.dumps({"engine weak scaling (cpu smoke)": value, **details}, default=str)[:3000])
    else:
        record("scale", "ddp2_engine_weak_scaling_efficiency", value, details)
    return None


def cmd_fsdp2_one_gpu(args: argparse.Namespace) -> tuple[float, dict] | None:
    """FSDP2 through core.engine on ONE device, against the unsharded engine run: the
    composition check for a machine with a single GPU (no scaling figure).

    Two runs of the ddp2 bench's LM on the same batches: ``strategy="auto"`` and
    ``strategy="fsdp2"`` (a 1-rank mesh: bf16 gathers, sharded optimizer step, sharded
    checkpoint), each bf16-mixed; with ``--fp8-compile`` the same pair again under FP8
    (torchao, float8 all-gather) with compiled blocks. Reported: the largest per-step loss
    gap, the sharded checkpoint and the gathered copy against the sharded model's logits,
    and tokens/s of both. ``--tiny``: CPU, fp32. Entry point: ``python -m bench.train_bench
    fsdp2-1gpu``.
    """
    import tempfile

    tiny = getattr(args, "tiny", False)
    base = {
        **_lm_settings(args, tiny),
        "batch": 4 if tiny else 2 * args.batch,
        "accum": 1,
        "steps": 4 if tiny else args.steps,
    }
    variants: dict[str, dict] = {"bf16": {}}
    fp8 = {"precision": "fp8", "fp8_min_features": 1024}
    if getattr(args, "fp8_compile", False):
        variants["fp8_compile"] = {**fp8, "compile": True}
    if getattr(args, "separate", False):  # which of FP8 and compile costs FSDP2 its speed
        variants["bf16_compile"] = {"compile": True}
        variants["fp8_eager"] = fp8
    details: dict[str, Any] = {"settings": base, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants.items():
            runs = {}
            for strategy in ("auto", "fsdp2"):
                out = f"{tmp}/{name}_{strategy}.json"
                try:
                    _lightning_worker(0, 1, {**base, **extra, "strategy": strategy}, out)
                except Exception as err:
                    if name == "bf16":
                        raise
                    print(f"{name} {strategy} failed: {err!r}", flush=True)
                    break
                runs[strategy] = r = json.loads(Path(out).read_text())
                print(
                    f"{name} {strategy}: {r['tokens_per_s']:.0f} tok/s, state"
                    f" {r['mem_per_rank']['total_gb']:.3f} GB, loss {r['losses'][0]:.3f} ->"
                    f" {r['losses'][-1]:.4f}",
                    flush=True,
                )
            if len(runs) < 2:
                details["variants"][name] = {"error": "a run failed; see the log"}
                continue
            pairs = zip(runs["auto"]["losses"], runs["fsdp2"]["losses"], strict=True)
            details["variants"][name] = {
                "max_loss_gap_fsdp2_vs_unsharded": max(abs(p - q) for p, q in pairs),
                "loss_first_last": {k: (v["losses"][0], v["losses"][-1]) for k, v in runs.items()},
                "tokens_per_s": {k: v["tokens_per_s"] for k, v in runs.items()},
                "state_gb": {k: v["mem_per_rank"]["total_gb"] for k, v in runs.items()},
                "reload_max_abs_gap": runs["fsdp2"]["reload_max_abs_gap"],
            }
    value = details["variants"]["bf16"]["max_loss_gap_fsdp2_vs_unsharded"]
    if getattr(args, "return_results", False):
        return value, details
    if tiny:
        print(json.dumps(details, default=str)[:3000])
    else:
        record("scale", "fsdp2_one_gpu_max_loss_gap", value, details)
    return None


# ============================================================================ main


def record_result(
    area: str, key: str, value: float | None, details: dict[str, Any]
) -> dict[str, Any]:
    """:func:`bench.common.record`, or for ``value=None`` (an invalid measurement, reason in
    ``details``) the same atomic merge with ``"value": null``; returns the recorded entry."""
    if value is not None:
        return record(area, key, float(value), details)
    import datetime as dt
    import os
    import tempfile

    from bench.common import RESULTS_DIR

    out_dir = Path(os.environ.get("KEEL_BENCH_RESULTS", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{area}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {
        "value": None,
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": details.get("command"),
        "details": details,
    }
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)
    print(f"[{area}] {key} = null ({details.get('invalid_reason', 'no value')})", flush=True)
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI's options, with ``--tiny`` clamping every epoch count to 1 (growth: 2, so the
    tiny growth run validates once before it grows)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--apps", nargs="+", default=["maintenance", "fraud", "medical"])
    ap.add_argument("--skip-growth", action="store_true")
    ap.add_argument("--skip-distill", action="store_true", help="growth experiment only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes (data_samples)")
    ap.add_argument("--data-dir", default=None, help="C-MAPSS folder (default: shared data)")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--alpha", type=float, default=0.7, help="teacher-term weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's CPU threads in this process (default: 2 on --device cpu, torch's own "
        "default, every core, on cuda). Runs sharing one machine should split its cores: five "
        "CUDA maintenance runs at torch's default on 16 cores did not finish (session 20)",
    )
    ap.add_argument("--train-stride", type=int, default=None, help="maintenance window stride")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument(
        "--maint-teacher-d", type=int, default=64, help="maintenance teacher d_model (FFN 2x)"
    )
    ap.add_argument(
        "--maint-teacher",
        default="single",
        choices=["single", "ensemble"],
        help="maintenance teacher: one model widened to --maint-teacher-d, or the FD001 "
        "recipe's seed ensemble (ensemble_size members; targets = their mean prediction)",
    )
    ap.add_argument("--student-epochs", type=int, default=30)
    ap.add_argument(
        "--maint-distill-mixup",
        type=float,
        default=0.0,
        help="teacher-labelled mixup windows per training window for the distilled "
        "maintenance student (MaintenanceConfig.distill_mixup; recorded under "
        "maintenance_student_retention_mixup<R>)",
    )
    ap.add_argument(
        "--maint-column-weights",
        choices=("task", "mean"),
        default="task",
        help="the maintenance teacher term over [RUL, alarm]: 'task' = the task loss's own "
        "weights [1, alarm_loss_weight] (the app's default since session 18), 'mean' = the "
        "plain mean over the two columns (before; recorded under ..._colmean)",
    )
    ap.add_argument("--growth-epochs", type=int, default=30)
    ap.add_argument("--grow-at", type=float, default=0.5, help="share of scratch steps")
    ap.add_argument("--growth-subset", default="fd004", help="C-MAPSS subset: fd001..fd004")
    ap.add_argument("--growth-small", default="d16,L1,F32", help="small model: d, L, FFN")
    ap.add_argument("--growth-large", default="d64,L4,F256", help="large model: d, L, FFN")
    ap.add_argument("--growth-head-dim", type=int, default=16, help="kept by d_model growth")
    ap.add_argument(
        "--score-batches",
        type=int,
        nargs="+",
        default=[65536, 1024],
        help="scoring batch sizes (rows); the largest decides the 3x throughput target",
    )
    ap.add_argument("--medical-data", default=None, help="npz folder (medical_bench layout)")
    ap.add_argument("--medical-epochs", type=int, default=10, help="epochs per stage")
    ap.add_argument(
        "--medical-detector",
        default="token",
        choices=["token", "dense"],
        help="dense: the shipped voxel heat map (stage 1 only), token: token heat map + FP",
    )
    ap.add_argument(
        "--medical-minutes",
        type=float,
        default=None,
        help="dense: wall-time budget per model (teacher, distilled, scratch); else epochs",
    )
    ap.add_argument(
        "--medical-grid-mm",
        type=float,
        default=2.0,
        choices=[2.0, 3.0],
        help="dense: 2 keeps synthetic_bench's own grid and 36^3 crops (1.5 mm since session 6; "
        "the value is a legacy name) or 3 (3 mm, 24^3 crops, cheaper on a CPU)",
    )
    ap.add_argument("--medical-student-d", type=int, default=32)
    ap.add_argument(
        "--medical-student-stem",
        type=int,
        default=None,
        help="dense: the student's stem channels (default: the teacher's)",
    )
    ap.add_argument(
        "--medical-student-full-attention",
        action="store_true",
        help="dense: the student's attention keeps every key (top_k None: one fused SDPA "
        "call) instead of the teacher's top-k graph (a logits pass, topk and a masked SDPA)",
    )
    ap.add_argument(
        "--medical-student-patch",
        type=int,
        default=None,
        help="dense: the student's patch edge in voxels, dividing the crop (default: the "
        "teacher's; 6 on 36^3 crops gives 216 tokens instead of 729)",
    )
    ap.add_argument(
        "--medical-scoring-only",
        action="store_true",
        help="dense: time teacher vs student architecture per crop and per whole held-out"
        " scan (no training); key medical_student_scoring_speedup",
    )
    ap.add_argument("--medical-scoring-scans", type=int, default=8)
    ap.add_argument(
        "--medical-scoring-batch",
        type=int,
        default=64,
        help="windows per forward for whole-scan timing, the same for both models",
    )
    ap.add_argument(
        "--medical-temperature",
        type=float,
        default=0.5,
        help="the voxel KL's temperature (0.5: chosen on the validation series' CPM among"
        " 2, 1 and 0.5 in session 15; apps/medical/configs/distill.yaml)",
    )
    ap.add_argument(
        "--medical-skip-scratch",
        action="store_true",
        help="medical: teacher and distilled student only (compare with a recorded scratch "
        "run of the same student and seed)",
    )
    ap.add_argument(
        "--medical-skip-distilled",
        action="store_true",
        help="medical: teacher and scratch student only (key medical_student_scratch_cpm), so "
        "a long schedule's two students can run as two processes side by side",
    )
    ap.add_argument(
        "--medical-unlabeled-series",
        type=int,
        default=0,
        help="dense: N more phantoms (bench.medical_bench --extra-train-series N; their "
        "truth never read) as the distilled student's transfer set; the scratch student "
        "cannot use them. Recorded under medical_student_retention_unlabeled<N>",
    )
    ap.add_argument(
        "--medical-ema-decay",
        type=float,
        default=None,
        help="both students (distilled and scratch) ship the exponential moving average of"
        " their weights (TrainerConfig.ema_decay); recorded under"
        " medical_student_retention_ema<decay>",
    )
    ap.add_argument(
        "--medical-hidden-weight",
        type=float,
        default=0.0,
        help="dense: weight of hidden-state matching (student block i -> teacher block "
        "i * Lt / Ls through a learned projection; 0 = off)",
    )
    ap.add_argument(
        "--medical-teacher-dir",
        default=None,
        help="load the teacher (a saved NoduleDetector on the same data and split) instead "
        "of training it",
    )
    ap.add_argument("--grow-budget", type=float, default=1.3, help="x scratch epochs")
    ap.add_argument("--fraud-config", default="demo", help="demo | ulb | handbook | YAML")
    ap.add_argument("--fraud-teacher-epochs", type=int, default=5)
    ap.add_argument("--fraud-student-epochs", type=int, default=5)
    ap.add_argument("--fraud-student-d", type=int, default=16, help="fraud student d_model")
    ap.add_argument("--fraud-student-layers", type=int, default=1, help="fraud student blocks")
    ap.add_argument(
        "--fraud-distill-kind",
        default="binary",
        choices=["binary", "regression"],
        help="fraud teacher term: tempered two-class KL or regression on the logit",
    )
    ap.add_argument("--fraud-distill-loss", default="mse", choices=["mse", "huber"])
    ap.add_argument(
        "--fraud-transfer-delay",
        action="store_true",
        help="backbone student: also train the distilled student on a share of the delay "
        "block against the teacher's logits (labels unknown there; equal steps kept)",
    )
    ap.add_argument(
        "--fraud-teacher-rows",
        default="all",
        choices=["all", "unlabelled"],
        help="rows the teacher term covers; unlabelled (with --fraud-transfer-delay): the "
        "transfer rows only, labels alone elsewhere (self-training with soft pseudo-labels)",
    )
    ap.add_argument(
        "--fraud-transfer-rate",
        type=float,
        default=None,
        help="share of the delay block drawn (default: the config's neg_sample_rate)",
    )
    ap.add_argument("--fraud-temperature", type=float, default=2.0, help="binary KL only")
    ap.add_argument(
        "--fraud-class-weighted",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="weight the teacher term per row like the task loss (frauds by pos_weight)",
    )
    ap.add_argument(
        "--fraud-teacher-dir",
        default=None,
        help="reuse the fraud teacher saved here by an earlier run (saved here if absent)",
    )
    ap.add_argument(
        "--fraud-student",
        default="backbone",
        choices=["backbone", "mlp"],
        help="backbone: the shrunk backbone (Lightning distillation); mlp: the fastscore "
        "MLP on the teacher's stored logits over the train + validation rows",
    )
    ap.add_argument("--fraud-mlp-hidden", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--fraud-mlp-epochs", type=int, default=6)
    ap.add_argument("--fraud-mlp-batch", type=int, default=1024)
    ap.add_argument("--fraud-mlp-lr", type=float, default=2e-3)
    ap.add_argument(
        "--fraud-mlp-alpha",
        type=float,
        default=1.0,
        help="MLP student: weight of the teacher term; 1 - alpha goes to the labels' BCE",
    )
    ap.add_argument(
        "--fraud-student-seeds",
        type=int,
        nargs="+",
        default=None,
        help="mlp: student seeds (one teacher; default --seed); the key is their mean",
    )
    ap.add_argument(
        "--fraud-delay-soft-labels",
        action="store_true",
        help="mlp: a third student distilled on the teacher's logits over the train +"
        " validation rows and the delay block (whose labels are not known yet at training"
        " time), and a scratch student with as many steps; the key reports the delay"
        " student against both scratch students",
    )
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument(
        "--mlflow",
        action="store_true",
        help="also log each teacher/distilled/scratch result as an MLflow run"
        " (bench.scale_mlflow; store: KEEL_TRACKING_URI, else ./mlflow.db)",
    )
    args = ap.parse_args(argv)
    if args.tiny:
        for k in ("teacher_epochs", "student_epochs", "medical_epochs"):
            setattr(args, k, min(getattr(args, k), 1))
        args.growth_epochs = min(args.growth_epochs, 2)
        args.fraud_teacher_epochs = min(args.fraud_teacher_epochs, 1)
        args.fraud_student_epochs = min(args.fraud_student_epochs, 1)
    if args.medical_skip_distilled and args.medical_skip_scratch:
        ap.error("--medical-skip-distilled with --medical-skip-scratch trains no student")
    if args.fraud_teacher_rows == "unlabelled" and not args.fraud_transfer_delay:
        ap.error(
            "--fraud-teacher-rows unlabelled needs --fraud-transfer-delay (no row is unlabelled)"
        )
    if args.fraud_transfer_delay and args.fraud_student == "mlp":
        ap.error(
            "--fraud-transfer-delay is for the backbone student; the MLP student's is --fraud-delay-soft-labels"
        )
    unknown = set(args.apps) - {"maintenance", "fraud", "medical"}
    if unknown:
        ap.error(f"apps {sorted(unknown)}: expected maintenance, fraud, medical")
    return args


def cpu_threads(args: argparse.Namespace) -> int | None:
    """torch's intra-op thread count for this run: ``--threads`` when given, else at most 2
    on the CPU (the benchmark machine's cores) and ``None`` (leave torch's default) on CUDA."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: expected at least 1")
        return args.threads
    if args.device == "cpu":
        return max(1, min(2, torch.get_num_threads()))
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = cpu_threads(args)
    if threads is not None:
        torch.set_num_threads(threads)
    results: dict[str, tuple[float | None, dict[str, Any]]] = {}
    t0 = time.perf_counter()
    if "maintenance" in args.apps:
        if not args.skip_distill:
            results |= run_maintenance_distill(args)
        if not args.skip_growth:
            results |= run_maintenance_growth(args)
    if "fraud" in args.apps and not args.skip_distill:
        run = run_fraud_mlp_distill if args.fraud_student == "mlp" else run_fraud_distill
        results |= run(args)
    if "medical" in args.apps and args.medical_scoring_only:
        results |= run_medical_scoring_speed(args)
    elif "medical" in args.apps and not args.skip_distill:
        results |= run_medical_distill(args)
    cmd = "python -m bench.scale_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    for key, (value, details) in results.items():
        details = {**details, "command": cmd, "tiny": args.tiny}
        if args.no_record:
            print(f"{key} = {value if value is None else f'{value:.4g}'}", flush=True)
        else:
            entry = record_result("scale", key, value, details)
            if args.mlflow and "_student_retention" in key:
                from bench.scale_mlflow import log_entry

                print(f"{key}: MLflow run {log_entry(key, entry)}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s on {machine()}", flush=True)
    print(json.dumps({k: v for k, (v, _) in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
