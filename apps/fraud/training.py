"""Train and evaluate the fraud model and its LightGBM baseline under one protocol.

One pass, shared by the app spec, the notebook estimator and the benchmark (which must
run without MLflow, so nothing here imports it):

1. load + validate the transactions (``readers``), split by time (``splits``): handbook
   train/valid/delay/test blocks or the ULB time-fraction split;
2. fit features on TRAINING rows, compute them once over the chronological frame;
3. train the backbone (legitimate training rows optionally sub-sampled; optionally one
   model with averaged weights, ``AveragedWeights``, and the best epoch by validation AP,
   ``KeepBestWeights``; with ``ensemble_size > 1`` several such members, each from its own
   seed, whose mean logit is the model, ``FraudEnsemble``), calibrate on the VALIDATION
   block, choose the alert threshold on the VALIDATION block;
4. fit LightGBM on the same features and split (early stopping on validation);
5. optionally (``refit_on_validation``) retrain both from scratch on training + validation
   rows for the epoch / tree count chosen in 3-4, keeping 3's calibration and threshold:
   on a time-ordered split the validation block is the data nearest the test block;
6. score the TEST block only now, with metrics of the official protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import lightning as L
import numpy as np
import polars as pl
from torch.utils.data import DataLoader

from apps.fraud.baseline import LightGBMBaseline, stack_features
from apps.fraud.calibration import apply_calibration, fit_calibration
from apps.fraud.config import FraudConfig
from apps.fraud.errors import FraudDataError
from apps.fraud.inputs import InputBuilder, ModelInputs, canonical_frame, history_feature_names
from apps.fraud.metrics import (
    average_precision_by_group,
    card_precision_at_k_daily,
    fraud_metrics,
)
from apps.fraud.model import (
    FraudEnsemble,
    FraudModel,
    average_precision_np,
    loader,
    predict_logits,
    resampled_loader,
)
from apps.fraud.predictor import FraudPredictor, raw_input_columns
from apps.fraud.readers import file_columns, load_transactions
from apps.fraud.schema import TS, FraudSchema, load_schema
from apps.fraud.splits import TimeSplit, time_fraction_split, train_delay_test_split
from apps.fraud.thresholds import threshold_for_alert_budget, threshold_for_cost
from core.callbacks import AveragedWeights
from core.engine import build_trainer, member_seed, seed_everything
from core.sharding import single_device_copy
from core.spec import EvalResult

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The chronological frame (restricted to what the protocol reads) and its split."""

    schema: FraudSchema
    frame: pl.DataFrame  # canonical, time-sorted, with _ts and the label
    raw: pl.DataFrame  # same rows, the raw input columns as read (for input examples)
    split: TimeSplit
    y: np.ndarray
    days: np.ndarray
    cards: np.ndarray | None
    fingerprint: str
    # the schema's never_use_columns, same rows (e.g. TX_FRAUD_SCENARIO): for per-kind
    # metrics only; the feature and model inputs are built from ``frame``, which lacks them
    analysis: pl.DataFrame | None = None


@dataclass
class FitOutput:
    predictor: FraudPredictor
    data: PreparedData
    inputs: ModelInputs
    evaluation: EvalResult
    baseline: LightGBMBaseline | None
    threshold_rows: np.ndarray  # rows the threshold and calibration were chosen on
    extra: dict[str, Any] = field(default_factory=dict)
    refit_rows: np.ndarray | None = None  # rows the refit backbone trained on (if refit)


def protocol_split(frame: pl.DataFrame, schema: FraudSchema, cfg: FraudConfig) -> TimeSplit:
    p = cfg.protocol
    if p.kind == "handbook":
        return train_delay_test_split(
            frame,
            schema,
            p.train_start,
            train_days=p.train_days,
            delay_days=p.delay_days,
            test_days=p.test_days,
            valid_days=p.valid_days,
        )
    return time_fraction_split(
        frame, train_frac=p.train_frac, valid_frac=p.valid_frac, test_end_frac=p.test_end_frac
    )


def _fingerprint(frame: pl.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([(c, str(t)) for c, t in frame.schema.items()]).encode())
    h.update(frame.hash_rows(seed=0).to_numpy().tobytes())
    return h.hexdigest()


