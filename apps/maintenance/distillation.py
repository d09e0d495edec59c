"""Distil a (registered) maintenance teacher into the student described by a config.

Same protocol as :func:`apps.maintenance.training.fit` (windows from ``train`` units,
Lightning validates on ``policy`` units, the alarm policy is chosen on ``policy`` units only,
metrics from :func:`apps.maintenance.training.evaluate_prepared`), with one difference: the
student reads windows normalised by the *teacher's* stored statistics, so both models see
the same input tensors (the teacher's predictions would be meaningless on differently
scaled inputs). The student's predictor stores those statistics too.

The teacher's output is ``[RUL / cap, alarm logit]``; the soft target is per column: MSE on
the RUL column and the tempered two-class KL on the alarm logit
(``DistillConfig.column_kinds = ["regression", "binary"]``, set when the caller leaves
``column_kinds`` empty), summed with the task loss's own column weights
(``column_weights = [1, alarm_loss_weight]`` of the student, set when left empty): the
teacher term then asks the shared layers for the same RUL / alarm balance as the labels do.
A plain mean over the two columns weighed the alarm 5x (fd001: 10x) more than the task loss
does, pulling a small student's capacity from RUL towards the alarm.

The teacher may be a seed ensemble (``ensemble_size > 1``, the shipped FD001/FD003 recipes).
Its target is the ensemble's own prediction, ``[mean RUL / cap, logit of the mean alarm
probability]`` (:func:`ensemble_targets`), computed once per window before training and served
as core's stored soft labels (``DistillConfig.soft_label_key``): exact, because the windows are
fixed and nothing random acts on the teacher's inputs, and the frozen members never run inside
the distillation module, so they cannot reach the student's state or checkpoints. An
ensemble's active parameters (``core.distill.count_active_params``) are the sum over its
members, which all run on every window.

Teacher-labelled mixup windows (``MaintenanceConfig.distill_mixup``, off by default): the
student also trains on windows that no engine produced, each ``lam * a + (1 - lam) * b`` of two
training windows with the same padding (:func:`mixup_windows`), with a NaN RUL, so only the
teacher term reads them (the task loss skips them). "Function matching" (Beyer et al., CVPR
2022): the student learns the teacher's function between the training windows too, not only
at the labels, which a student from scratch cannot see. Only training windows are mixed;
validation, policy and test units never are.

No MLflow here (the benchmark machine has none): ``run`` only supplies a Lightning logger.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from apps.maintenance.config import MaintenanceConfig
from apps.maintenance.data import PreparedData, prepare_data
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.metrics import trajectory_frame
from apps.maintenance.model import RULModel
from apps.maintenance.predictor import MaintenancePredictor, feature_names
from apps.maintenance.training import (
    BestValidationRMSE,
    batch_loader,
    build_model,
    choose_policy,
    evaluate_prepared,
    fingerprint,
    input_example,
    pretrain_if_configured,
    smoothed_rul,
    split_windows,
    time_unit_of,
)
from apps.maintenance.windows import WindowSet
from core.distill import DistillConfig, SoftLabelDataset, count_active_params, distill_fit
from core.engine import seed_everything
from core.spec import TrainResult

COLUMN_KINDS = ["regression", "binary"]  # RUL / cap, alarm logit


def default_distill_config(
    cfg: DistillConfig | dict | None = None, alarm_loss_weight: float | None = None
) -> DistillConfig:
    """``cfg`` with the maintenance head's per-column kinds filled in when left empty, and,
    given the student's ``alarm_loss_weight``, its task-loss column weights
    ``[1, alarm_loss_weight]`` when ``column_weights`` is left empty (explicit weights, e.g.
    ``[0.5, 0.5]`` for the plain mean, are kept)."""
    d = cfg if isinstance(cfg, DistillConfig) else DistillConfig.from_dict(dict(cfg or {}))
    if not d.column_kinds:
        d = dataclasses.replace(d, column_kinds=list(COLUMN_KINDS))
    if not d.column_weights and alarm_loss_weight is not None:
        if len(d.column_kinds) != len(COLUMN_KINDS):
            raise MaintenanceDataError(
                f"column_kinds {d.column_kinds} do not match the RUL head's columns"
                f" {COLUMN_KINDS}: give column_weights explicitly"
            )
        d = dataclasses.replace(d, column_weights=[1.0, float(alarm_loss_weight)])
    return d


def _check_teacher(teacher: MaintenancePredictor, cfg: MaintenanceConfig) -> None:
    if not isinstance(teacher, MaintenancePredictor):
        raise MaintenanceDataError(
            f"the teacher must be a MaintenancePredictor, got {type(teacher).__name__}"
        )
    h = teacher.model.hparams
    for name, want in (("window", cfg.window), ("patch_len", cfg.patch_len)):
        if int(h[name]) != int(want):
            raise MaintenanceDataError(
                f"teacher {name}={h[name]} but the student config has {name}={want}:"
                " teacher and student must read the same windows"
            )
    if float(h["rul_cap"]) != float(cfg.rul_cap):
        raise MaintenanceDataError(
            f"teacher rul_cap={h['rul_cap']} but the student config has rul_cap={cfg.rul_cap}:"
            " the RUL column would be on different scales"
        )


def is_ensemble(model: Any) -> bool:
    """True for a :class:`apps.maintenance.model.RULEnsemble` (it holds ``members``)."""
    return hasattr(model, "members")


def ensemble_targets(ensemble: Any, windows: Any, batch_size: int = 2048) -> torch.Tensor:
    """``[N, 2]`` distillation targets of a frozen ensemble teacher for ``windows``, in the
    RUL model's output layout: column 0 = the ensemble's RUL / cap (the mean of the
    members' clamped RUL, what the ensemble predicts), column 1 = the logit of the mean of
    the members' alarm probabilities (so the tempered two-class KL targets the ensemble's
    alarm probability, not a mean of logits)."""
    rul, prob = ensemble.predict_windows(windows.x, windows.mask, batch_size)
    p = np.clip(prob, 1e-6, 1.0 - 1e-6)
    cols = np.stack([rul / float(ensemble.rul_cap), np.log(p) - np.log1p(-p)], axis=1)
    return torch.as_tensor(cols, dtype=torch.float32)


def with_soft_labels(loader: DataLoader, targets: torch.Tensor, key: str) -> DataLoader:
    """``loader`` (a :func:`apps.maintenance.training.batch_loader`: whole-batch indexing)
    with ``targets[i]`` served under ``key`` next to window ``i``; the same sampler, so the
    same batches in the same order."""
    ds = SoftLabelDataset(loader.dataset, targets, key)
    return DataLoader(ds, sampler=loader.sampler, batch_size=None)


def mixup_windows(w: WindowSet, n: int, seed: int) -> WindowSet:
    """``n`` windows ``lam * a + (1 - lam) * b``, ``lam ~ U(0, 1)``, each mixing a random
    training window ``a`` with a random window ``b`` of the same padding (windows early in a
    unit's life are left-padded; mixing two different paddings would give padded steps a
    value). RUL is NaN: no label exists for them, the teacher labels them. ``unit`` and
    ``time`` are ``a``'s. Deterministic in ``seed``."""
    if n < 0:
        raise MaintenanceDataError(f"mixup_windows: n={n}, expected >= 0")
    if n > 0 and len(w) < 2:
        raise MaintenanceDataError("mixup_windows: needs at least 2 training windows")
    rng = np.random.default_rng(seed)
    a_N = rng.integers(0, len(w), size=n)
    # a partner with the same padded-step count: group windows by it, pick within a's group
    pad_count = w.mask.sum(axis=1)
    order = np.argsort(pad_count, kind="stable")
    sorted_pad = pad_count[order]
    lo = np.searchsorted(sorted_pad, pad_count[a_N], side="left")
    hi = np.searchsorted(sorted_pad, pad_count[a_N], side="right")
    b_N = order[lo + (rng.random(n) * (hi - lo)).astype(np.int64)]
    lam_N = rng.random(n).astype(np.float32)[:, None, None]
    x = lam_N * w.x[a_N] + (1.0 - lam_N) * w.x[b_N]
    # padded steps keep the pad value (both windows hold it there)
    x = np.where(w.mask[a_N][:, :, None], w.x[a_N], x).astype(np.float32)
    return WindowSet(
        x=x,
        mask=w.mask[a_N].copy(),
        rul=np.full(n, np.nan, np.float32),
        unit=w.unit[a_N],
        time=w.time[a_N],
        feature_names=w.feature_names,
    )


