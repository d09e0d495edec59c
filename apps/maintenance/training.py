"""Training and evaluation shared by the spec, the notebook estimator and the benchmark.

No MLflow here (the GPU benchmark machine has none): tracking is the caller's business.

Protocol in one place (every reported number names it in ``EvalResult.protocol``):

* the normaliser and the model see only ``train`` units; Lightning validates on ``policy``
  units;
* the alarm policy (threshold on predicted RUL, k consecutive steps) is chosen on ``policy``
  units only, under the false-alarm budget (:class:`AlarmPolicySelector`);
* lead time, false alarms and Saxena's prognostic metrics are measured on ``lead`` units,
  full run-to-failure units used for nothing else;
* RMSE / PHM08: one prediction per ``test`` unit at its last observed reading, truth capped
  at ``rul_cap`` and uncapped; alarm precision/recall on the same truncated units.

The model is always read through the predictor's causal RUL smoothing (``rul_smoothing``:
the mean of the last few window estimates, each minus the time since; 1 = off), for the
policy choice, lead time and the test protocol alike; its length is chosen with
:func:`validation_rmse_by_smoothing` on the validation units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import lightning
import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from apps.maintenance.alarms import AlarmPolicy, AlarmPolicySelector
from apps.maintenance.config import MaintenanceConfig
from apps.maintenance.data import PreparedData, prepare_data
from apps.maintenance.errors import AlarmBudgetError
from apps.maintenance.metrics import (
    cmapss_test_metrics,
    lead_time_metrics,
    prognostic_metrics,
    trajectory_frame,
    truncated_alarm_metrics,
)
from apps.maintenance.model import RULEnsemble, RULModel, pretrain_masked
from apps.maintenance.predictor import (
    MaintenancePredictor,
    apply_normalizer,
    causal_smooth_rul,
    elapsed_in,
    feature_names,
    normalizer_state,
)
from apps.maintenance.windows import WindowSet, build_windows
from core.engine import build_trainer, member_seed, seed_everything
from core.sharding import full_state_dict, single_device_copy
from core.spec import EvalResult

log = logging.getLogger(__name__)


class _WindowDataset(Dataset):
    """Windows as three tensors; indexed with a *list* of indices it returns a whole batch, so
    a ``BatchSampler`` with ``batch_size=None`` costs one gather per batch instead of one
    Python call and a collate per window (the small models here are input-bound otherwise)."""

    def __init__(self, w: WindowSet) -> None:
        self.x, self.mask = torch.as_tensor(w.x), torch.as_tensor(w.mask)
        self.rul = torch.as_tensor(w.rul, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int | list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(i) if isinstance(i, list) else i
        return {"x": self.x[idx], "mask": self.mask[idx], "rul": self.rul[idx]}


def batch_loader(
    w: WindowSet,
    batch_size: int,
    shuffle: bool,
    n_batches: int | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Batches of windows, no worker processes. ``shuffle``: random order (with ``n_batches``,
    exactly that many batches, drawn from successive random permutations of all windows)."""
    ds = _WindowDataset(w)
    if shuffle:
        n = n_batches * batch_size if n_batches is not None else None
        sampler: Any = RandomSampler(ds, num_samples=n, generator=generator)
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(
        ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None
    )