def load_data(cfg: FraudConfig) -> PreparedData:
    """Read, validate and split; for the handbook protocol keep only the days the split
    and its features' history windows read (``FeatureConfig.history_days``)."""
    schema = load_schema(cfg.schema)
    path = schema.resolve_path(cfg.data_path)
    keep = [*raw_input_columns(schema), schema.label_column]
    in_file = set(file_columns(path))
    answer_keys = [c for c in schema.never_use_columns if c in in_file]
    full = load_transactions(path, schema, columns=[*keep, *answer_keys])
    if cfg.protocol.kind == "handbook":
        split0 = protocol_split(full, schema, cfg)
        start, end = split0.bounds["train"][0], split0.bounds["test"][1]
        lo = start - timedelta(days=math.ceil(cfg.features.history_days()))
        days = full.get_column(TS).dt.date()
        full = full.filter((days >= lo) & (days < end))
    raw = full.select([*[c for c in keep if c in full.columns], TS])
    frame = canonical_frame(raw.drop(schema.time_column), schema)
    split = protocol_split(frame, schema, cfg)
    y = frame.get_column(schema.label_column).to_numpy().astype(np.int64)
    days = frame.get_column(TS).dt.date().to_numpy()
    cards = frame.get_column(schema.card_column).to_numpy() if schema.card_column else None
    analysis = full.select(answer_keys) if answer_keys else None  # requested, so loaded
    fp = _fingerprint(frame)
    return PreparedData(schema, frame, raw, split, y, days, cards, fp, analysis)


