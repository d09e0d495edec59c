"""Distil a (registered) fraud teacher into the student described by a config.

Same protocol as :func:`apps.fraud.training.fit` (time split of the config, legitimate
training rows sub-sampled, calibration and alert threshold on the VALIDATION block only,
metrics on the TEST block by :func:`apps.fraud.training.evaluate_inputs`), with one
difference: the student reads the features of the *teacher's* fitted ``InputBuilder`` (as
:func:`apps.fraud.training.evaluate_predictor` does), so teacher and student see identical
inputs. That builder was fitted on the teacher's training rows: distil with a config
whose protocol matches the teacher's, or the teacher's feature statistics may have seen
rows that are validation or test rows here (the protocol text says which teacher was used).

The teacher's output is one fraud logit per transaction; the soft target is the tempered
two-class KL (``DistillConfig.kind = "binary"`` when left ``auto``). No LightGBM baseline
is fitted (the student competes with its teacher, not with the baseline). No MLflow here.

Like :func:`apps.fraud.training.fit`, the student's best epoch is chosen by validation AP
(``head.select_best``, with ``head.weight_average`` when set), so a distilled and a
scratch student differ only in their loss. The teacher's logits are computed once for the
training and validation rows and served as stored soft labels (the teacher is in eval
mode, so this is the same target as running it in every step, at a fraction of the cost).
``class_weighted=True`` weights each row's teacher term like the task loss weights its
classes (frauds ``pos_weight``, legitimate rows 1; ``DistillConfig.sample_weight_key``).

``transfer_rows`` adds a transfer set: rows whose labels are not known at training time
(the handbook protocol's delay block, whose labels arrive after the cut-off) join the
student's training batches with the teacher's logits as their only target. Their labels are
never read: they carry a placeholder label, are marked unlabelled
(``DistillConfig.label_mask_key``), so the task loss skips them, and get the legitimate
class's weight 1 in a class-weighted teacher term (their class is unknown). Validation and
test rows are refused, so nothing evaluated is ever fitted, not even to the teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score

from apps.fraud.calibration import apply_calibration, fit_calibration
from apps.fraud.config import FraudConfig
from apps.fraud.errors import FraudConfigError, FraudDataError
from apps.fraud.inputs import ModelInputs
from apps.fraud.model import FraudEnsemble, FraudModel, loader, predict_logits, resampled_loader
from apps.fraud.predictor import FraudPredictor
from apps.fraud.training import (
    KeepBestWeights,
    PreparedData,
    averaged_weights,
    build_model,
    choose_threshold,
    draw_positions,
    evaluate_inputs,
    load_data,
    training_rows,
)
from core.distill import DistillConfig, count_active_params, distill_fit
from core.engine import seed_everything
from core.spec import EvalResult, TrainResult


def default_distill_config(cfg: DistillConfig | dict | None = None) -> DistillConfig:
    """``cfg`` with ``kind="binary"`` when left ``auto`` (one logit per row)."""
    d = cfg if isinstance(cfg, DistillConfig) else DistillConfig.from_dict(dict(cfg or {}))
    return dataclasses.replace(d, kind="binary") if d.kind == "auto" else d


def build_student(
    cfg: FraudConfig, teacher: FraudPredictor, pos_weight: float, train: dict[str, np.ndarray]
) -> FraudModel:
    """The student of ``cfg`` over the teacher's inputs (same tokens, own backbone size);
    ``train``: the student's training rows' arrays (``x_num``, ``y``)."""
    return build_model(cfg, teacher.inputs, pos_weight, train)


def teacher_and_data(
    cfg: FraudConfig, teacher: FraudPredictor, data: PreparedData | None
) -> PreparedData:
    """``cfg``'s data (loaded when ``data`` is None), checked against the teacher: the same
    schema, and a validation block to calibrate and threshold the student on."""
    if not isinstance(teacher, FraudPredictor):
        raise FraudDataError(f"the teacher must be a FraudPredictor, got {type(teacher).__name__}")
    data = data or load_data(cfg)
    if data.schema.name != teacher.schema.name:
        raise FraudDataError(
            f"teacher schema {teacher.schema.name!r} but the student config reads"
            f" {data.schema.name!r}: teacher and student must score the same columns"
        )
    if len(data.split.valid) == 0:
        raise FraudDataError("the protocol leaves no validation rows for calibration/threshold")
    return data


def validation_calibration(
    cfg: FraudConfig, data: PreparedData, val_logits: np.ndarray
) -> tuple[dict[str, Any], float, str]:
    """``(calibration, alert threshold, rule)`` of a student from its logits on the
    validation block, as :func:`apps.fraud.training.fit` chooses them for any model."""
    valid = data.split.valid
    calib = fit_calibration(val_logits, data.y[valid], cfg.head.calibration)
    val_scores = apply_calibration(val_logits, calib)
    amounts = data.frame.get_column(data.schema.amount_column).to_numpy()
    threshold, rule = choose_threshold(
        cfg, val_scores, data.y[valid], data.days[valid], amounts[valid]
    )
    return calib, threshold, rule


@dataclasses.dataclass
class DistillOutput:
    predictor: FraudPredictor
    data: PreparedData
    evaluation: EvalResult
    student_active_params: int
    teacher_active_params: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def distill_fit_predictor(
    cfg: FraudConfig,
    teacher: FraudPredictor,
    distill_cfg: DistillConfig | dict | None = None,
    logger: Any = False,
    data: PreparedData | None = None,
    device: str | None = None,
    class_weighted: bool = False,
    transfer_rows: np.ndarray | None = None,
) -> DistillOutput:
    """Train the student of ``cfg`` against ``teacher``; calibrate + threshold on validation.

    ``class_weighted``: weight the teacher term per row like the task loss (frauds by the
    training rows' ``pos_weight``, legitimate rows by 1). ``transfer_rows``: row indices of
    ``data`` the student also trains on, against the teacher's logits only (module doc)."""
    if cfg.head.neg_resample and transfer_rows is not None:
        raise FraudConfigError(
            "head.neg_resample and transfer_rows together are not supported: the transfer "
            "rows join one fixed draw of training rows; set head.neg_resample to false"
        )
    dcfg = default_distill_config(distill_cfg)
    data = teacher_and_data(cfg, teacher, data)
    if dcfg.hidden_weight > 0 and isinstance(teacher.model, FraudEnsemble):
        raise FraudConfigError(
            f"hidden_weight={dcfg.hidden_weight} with a {len(teacher.model.members)}-member"
            " ensemble teacher: hidden-state matching reads one backbone's hidden states;"
            " distil an ensemble through its logits (hidden_weight 0)"
        )
    split = data.split
    seed_everything(cfg.seed)
    mi = teacher.inputs.transform(data.frame)
    rows, pos_weight = training_rows(data, cfg)
    train = {**mi.take(rows), "y": data.y[rows]}
    valid = {**mi.take(split.valid), "y": data.y[split.valid]}
    # built before any transfer row joins: numeric bins are cut on the training labels
    student = build_student(cfg, teacher, pos_weight, train)
    n_labelled = len(rows)
    first = None  # with head.neg_resample: epoch 0's rows within the whole training block
    if cfg.head.neg_resample:  # soft labels for every row of the block, drawn afresh per epoch
        first = draw_positions(split.train, rows)
        train = {**mi.take(split.train), "y": data.y[split.train]}
    if transfer_rows is not None:
        transfer = checked_transfer_rows(data, rows, transfer_rows)
        train = with_transfer_rows(train, mi.take(transfer), dcfg.label_mask_key)
    if dcfg.hidden_weight == 0:  # the teacher is needed in every step only for hidden states
        for arrays in (train, valid):
            t_logits = predict_logits(teacher.model, {k: v for k, v in arrays.items() if k != "y"})
            arrays[dcfg.soft_label_key] = t_logits.astype(np.float32)
    if class_weighted:
        for arrays in (train, valid):
            weight = np.where(arrays["y"] == 1, pos_weight, 1.0).astype(np.float32)
            arrays[dcfg.sample_weight_key] = weight
    trainer_cfg = dataclasses.replace(cfg.trainer, seed=cfg.seed)
    if device is not None:
        trainer_cfg = dataclasses.replace(trainer_cfg, accelerator=device)
    average = averaged_weights(cfg)
    callbacks: list[Any] = [average] if average else []
    keep_best = KeepBestWeights(cfg.head.select_best) if cfg.head.select_best else None
    callbacks += [keep_best] if keep_best else []  # after the average, as in training.fit
    student = distill_fit(
        student,
        teacher.model,
        loader(train, cfg.head.batch_size, shuffle=True, seed=cfg.seed)
        if first is None
        else resampled_loader(train, first, cfg.head.batch_size, seed=cfg.seed),
        loader(valid, max(cfg.head.batch_size, 1024), shuffle=False),
        trainer_cfg,
        dcfg,
        logger,
        extra_callbacks=callbacks,
    )
    val_logits = predict_logits(student, mi.take(split.valid))
    calib, threshold, rule = validation_calibration(cfg, data, val_logits)
    predictor = FraudPredictor(
        student,
        teacher.inputs,
        calib,
        {"alert": threshold},
        {"n_reasons": cfg.head.n_reasons, "history_path": cfg.history_path, "rule": rule},
    )
    ev = evaluate_inputs(cfg, data, predictor, mi)
    ev.protocol += (
        " Distilled student: features from the teacher's fitted input builder;"
        f" distillation {dcfg.to_dict()}, class-weighted teacher term {class_weighted}"
        + (f"; best epoch {keep_best.best_epoch} by {keep_best.monitor}." if keep_best else ".")
    )
    extra = {
        "pos_weight": pos_weight,
        "class_weighted": class_weighted,
        "labelled_rows": n_labelled,
        "transfer_rows": len(train["y"]) - n_labelled,
    }
    if keep_best is not None:
        extra.update(best_epoch=keep_best.best_epoch, best_val_ap=keep_best.best)
    return DistillOutput(
        predictor,
        data,
        ev,
        count_active_params(student),
        count_active_params(teacher.model),
        extra,
    )


def checked_transfer_rows(
    data: PreparedData, labelled_rows: np.ndarray, transfer_rows: np.ndarray
) -> np.ndarray:
    """``transfer_rows`` as sorted unique row indices, after refusing any that would put an
    evaluated row or a labelled training row a second time into the student's batches."""
    rows = np.unique(np.asarray(transfer_rows, dtype=np.int64))
    n = len(data.y)
    if len(rows) == 0:
        raise FraudDataError("transfer_rows is empty: pass None for no transfer set")
    if rows[0] < 0 or rows[-1] >= n:
        raise FraudDataError(
            f"transfer_rows must index the {n} loaded rows, got {rows[0]}..{rows[-1]}"
        )
    for name, block in (
        ("validation", data.split.valid),
        ("test", data.split.test),
        ("labelled training", labelled_rows),
    ):
        clash = np.intersect1d(rows, block)
        if len(clash):
            raise FraudDataError(
                f"transfer_rows holds {len(clash)} {name} rows (first: {clash[:5].tolist()}):"
                " a transfer set may only hold rows the student is not trained or judged on"
                " otherwise (the handbook protocol's delay block)"
            )
    return rows


def with_transfer_rows(
    train: dict[str, np.ndarray], transfer: dict[str, np.ndarray], mask_key: str
) -> dict[str, np.ndarray]:
    """The labelled training arrays followed by the transfer rows' inputs, with ``mask_key``
    1 on labelled rows and 0 on transfer rows, whose ``y`` is a placeholder 0 that the
    masked task loss never reads."""
    n_t = len(next(iter(transfer.values())))
    placeholder = {"y": np.zeros(n_t, dtype=train["y"].dtype)}
    out = {k: np.concatenate([train[k], {**transfer, **placeholder}[k]]) for k in train}
    out[mask_key] = np.concatenate([np.ones(len(train["y"])), np.zeros(n_t)]).astype(np.float32)
    return out


def ensemble_logits(
    teachers: Sequence[FraudPredictor],
    data: PreparedData,
    rows: np.ndarray,
    first_inputs: ModelInputs | None = None,
) -> np.ndarray:
    """Mean logit of ``teachers`` on ``data``'s ``rows``, each teacher reading the frame
    through its own fitted input builder (their feature statistics may differ).
    ``first_inputs``: the first teacher's transform of ``data.frame`` when the caller holds
    it (a transform of the whole frame is the expensive part)."""
    total = np.zeros(len(rows), dtype=np.float64)
    for i, t in enumerate(teachers):
        mi = first_inputs if i == 0 and first_inputs is not None else t.inputs.transform(data.frame)
        total += t.score_inputs(mi.take(rows))[0]
    return total / len(teachers)


def distill_mlp_predictor(
    cfg: FraudConfig,
    teacher: FraudPredictor,
    distill_cfg: DistillConfig | dict | None = None,
    data: PreparedData | None = None,
    more_teachers: Sequence[FraudPredictor] = (),
) -> DistillOutput:
    """The CPU scorer (``cfg.student.kind == "mlp"``): a :class:`StudentMLP` fitted to the
    teacher's logits on every row of the training block (the teacher's soft label is known
    for each, so the legitimate rows are not sub-sampled; no test row, and no validation row
    either, since the validation block then calibrates the student and chooses its alert
    threshold, as for any model here). ``distill_cfg``: the teacher term
    (:func:`apps.fraud.fastscore.student_distill_config`; default MSE on the logit,
    alpha 1). The predictor holds the student and no backbone.

    ``more_teachers``: an ensemble teacher (Hinton et al.'s distillation of an ensemble
    into one model): the soft label is the mean of every teacher's logit, each teacher
    reading the frame through its own fitted input builder; the student reads ``teacher``'s
    features. Scoring costs the student alone, however many teachers taught it."""
    from apps.fraud.fastscore import distill_student, student_distill_config

    dcfg = student_distill_config(distill_cfg)
    data = teacher_and_data(cfg, teacher, data)
    split = data.split
    for other in more_teachers:
        teacher_and_data(cfg, other, data)  # same schema as the data
    mi = teacher.inputs.transform(data.frame)
    t_logits = ensemble_logits([teacher, *more_teachers], data, split.train, first_inputs=mi)
    sc = cfg.student
    y_train = data.y[split.train] if dcfg.alpha < 1.0 else None
    student = distill_student(
        mi.x_num[split.train],
        t_logits,
        hidden=sc.hidden,
        epochs=sc.epochs,
        batch_size=sc.batch_size,
        lr=sc.lr,
        seed=cfg.seed,
        cfg=dcfg,
        y_N=y_train,
    )
    options = {**teacher.options, "n_reasons": cfg.head.n_reasons, "history_path": cfg.history_path}
    # calibration and threshold are chosen below on the validation block; placeholders here
    predictor = FraudPredictor(
        None, teacher.inputs, {"method": "none"}, {"alert": 0.5}, options, student=student
    )
    val_logits, _ = predictor.score_inputs(mi.take(split.valid))
    predictor.calibration, threshold, rule = validation_calibration(cfg, data, val_logits)
    predictor.thresholds = {"alert": threshold}
    predictor.options["rule"] = rule
    ev = evaluate_inputs(cfg, data, predictor, mi)
    ev.protocol += (
        f" MLP student {list(sc.hidden)} on the teacher's scaled numeric features, fitted to"
        f" its logits on the {len(split.train)} training-block rows ({sc.epochs} epochs;"
        f" teacher term {dcfg.to_dict()}); calibration and threshold on the validation block."
    )
    if more_teachers:
        ev.protocol += f" Ensemble teacher: mean logit of {1 + len(more_teachers)} teachers."
    y_valid = data.y[split.valid]
    extra = {
        "student_kind": "mlp",
        "student_fit_steps": student.fit_steps,
        "n_teachers": 1 + len(more_teachers),
        # threshold-free, so comparable across students although the block calibrated them
        "validation_ap": (
            float(average_precision_score(y_valid, val_logits)) if y_valid.any() else None
        ),
    }
    teacher_params = sum(
        count_active_params(t.model if t.model is not None else t.student)
        for t in (teacher, *more_teachers)
    )
    return DistillOutput(predictor, data, ev, count_active_params(student), teacher_params, extra)


def distill(
    cfg: FraudConfig,
    teacher: FraudPredictor,
    run: Any = None,
    distill_cfg: DistillConfig | dict | None = None,
) -> TrainResult:
    """``AppSpec.distill``: distil, then the same test-block evaluation as ``spec.train``.
    ``cfg.student.kind``: ``backbone`` (the config's backbone) or ``mlp`` (the CPU
    scorer, :func:`distill_mlp_predictor`)."""
    from apps.fraud.spec import KNOWN_LIMITS, id_columns_as_float
    from core.tracking import lightning_logger

    if cfg.student.kind == "mlp":
        out = distill_mlp_predictor(cfg, teacher, distill_cfg)
    else:
        out = distill_fit_predictor(cfg, teacher, distill_cfg, logger=lightning_logger(run))
    test = out.data.split.test
    example = id_columns_as_float(
        out.data.raw[test[:5]].select(out.predictor.input_columns).to_pandas(), out.data.schema
    )
    return TrainResult(
        predictor=out.predictor,
        evaluation=out.evaluation,
        input_example=example,
        data_fingerprint=out.data.fingerprint,
        extra={
            "known_limits": [*KNOWN_LIMITS, "distilled student: the teacher's input builder"],
            "student_active_params": out.student_active_params,
            "teacher_active_params": out.teacher_active_params,
            "student_kind": cfg.student.kind,
            "distill_config": distill_record(cfg, distill_cfg),
        },
    )


def distill_record(cfg: FraudConfig, distill_cfg: DistillConfig | dict | None) -> dict[str, Any]:
    """The teacher-term settings the student of ``cfg`` was trained with."""
    if cfg.student.kind == "mlp":
        from apps.fraud.fastscore import student_distill_config

        return student_distill_config(distill_cfg).to_dict()
    return default_distill_config(distill_cfg).to_dict()