class BestValidationRMSE(lightning.Callback):
    """Tracks the validation RMSE against the capped truth, keeps the best epoch's weights in
    memory (``restore`` puts them back after training) and stops training after ``patience``
    epochs without improvement (None: never).

    The RMSE is over every reading of the policy-validation units (``val/mse_capped``: every
    possible truncation of them, uniformly), or, when the model has ``val_max_rul``, over the
    readings whose true RUL is at most that (``val/se_near`` / ``val/frac_near``): the test
    protocol scores each test unit once, at a cut "some time before failure", so the long
    healthy stretch early in a run, which dominates the every-reading average, says little
    about it."""

    def __init__(self, patience: int | None = None) -> None:
        self.patience = patience
        self.best = math.inf
        self.best_epoch = -1
        self.history: list[float] = []
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        m = trainer.callback_metrics
        if trainer.sanity_checking or "val/mse_capped" not in m:
            return
        if "val/se_near" in m and float(m["val/frac_near"]) > 0:
            rmse_val = (float(m["val/se_near"]) / float(m["val/frac_near"])) ** 0.5
        else:
            rmse_val = float(m["val/mse_capped"]) ** 0.5
        self.history.append(rmse_val)
        epoch = trainer.current_epoch
        log.info("epoch %d: validation RMSE (capped truth) %.3f", epoch, rmse_val)
        if rmse_val < self.best:
            self.best, self.best_epoch = rmse_val, epoch
            # full CPU tensors: under fsdp2 the live weights are this rank's shards
            self.state = full_state_dict(pl_module)
        elif self.patience is not None and epoch - self.best_epoch >= self.patience:
            trainer.should_stop = True

    def restore(self, module: torch.nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


@dataclass
class FitOutput:
    predictor: MaintenancePredictor
    data: PreparedData
    selector: AlarmPolicySelector | None
    pretrain_losses: list[float] = field(default_factory=list)
    known_limits: list[str] = field(default_factory=list)
    val_rmse_history: list[float] = field(default_factory=list)
    best_epoch: int = -1
    val_rmse_by_smoothing: dict[int, float] = field(default_factory=dict)


SMOOTHING_CANDIDATES = (1, 3, 5, 8, 10, 15, 20)


def smoothed_rul(
    rul: np.ndarray, w: WindowSet, n_last: int, cap: float, time_unit: str
) -> np.ndarray:
    """:func:`causal_smooth_rul` over a window set's trajectories (rows sorted by unit, time)."""
    return causal_smooth_rul(rul, w.unit, elapsed_in(w.time, time_unit), n_last, cap)


def validation_rmse_by_smoothing(
    rul: np.ndarray,
    w_val: WindowSet,
    cap: float,
    time_unit: str,
    max_rul: float | None = None,
    candidates: tuple[int, ...] = SMOOTHING_CANDIDATES,
) -> dict[int, float]:
    """RMSE against the capped truth on the validation units for each causal smoothing length
    in ``candidates``, over the readings the epoch choice scores (every reading, or those with
    true RUL <= ``max_rul``); the numbers to choose ``rul_smoothing`` with (never the test
    units)."""
    true = w_val.rul.astype(np.float64)
    keep = np.ones(len(true), bool) if max_rul is None else true <= max_rul
    truth = np.minimum(true, cap)[keep]
    out = {}
    for n in candidates:
        err = smoothed_rul(rul, w_val, n, cap, time_unit)[keep] - truth
        out[n] = float(np.sqrt(np.mean(err**2)))
    return out


def split_windows(
    predictor_or_state: MaintenancePredictor | dict[str, Any],
    frame: pd.DataFrame,
    window: int,
    **kw: Any,
) -> WindowSet:
    """Causal windows of a prepared split, normalised with a predictor's stored statistics;
    ``rul`` holds the *uncapped* truth."""
    state = (
        predictor_or_state.normalizer
        if isinstance(predictor_or_state, MaintenancePredictor)
        else predictor_or_state
    )
    return build_windows(
        apply_normalizer(state, frame),
        feature_names(state),
        window,
        unit_column="unit",
        time_column="time",
        target_column="rul_uncapped",
        **kw,
    )


def time_unit_of(data: PreparedData) -> str:
    return data.schema.time_unit if data.schema.time_kind == "timestamp" else "h"


def choose_policy(
    traj: pd.DataFrame, cfg: MaintenanceConfig, time_unit: str
) -> tuple[AlarmPolicy, AlarmPolicySelector | None, list[str]]:
    """Grid search on validation (policy) trajectories; if nothing meets the budget, the
    lowest-false-alarm candidate is used and the breach is reported as a known limit."""
    a = cfg.alarm
    sel = AlarmPolicySelector(
        eval_horizon=a.eval_horizon,
        false_alarm_budget=a.false_alarm_budget,
        horizons=a.horizons,
        ks=a.ks,
        time_unit=time_unit,
        false_alarm_estimate=a.false_alarm_estimate,
        lead_target=a.lead_target,
    )
    try:
        sel.fit(traj)
        return sel.best_policy_, sel, []
    except AlarmBudgetError as err:
        grid = sel.grid_
        fa = grid["false_alarms_per_1000_healthy"].fillna(0.0)
        best = grid.loc[fa.idxmin()]
        msg = f"alarm budget not met on validation units: {err}"
        log.warning(msg)
        return AlarmPolicy(float(best["horizon"]), int(best["k"])), sel, [msg]


def build_model(cfg: MaintenanceConfig, n_channels: int) -> RULModel:
    """The RUL model ``cfg`` describes for ``n_channels`` input channels (one place, so the
    trainer, the distillation student and the growth bench build the same model)."""
    return RULModel(
        cfg.model,
        cfg.optim,
        n_channels=n_channels,
        window=cfg.window,
        patch_len=cfg.patch_len,
        rul_cap=cfg.rul_cap,
        alarm_horizon=cfg.alarm.eval_horizon,
        alarm_loss_weight=cfg.alarm.alarm_loss_weight,
        loss_kind=cfg.loss,
        input_noise=cfg.input_noise,
        val_max_rul=cfg.val_max_rul,
    )


def pretrain_if_configured(
    model: torch.nn.Module,
    cfg: MaintenanceConfig,
    w_train: WindowSet,
    seed: int,
    device: str | None = None,
) -> list[float]:
    """The recipe's masked-patch pretraining (``cfg.pretrain_epochs`` > 0) of ``model`` on the
    training windows, in place; its per-epoch losses ([] when off). Every model a config trains
    goes through it (ensemble members, distilled students), so a distilled student and the same
    student trained from scratch get the same budget."""
    if cfg.pretrain_epochs <= 0:
        return []
    dev = device or (
        "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    )
    losses = pretrain_masked(
        model,
        w_train.x,
        w_train.mask,
        cfg.pretrain_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.pretrain_lr,
        mask_ratio=cfg.pretrain_mask_ratio,
        seed=seed,
        device=dev,
    )
    model.cpu()
    return losses


def _train_member(
    cfg: MaintenanceConfig,
    w_train: WindowSet,
    w_val: WindowSet,
    k: int,
    logger: Any,
    device: str | None,
) -> tuple[RULModel, list[float], BestValidationRMSE]:
    """(Pre)train one model from its own seed; with ``restore_best``, its best epoch's weights."""
    seed = member_seed(cfg.seed, k)
    seed_everything(seed)
    model = build_model(cfg, n_channels=w_train.x.shape[2])
    losses = pretrain_if_configured(model, cfg, w_train, seed, device)
    g = torch.Generator().manual_seed(seed)
    train_dl = batch_loader(w_train, cfg.batch_size, True, cfg.steps_per_epoch, g)
    val_dl = batch_loader(w_val, max(cfg.batch_size, 2048), False)
    best = BestValidationRMSE(cfg.early_stopping_patience)
    callbacks: list[lightning.Callback] = [best]
    tcfg = cfg.trainer
    if k > 0 and tcfg.seed is not None:
        tcfg = dataclasses.replace(tcfg, seed=member_seed(tcfg.seed, k))
    trainer = build_trainer(tcfg, extra_callbacks=callbacks, logger=logger if k == 0 else False)
    trainer.fit(model, train_dl, val_dl)
    model = single_device_copy(model).cpu().eval()
    if cfg.restore_best:
        best.restore(model)
    return model, losses, best


def fit(
    cfg: MaintenanceConfig,
    logger: Any = False,
    data: PreparedData | None = None,
    device: str | None = None,
) -> FitOutput:
    """Prepare data, (pre)train the model, choose the alarm policy on validation units."""
    seed_everything(cfg.seed)
    data = data if data is not None else prepare_data(cfg)
    state = normalizer_state(data.normalizer)
    if cfg.age_feature:
        state |= {"age_feature": True, "age_scale": float(cfg.age_scale)}
    if cfg.input_smoothing.kind != "none":
        state |= {"input_smoothing": cfg.input_smoothing.to_dict()}
    if cfg.unit_baseline_readings:
        state |= {"unit_baseline_readings": int(cfg.unit_baseline_readings)}
    w_train = split_windows(state, data.train, cfg.window, stride=cfg.train_stride)
    w_val = split_windows(state, data.policy, cfg.window)
    members, losses = [], []
    for k in range(cfg.ensemble_size):
        member, member_losses, member_best = _train_member(cfg, w_train, w_val, k, logger, device)
        members.append(member)
        losses += member_losses
        if k == 0:
            best = member_best  # the validation history reported is member 0's
    model = members[0] if cfg.ensemble_size == 1 else RULEnsemble(members).eval()
    tu = time_unit_of(data)
    pred_dev = device if device not in (None, "cpu") and torch.cuda.is_available() else "cpu"
    val_rul, _ = model.to(pred_dev).predict_windows(w_val.x, w_val.mask)
    model.cpu()
    rul_unit = tu if data.schema.time_kind == "timestamp" else "cycles"
    val_by_n = validation_rmse_by_smoothing(val_rul, w_val, cfg.rul_cap, rul_unit, cfg.val_max_rul)
    val_rul = smoothed_rul(val_rul, w_val, cfg.rul_smoothing, cfg.rul_cap, rul_unit)
    policy, selector, limits = choose_policy(trajectory_frame(w_val, val_rul), cfg, tu)
    predictor = MaintenancePredictor(
        model, state, data.schema, policy, time_unit=rul_unit, rul_smoothing=cfg.rul_smoothing
    )
    limits += [
        "windows count readings, not clock time: gaps in an asset's readings are not filled",
        "scoring windows an asset's whole given history; pass only the readings since its "
        "last maintenance (a new run resets health)",
    ]
    return FitOutput(
        predictor, data, selector, losses, limits, best.history, best.best_epoch, val_by_n
    )


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def evaluate_prepared(
    predictor: MaintenancePredictor,
    data: PreparedData,
    cfg: MaintenanceConfig,
    figures: bool = True,
) -> EvalResult:
    """All metrics of the module docstring for ``predictor`` on ``data``'s held-out splits."""
    model, policy = predictor.model, predictor.policy
    timestamped = data.schema.time_kind == "timestamp"
    tu = time_unit_of(data)
    unit_name = tu if timestamped else "cycles"
    H = cfg.alarm.eval_horizon

    n_smooth, rul_unit = predictor.rul_smoothing, predictor.time_unit

    def rul_of(w: WindowSet) -> np.ndarray:  # the predictor's RUL: causal smoothing included
        raw = model.predict_windows(w.x, w.mask)[0]
        return smoothed_rul(raw, w, n_smooth, model.rul_cap, rul_unit)

    # C-MAPSS test protocol: one prediction per test unit at its last observed reading (with
    # smoothing, from the unit's readings up to that one; the truth is never read)
    w_test = split_windows(predictor, data.test, cfg.window)
    test_rul = rul_of(w_test)
    last = np.r_[w_test.unit[1:] != w_test.unit[:-1], True]  # each unit's last reading
    pred_last, true_last = test_rul[last], w_test.rul[last]
    test = cmapss_test_metrics(pred_last, true_last, cap=cfg.rul_cap)
    # alarms on truncated test units (policy state at the last reading)
    test_traj = trajectory_frame(w_test, test_rul)
    trunc = truncated_alarm_metrics(test_traj, policy, horizon=H, time_unit=tu)
    # lead time + prognostics on held-out full run-to-failure units
    w_lead = split_windows(predictor, data.lead, cfg.window)
    lead_traj = trajectory_frame(w_lead, rul_of(w_lead))
    lead = lead_time_metrics(lead_traj, policy, horizon=H, time_unit=tu)
    prog = prognostic_metrics(lead_traj, time_unit=tu)

    lm = lead.metrics
    metrics = {
        **test.metrics,
        "n_test_units": test.metrics["n_units"],
        "test_alarm_precision": trunc.metrics["alarm_precision"],
        "test_alarm_recall": trunc.metrics["alarm_recall"],
        "lead_detection_rate": lm["detection_rate"],
        "lead_time_median": lm["lead_time_median"],
        "lead_time_p10": lm["lead_time_p10"],
        "false_alarms_per_1000_healthy": lm["false_alarms_per_1000_healthy"],
        "lead_n_units": lm["n_failures"],
        "ph_mean": prog.metrics["ph_mean"],
        "ph_median": prog.metrics["ph_median"],
        "alpha_lambda_accuracy": prog.metrics["alpha_lambda_accuracy"],
        "alarm_policy_threshold": float(policy.horizon),
        "alarm_policy_k": float(policy.k),
    }
    metrics.pop("n_units")
    undefined = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    protocol = " | ".join(
        [
            f"data: {data.source}; units split by unit (seed {cfg.seed}): "
            f"{data.train['unit'].nunique()} train, {data.policy['unit'].nunique()} policy-validation, "
            f"{data.lead['unit'].nunique()} lead-time hold-out, {data.test['unit'].nunique()} test",
            f"[rmse_*, phm08_*] {test.protocol}; units: {unit_name}"
            + (
                f"; every RUL (here and below) is the causal mean of the last {n_smooth} window "
                "estimates, each minus the time since (readings up to the scored one only)"
                if n_smooth > 1
                else ""
            ),
            f"[test_alarm_*] {trunc.protocol}",
            f"[lead_*, false_alarms_per_1000_healthy] {lead.protocol} (held-out units never used "
            f"for training or policy choice)",
            f"[ph_*, alpha_lambda_accuracy] {prog.protocol}; on the lead-time hold-out units, "
            f"in {unit_name}",
            f"[alarm_policy_*] chosen on policy-validation units only: max detection, then useful "
            f"lead, under <= {cfg.alarm.false_alarm_budget:g} false alarms / 1000 healthy steps "
            f"at eval horizon {H:g} {unit_name}",
        ]
        + ([f"undefined (omitted): {undefined}"] if undefined else [])
    )
    figs: dict[str, Any] = {}
    if figures:  # matplotlib only when figures are asked for (the GPU bench machine has none)
        from apps.maintenance.plots import plot_lead_time_histogram, plot_rul_trajectories

        label = f"time ({unit_name})" if not timestamped else "time"
        figs["rul_trajectories_lead_units"] = plot_rul_trajectories(
            lead_traj, policy=policy, max_units=cfg.eval_plot_units, time_label=label
        )
        figs["lead_time_distribution"] = plot_lead_time_histogram(
            lead.tables["per_unit"], time_label=unit_name
        )
    tables = {
        "lead_per_unit": lead.tables["per_unit"],
        "test_alarm_per_unit": trunc.tables["per_unit"],
        "test_last_cycle": pd.DataFrame(
            {"unit": w_test.unit[last], "rul_pred": pred_last, "rul_true": true_last}
        ),
    }
    return EvalResult(metrics=_finite(metrics), protocol=protocol, figures=figs, tables=tables)


def fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of a frame's dtypes and values (same recipe as ``core.tracking.fingerprint_frame``,
    without importing MLflow)."""
    h = hashlib.sha256()
    h.update(json.dumps([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return h.hexdigest()


def input_example(data: PreparedData, n_units: int = 2, max_rows: int = 40) -> pd.DataFrame:
    """Raw readings of a few test units under the schema's column names (scoring input)."""
    s = data.schema
    units = list(pd.unique(data.test["unit"]))[:n_units]
    parts = [data.test[data.test["unit"] == u].tail(max_rows) for u in units]
    ex = pd.concat(parts, ignore_index=True).rename(
        columns={"unit": s.asset_column, "time": s.time_column}
    )
    return ex[[s.asset_column, s.time_column, *s.setting_columns, *s.sensor_columns]]


def np_seed_mean_sd(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0