def training_rows(
    data: PreparedData, cfg: FraudConfig, block: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """``(rows, pos_weight)`` of one training run: all training frauds plus a seeded share
    ``head.neg_sample_rate`` of legitimate training rows, and the positive-class weight of
    the loss on those rows (``head.pos_weight``; ``"sqrt"``: sqrt(negatives / positives)).
    Shared by :func:`fit` and the distillation student, so both see the same rows.
    ``block``: the candidate rows (default the training block; the refit passes training
    + validation: the draws of the training part are then the same as without refit)."""
    idx = data.split.train if block is None else block
    rate = cfg.head.neg_sample_rate
    if rate < 1:
        rng = np.random.default_rng(cfg.seed)
        idx = idx[(data.y[idx] == 1) | (rng.random(len(idx)) < rate)]
    n_pos = int(data.y[idx].sum())
    if n_pos == 0:
        raise FraudDataError(f"no fraud in the {len(idx)} training rows; cannot train")
    pw = cfg.head.pos_weight
    pos_weight = math.sqrt((len(idx) - n_pos) / n_pos) if pw == "sqrt" else float(pw or 1.0)
    return idx, pos_weight


def training_loader(
    data: PreparedData,
    cfg: FraudConfig,
    mi: ModelInputs,
    rows: np.ndarray,
    block: np.ndarray | None = None,
) -> DataLoader:
    """Shuffled training batches of ``rows`` (from :func:`training_rows` over ``block``,
    default the training block). With ``head.neg_resample`` the legitimate rows are drawn
    afresh from all of ``block``'s each epoch after the first (``model.ResampledBatchLoader``)."""
    bs = cfg.head.batch_size
    if not cfg.head.neg_resample:
        return loader({**mi.take(rows), "y": data.y[rows]}, bs, shuffle=True, seed=cfg.seed)
    pool_rows = data.split.train if block is None else block
    pool = {**mi.take(pool_rows), "y": data.y[pool_rows]}
    return resampled_loader(pool, draw_positions(pool_rows, rows), bs, seed=cfg.seed)


def draw_positions(block: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in ``block`` of ``rows``, a :func:`training_rows` draw of it (epoch 0's rows
    of ``model.ResampledBatchLoader``); raises if ``rows`` is not such a draw."""
    first = np.flatnonzero(np.isin(block, rows))
    if not np.array_equal(block[first], rows):
        raise ValueError("rows must be a draw of the block, in its order (training_rows)")
    return first


class _DataModule(L.LightningDataModule):
    def __init__(self, train: DataLoader, valid: dict, batch_size: int) -> None:
        super().__init__()
        self.train, self.valid, self.bs = train, valid, batch_size

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return loader(self.valid, max(self.bs, 1024), shuffle=False)


def choose_threshold(
    cfg: FraudConfig, scores: np.ndarray, y: np.ndarray, days: np.ndarray, amounts: np.ndarray
) -> tuple[float, str]:
    t = cfg.threshold
    if t.rule == "alert_budget":
        c = threshold_for_alert_budget(scores, days, t.alerts_per_day)
    else:
        c = threshold_for_cost(scores, y, amounts, t.alert_cost)
    return float(c.threshold), c.rule


def protocol_text(cfg: FraudConfig, data: PreparedData) -> str:
    k = cfg.protocol.card_precision_k
    cp = f"; Card Precision@{k} per day (handbook)" if data.cards is not None else ""
    return (
        f"fraud/{data.schema.name}: {data.split.protocol}. Features fitted on training rows "
        f"only; calibration ({cfg.head.calibration}) and the alert threshold "
        f"({cfg.threshold.rule}) chosen on the validation block only; metrics on the test "
        f"block: PR-AUC (average precision), ROC-AUC, recall at precision 0.9, recall at 1% "
        f"FPR{cp}, alerts per day at the validation threshold. LightGBM baseline on the same "
        "features and split (metrics prefixed baseline/)." + refit_text(cfg)
    )


def refit_text(cfg: FraudConfig) -> str:
    """The refit's part of the protocol string (empty when ``refit_on_validation`` is off)."""
    if not cfg.refit_on_validation:
        return ""
    return (
        " Refit on validation: after step 1 (train on the training block; backbone epoch "
        "count = best validation-AP epoch, or all epochs without best-epoch selection; "
        "LightGBM tree count by early stopping on validation AP; calibration and threshold "
        "on validation), both models are retrained from scratch (same seed and "
        "hyper-parameters, features still fitted on training rows) on training + validation "
        "rows for exactly the chosen epoch count (epochs over the larger block, not steps) / "
        "tree count, and the test block is scored with the refit models. Limitation: "
        "calibration and alert thresholds are step 1's, fitted on step 1's validation "
        "scores (the refit model has seen the validation rows), so threshold metrics of the "
        "refit models may drift; ranking metrics (PR-AUC, ROC-AUC, recall at precision, "
        "Card Precision@k) do not depend on them. No test row is used for training, "
        "selection, calibration or thresholds. Step 1's test metrics are reported with the "
        "prefix no_refit/."
    )


def score_metrics(
    cfg: FraudConfig, data: PreparedData, rows: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, float]:
    y = data.y[rows]
    cards = data.cards[rows] if data.cards is not None else None
    days = data.days[rows]
    m = fraud_metrics(
        y,
        scores,
        cards=cards,
        days=days,
        k=cfg.protocol.card_precision_k,
        threshold=threshold,
    )
    if "alerts_per_day" not in m:
        m["alerts_per_day"] = float(
            pl.DataFrame({"d": days, "a": scores >= threshold})
            .group_by("d")
            .agg(pl.col("a").sum())["a"]
            .mean()
        )
    m["recall_at_alert_budget"] = m["recall_at_threshold"]
    return m


def ranking_metrics(
    y: np.ndarray, logits: np.ndarray, calibration: dict[str, Any]
) -> dict[str, float]:
    """PR-AUC / ROC-AUC / recall@precision 0.9 from the LOGITS when the calibration is
    strictly monotone (``platt``, ``none``): the ranking is the same, but float64
    ``sigmoid`` rounds every logit above ~37 to exactly 1.0, which ties the most
    suspicious rows together and ruins the top of the precision-recall curve (a recall at
    precision 0.9 of 0.03 in the first ULB run). ``isotonic`` ties are genuine: keep them.
    """
    if calibration.get("method") == "isotonic":
        return {}
    m = fraud_metrics(y, np.asarray(logits, np.float64))
    keys = ("pr_auc", "roc_auc", "recall_at_precision_0.9", "recall_at_fpr_0.01")
    return {k: m[k] for k in keys}


def build_model(
    cfg: FraudConfig, ib: InputBuilder, pos_weight: float, train: Mapping[str, np.ndarray]
) -> FraudModel:
    """The fraud model of ``cfg`` over the inputs ``ib`` builds (also a distilled student's);
    ``train`` (its training rows' arrays: ``x_num``, ``y``) fits what the numeric encoding
    learns before training (``piecewise`` bin edges; ``tree`` edges read the labels)."""
    model = FraudModel(
        cfg.model,
        cfg.optim,
        n_numeric=len(ib.feature_columns.numeric),
        cat_cardinalities=ib.cat_cardinalities,
        n_hist_features=len(history_feature_names(ib.schema)) if ib.history_len else 0,
        history_len=ib.history_len,
        loss=cfg.head.loss,
        pos_weight=pos_weight,
        focal_gamma=cfg.head.focal_gamma,
        head_dropout=cfg.head.dropout,
        numeric_encoding=cfg.head.numeric_encoding,
        n_frequencies=cfg.head.n_frequencies,
        frequency_scale=cfg.head.frequency_scale,
        n_bins=cfg.head.n_bins,
        bin_steps=cfg.head.bin_steps,
        wide=cfg.head.wide,
        row_mlp=cfg.head.row_mlp or (),
    )
    return model.fit_numeric_encoding(train["x_num"], train.get("y"), cfg.head.bin_edges)


class KeepBestWeights(L.Callback):
    """Remember the weights of the epoch with the best ``monitor`` (higher is better) and
    load them back when training ends: best-epoch selection on the validation block
    without checkpoint files (the benchmark box may not have a writable checkpoint dir)."""

    def __init__(self, monitor: str = "val/ap") -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._state: dict[str, Any] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_validation_epoch_end: Lightning runs callbacks' epoch-end hooks BEFORE the
        # module's, where ``val/ap`` is computed; this one would see the previous epoch's.
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self._state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)


def averaged_weights(cfg: FraudConfig) -> AveragedWeights | None:
    """The ``head.weight_average`` callback of ``cfg`` (``None`` when off)."""
    h = cfg.head
    if h.weight_average is None:
        return None
    decay = h.ema_decay if h.weight_average == "ema" else None
    return AveragedWeights(decay, h.average_start_epoch)


def refit_block(split: TimeSplit) -> np.ndarray:
    """Training + validation rows, in time order: what the refit trains on (never delay or
    test rows; the two blocks are adjacent and precede the test block)."""
    return np.sort(np.concatenate([split.train, split.valid]))


@dataclass
class Refit:
    """The backbone retrained on training + validation rows (``refit_on_validation``)."""

    model: FraudModel
    rows: np.ndarray  # the rows it trained on (frauds + sampled legitimate rows)
    epochs: int  # epochs it ran (= the epochs step 1 chose)
    steps: int  # optimizer steps it took
    schedule_steps: int  # length of its warm-up + cosine schedule
    pos_weight: float


def refit_backbone(
    cfg: FraudConfig,
    data: PreparedData,
    ib: InputBuilder,
    mi: ModelInputs,
    epochs: int,
    device: str | None = None,
) -> Refit:
    """Retrain the backbone from scratch on training + validation rows for exactly
    ``epochs`` epochs (the count step 1 chose on validation): same seed, initial weights,
    hyper-parameters and negative sub-sampling rule. There is no validation block left, so
    no best-epoch selection: the weights (averaged ones if ``head.weight_average``) after
    the last epoch are the model. The warm-up + cosine schedule keeps step 1's horizon,
    ``trainer.max_epochs`` epochs of the refit rows (``optim.max_steps`` if set), so the
    learning rate at the end of the refit is the one step 1 had at its chosen epoch; the
    number of optimizer steps grows with the rows (epochs count, not steps)."""
    if epochs < 1:
        raise FraudDataError(f"refit needs >= 1 epoch, got {epochs}")
    block = refit_block(data.split)
    rows, pos_weight = training_rows(data, cfg, block)
    train = {**mi.take(rows), "y": data.y[rows]}
    bs = cfg.head.batch_size
    per_epoch = math.ceil(len(rows) / bs)
    horizon = cfg.optim.max_steps or (cfg.trainer.max_epochs or epochs) * per_epoch
    trainer_cfg = replace(
        cfg.trainer,
        max_epochs=epochs,
        max_steps=-1,
        seed=cfg.seed,
        enable_checkpointing=False,
        early_stopping_patience=None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    if device is not None:
        trainer_cfg = replace(trainer_cfg, accelerator=device)
    average = averaged_weights(cfg)
    trainer = build_trainer(trainer_cfg, [average] if average else [], logger=False)
    cfg_refit = replace(cfg, optim=replace(cfg.optim, max_steps=horizon))
    model = build_model(cfg_refit, ib, pos_weight, train)
    trainer.fit(model, train_dataloaders=training_loader(data, cfg, mi, rows, block))
    model = single_device_copy(model)  # a plain module again after fsdp2 (else itself)
    model = model.float().cpu() if device not in (None, "cpu") else model
    return Refit(model, rows, trainer.current_epoch, trainer.global_step, horizon, pos_weight)


def baseline_estimator(cfg: FraudConfig, n_estimators: int | None = None) -> LightGBMBaseline:
    """The LightGBM baseline of ``cfg`` (``n_estimators`` overrides the tree budget)."""
    b = cfg.baseline
    return LightGBMBaseline(
        n_estimators=n_estimators or b.n_estimators,
        learning_rate=b.learning_rate,
        num_leaves=b.num_leaves,
        early_stopping_rounds=b.early_stopping_rounds,
        imbalance=b.imbalance,
        subsample=b.subsample,
        colsample_bytree=b.colsample_bytree,
        n_jobs=b.n_jobs,
        random_state=cfg.seed,
    )


@dataclass
class Member:
    """One trained backbone of :func:`fit` (an ensemble member when ``ensemble_size > 1``)."""

    model: FraudModel
    seed: int
    pos_weight: float
    trainer: L.Trainer
    keep_best: KeepBestWeights | None
    average: AveragedWeights | None


def train_member(
    cfg: FraudConfig,
    data: PreparedData,
    ib: InputBuilder,
    mi: ModelInputs,
    valid: Mapping[str, np.ndarray],
    k: int = 0,
    logger: Any = False,
    device: str | None = None,
) -> Member:
    """Train backbone ``k`` of ``cfg`` on the training block (best epoch by validation AP
    on ``valid``, the validation block's arrays, when ``head.select_best``): seed
    ``member_seed(cfg.seed, k)`` sets its initial weights, batch order and draw of
    legitimate rows; member 0 is the single-model recipe."""
    seed = member_seed(cfg.seed, k)
    cfg_k = replace(cfg, seed=seed)
    rows, pos_weight = training_rows(data, cfg_k)
    train = {**mi.take(rows), "y": data.y[rows]}
    trainer_cfg = cfg.trainer
    if device is not None:
        trainer_cfg = replace(trainer_cfg, accelerator=device)
    trainer_cfg = replace(trainer_cfg, seed=seed)
    keep_best = KeepBestWeights(cfg.head.select_best) if cfg.head.select_best else None
    average = averaged_weights(cfg)
    callbacks: list[L.Callback] = [average] if average else []
    callbacks += [keep_best] if keep_best else []  # after the average: it keeps averaged weights
    if k > 0:  # member 0 keeps the single-model run's random stream, bit for bit
        seed_everything(seed)
    trainer = build_trainer(trainer_cfg, callbacks, logger=logger)
    model = build_model(cfg_k, ib, pos_weight, train)
    train_batches = training_loader(data, cfg_k, mi, rows)
    trainer.fit(model, datamodule=_DataModule(train_batches, valid, cfg.head.batch_size))
    model = single_device_copy(model)  # a plain module again after fsdp2 (else itself)
    model = model.float().cpu() if device not in (None, "cpu") else model
    return Member(model, seed, pos_weight, trainer, keep_best, average)


def fit(
    cfg: FraudConfig,
    data: PreparedData | None = None,
    logger: Any = False,
    device: str | None = None,
) -> FitOutput:
    """Train model + baseline on ``cfg`` (see the module docstring); test metrics inside."""
    data = data or load_data(cfg)
    split, schema = data.split, data.schema
    if len(split.valid) == 0:
        raise FraudDataError(
            "the protocol leaves no validation rows (protocol.valid_days / valid_frac); "
            "calibration and the threshold need them"
        )
    seed_everything(cfg.seed)
    ib = InputBuilder(schema, cfg.features, cfg.head.history_len)
    ib.fit(data.frame[split.train], context=data.frame, train_rows=split.train)
    mi = ib.fitted_inputs_

    valid = {**mi.take(split.valid), "y": data.y[split.valid]}
    members = [
        train_member(cfg, data, ib, mi, valid, k, logger if k == 0 else False, device)
        for k in range(cfg.ensemble_size)
    ]
    # member 0's trainer and callbacks: what the refit and the report read (the refit is
    # refused for ensembles by the config)
    first = members[0]
    keep_best, average, trainer = first.keep_best, first.average, first.trainer
    model = first.model if len(members) == 1 else FraudEnsemble([m.model for m in members])

    # Calibration and threshold: validation rows only.
    val_logits = predict_logits(model, mi.take(split.valid))
    calib = fit_calibration(val_logits, data.y[split.valid], cfg.head.calibration)
    val_scores = apply_calibration(val_logits, calib)
    amounts = data.frame.get_column(schema.amount_column).to_numpy()
    threshold, rule = choose_threshold(
        cfg, val_scores, data.y[split.valid], data.days[split.valid], amounts[split.valid]
    )
    options = {"n_reasons": cfg.head.n_reasons, "history_path": cfg.history_path, "rule": rule}
    predictor = FraudPredictor(model, ib, calib, {"alert": threshold}, options)

    baseline = None
    base_scores = None
    base_thr = None
    if cfg.baseline.enabled:
        x, cat = stack_features(mi.x_raw, mi.x_cat)
        baseline = baseline_estimator(cfg).fit(
            x[split.train],
            data.y[split.train],
            eval_set=(x[split.valid], data.y[split.valid]),
            categorical_feature=cat,
        )
        base_val = baseline.decision_function(x[split.valid])
        base_thr, _ = choose_threshold(
            cfg, base_val, data.y[split.valid], data.days[split.valid], amounts[split.valid]
        )
        base_scores = baseline.decision_function(x[split.test])

    extra: dict[str, Any] = {"pos_weight": first.pos_weight}
    no_refit: dict[str, float] = {}
    refit = None
    if cfg.refit_on_validation:
        # Step 1's model, baseline and figures, scored before the refit replaces them.
        before = evaluate_inputs(cfg, data, predictor, mi, base_scores, base_thr, figures=False)
        no_refit = {f"no_refit/{k}": v for k, v in before.metrics.items()}
        chosen = keep_best.best_epoch if keep_best is not None else None
        epochs = chosen + 1 if chosen is not None else trainer.current_epoch
        refit = refit_backbone(cfg, data, ib, mi, epochs, device)
        # Calibration and threshold stay step 1's (validation rows are training rows now).
        predictor = FraudPredictor(refit.model, ib, calib, {"alert": threshold}, options)
        extra.update(
            refit_epochs=refit.epochs,
            refit_steps=refit.steps,
            refit_schedule_steps=refit.schedule_steps,
            refit_rows=len(refit.rows),
            refit_pos_weight=refit.pos_weight,
            refit_rows_last_time=str(data.frame.get_column(TS)[int(refit.rows.max())]),
        )
        if baseline is not None:
            block = refit_block(split)
            n_trees = baseline.best_iteration_
            baseline = baseline_estimator(cfg, n_trees).fit(
                x[block], data.y[block], categorical_feature=cat
            )
            base_scores = baseline.decision_function(x[split.test])
            extra.update(lightgbm_refit_rows=len(block), lightgbm_refit_trees=n_trees)

    evaluation = evaluate_inputs(cfg, data, predictor, mi, base_scores, base_thr)
    evaluation.metrics.update(no_refit)
    if average is not None:
        extra["weight_average"] = (
            f"ema {average.decay}" if average.decay is not None else "uniform"
        ) + f" from epoch {average.start_epoch}"
    if keep_best is not None:
        extra.update(best_epoch=keep_best.best_epoch, best_val_ap=keep_best.best)
    if len(members) > 1:
        # per member what its validation block chose; best_val_ap becomes the ensemble's
        # validation AP (what one model's entry means: the kept model on validation)
        extra.update(
            ensemble_size=len(members),
            member_seeds=[m.seed for m in members],
            best_epoch=[m.keep_best.best_epoch if m.keep_best else None for m in members],
            member_best_val_ap=[m.keep_best.best if m.keep_best else None for m in members],
            best_val_ap=average_precision_np(data.y[split.valid], val_logits),
        )
    refit_rows = refit.rows if refit is not None else None
    return FitOutput(predictor, data, mi, evaluation, baseline, split.valid, extra, refit_rows)


MAX_ANSWER_KEY_GROUPS = 20


def metrics_by_answer_key(
    data: PreparedData, rows: np.ndarray, scores: np.ndarray
) -> dict[str, float]:
    """``pr_auc/<column>_<value>``: average precision of each kind of fraud on ``rows``
    (``metrics.average_precision_by_group``), for each of the schema's answer-key columns
    (``never_use_columns``) with at most ``MAX_ANSWER_KEY_GROUPS`` values among frauds."""
    out: dict[str, float] = {}
    if data.analysis is None:
        return out
    y = data.y[rows]
    for col in data.analysis.columns:
        groups = data.analysis.get_column(col).to_numpy()[rows]
        if y.sum() in (0, len(y)) or len(np.unique(groups[y == 1])) > MAX_ANSWER_KEY_GROUPS:
            continue  # AP needs both classes; a high-cardinality column is not a kind
        for g, ap in average_precision_by_group(y, scores, groups).items():
            out[f"pr_auc/{col}_{g}"] = ap
    return out


def evaluate_inputs(
    cfg: FraudConfig,
    data: PreparedData,
    predictor: FraudPredictor,
    mi: ModelInputs,
    base_scores: np.ndarray | None = None,
    base_threshold: float | None = None,
    figures: bool = True,
) -> EvalResult:
    """Test-block metrics of ``predictor`` (and of the baseline's test scores if given)."""
    test = data.split.test
    logits, scores = predictor.score_inputs(mi.take(test))
    metrics = score_metrics(cfg, data, test, scores, predictor.threshold)
    ranking = ranking_metrics(data.y[test], logits, predictor.calibration)
    metrics.update(ranking)
    metrics.update(metrics_by_answer_key(data, test, logits if ranking else scores))
    tables: dict[str, Any] = {}
    if data.cards is not None:
        daily = card_precision_at_k_daily(
            scores, data.y[test], data.cards[test], data.days[test], cfg.protocol.card_precision_k
        )
        tables["card_precision_daily"] = daily.to_pandas()
    curves = {"backbone": scores}
    thr = {"backbone": predictor.threshold}
    if base_scores is not None:
        bm = score_metrics(cfg, data, test, base_scores, base_threshold)
        metrics.update({f"baseline/{k}": v for k, v in bm.items() if k not in ("n", "fraud_rate")})
        by_kind = metrics_by_answer_key(data, test, base_scores)
        metrics.update({f"baseline/{k}": v for k, v in by_kind.items()})
        curves["lightgbm"] = base_scores
        thr["lightgbm"] = base_threshold
    figs = {}
    if figures:
        from apps.fraud.plots import pr_curves_figure

        figs["pr_curve"] = pr_curves_figure(
            data.y[test], curves, title=f"Precision-recall, {data.schema.name} test", thresholds=thr
        )
    return EvalResult(
        metrics=metrics, protocol=protocol_text(cfg, data), figures=figs, tables=tables
    )


def evaluate_predictor(
    predictor: FraudPredictor, cfg: FraudConfig, data: PreparedData | None = None
) -> EvalResult:
    """Re-evaluate a (possibly older) predictor on ``cfg``'s test block, features computed
    with the predictor's own fitted state over the same chronological frame."""
    data = data or load_data(cfg)
    mi = predictor.inputs.transform(data.frame)
    return evaluate_inputs(cfg, data, predictor, mi)