def with_mixup(w: WindowSet, ratio: float, seed: int) -> WindowSet:
    """``w`` followed by ``round(ratio * len(w))`` :func:`mixup_windows` (``ratio`` 0: ``w``)."""
    n = int(round(ratio * len(w)))
    if n == 0:
        return w
    m = mixup_windows(w, n, seed)
    return WindowSet(
        x=np.concatenate([w.x, m.x]),
        mask=np.concatenate([w.mask, m.mask]),
        rul=np.concatenate([w.rul.astype(np.float32), m.rul]),
        unit=np.concatenate([w.unit, m.unit]),
        time=np.concatenate([w.time, m.time]),
        feature_names=w.feature_names,
    )


def build_student(cfg: MaintenanceConfig, n_channels: int) -> RULModel:
    """The student model of ``cfg`` (the same builder as ``training.fit``)."""
    return build_model(cfg, n_channels)


@dataclasses.dataclass
class DistillOutput:
    predictor: MaintenancePredictor
    data: PreparedData
    known_limits: list[str]
    student_active_params: int
    teacher_active_params: int
    distill_config: DistillConfig


def distill_fit_predictor(
    cfg: MaintenanceConfig,
    teacher: MaintenancePredictor,
    distill_cfg: DistillConfig | dict | None = None,
    logger: Any = False,
    data: PreparedData | None = None,
) -> DistillOutput:
    """Train the student of ``cfg`` against ``teacher``; choose its alarm policy on policy units."""
    _check_teacher(teacher, cfg)
    seed_everything(cfg.seed)
    data = data if data is not None else prepare_data(cfg)
    state = teacher.normalizer
    w_train = split_windows(state, data.train, cfg.window, stride=cfg.train_stride)
    w_val = split_windows(state, data.policy, cfg.window)
    n_channels = int(teacher.model.hparams["n_channels"])
    if w_train.x.shape[2] != n_channels:
        raise MaintenanceDataError(
            f"the teacher reads {n_channels} channels ({feature_names(state)}) but the"
            f" student's data gives {w_train.x.shape[2]}"
        )
    student = build_student(cfg, n_channels)
    dcfg = default_distill_config(distill_cfg, student.alarm_loss_weight)
    # the student config's own pretraining, as training.fit gives the same student from scratch
    pretrain_if_configured(student, cfg, w_train, cfg.seed)
    # teacher-labelled mixup windows join the training windows after pretraining, which stays
    # the scratch student's (equal budgets: same pretraining, same steps, same batch size)
    w_train = with_mixup(w_train, cfg.distill_mixup, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = getattr(cfg, "steps_per_epoch", None)
    train_dl = batch_loader(w_train, cfg.batch_size, True, steps, g)
    val_dl = batch_loader(w_val, max(cfg.batch_size, 2048), False)
    teacher_module = teacher.model
    if is_ensemble(teacher.model):  # stored targets: the members never enter the module
        frozen = teacher.model.eval().requires_grad_(False)
        key = dcfg.soft_label_key
        train_dl = with_soft_labels(train_dl, ensemble_targets(frozen, w_train), key)
        val_dl = with_soft_labels(val_dl, ensemble_targets(frozen, w_val), key)
        teacher_module = None
    # same recipe as training.fit: best-validation-RMSE epoch kept, optional early stopping
    best = BestValidationRMSE(getattr(cfg, "early_stopping_patience", None))
    student = distill_fit(
        student, teacher_module, train_dl, val_dl, cfg.trainer, dcfg, logger, [best]
    )
    if getattr(cfg, "restore_best", False) and best.state is not None:
        n = len("student.")
        student.load_state_dict({k[n:]: v for k, v in best.state.items() if k[:n] == "student."})
    tu = time_unit_of(data)
    rul_unit = tu if data.schema.time_kind == "timestamp" else "cycles"
    n_smooth = int(getattr(cfg, "rul_smoothing", 1))  # the teacher recipe's causal smoothing
    val_rul, _ = student.predict_windows(w_val.x, w_val.mask)
    val_rul = smoothed_rul(val_rul, w_val, n_smooth, student.rul_cap, rul_unit)
    policy, _, limits = choose_policy(trajectory_frame(w_val, val_rul), cfg, tu)
    predictor = MaintenancePredictor(
        student, state, data.schema, policy, time_unit=rul_unit, rul_smoothing=n_smooth
    )
    limits = [
        *limits,
        "distilled student: normalised with the teacher's training statistics",
        "windows count readings, not clock time: gaps in an asset's readings are not filled",
    ]
    return DistillOutput(
        predictor,
        data,
        limits,
        count_active_params(student),
        count_active_params(teacher.model),
        dcfg,
    )


def distill(
    cfg: MaintenanceConfig,
    teacher: MaintenancePredictor,
    run: Any = None,
    distill_cfg: DistillConfig | dict | None = None,
) -> TrainResult:
    """``AppSpec.distill``: distil, then evaluate like ``spec.train`` (same held-out splits)."""
    from core.tracking import lightning_logger

    logger = lightning_logger(run)
    out = distill_fit_predictor(cfg, teacher, distill_cfg, logger=logger)
    evaluation = evaluate_prepared(out.predictor, out.data, cfg)
    return TrainResult(
        predictor=out.predictor,
        evaluation=evaluation,
        input_example=input_example(out.data),
        data_fingerprint=fingerprint(out.data.train),
        extra={
            "known_limits": out.known_limits,
            "student_active_params": out.student_active_params,
            "teacher_active_params": out.teacher_active_params,
            "distill_config": out.distill_config.to_dict(),
        },
    )
