"""Configuration of the maintenance app: data source, windows, alarm search, model, training.

One dataclass, YAML round-trip (``MaintenanceConfig.from_yaml(path)``), so a run's config is a
plain file logged next to its metrics. ``data.kind`` picks the source: ``cmapss`` (a NASA
subset FD001..FD004, or any subset written by ``write_cmapss``, from ``data.data_dir`` or
``$KEEL_DATA_DIR/maintenance/cmapss``) or ``sensor_table`` (a table + ``SensorSchema`` yaml +
a failure/maintenance events table; runs closed by a failure become run-to-failure units).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from apps.maintenance._io import PROJECT_ROOT
from apps.maintenance.cmapss import default_cmapss_dir
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.input_smoothing import InputSmoothingConfig
from core.config import BackboneConfig
from core.config import small_backbone as core_small_backbone
from core.configio import YamlConfig
from core.engine import TrainerConfig
from core.optim import OptimConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATA_KINDS = ("cmapss", "sensor_table")
FA_ESTIMATES = ("plus_one", "observed")


@dataclass
class DataConfig(YamlConfig):
    """Where the readings come from and how units are split.

    Relative paths are taken from the project root. ``val_fraction`` of the training units
    (never rows) is held out of training; half of those choose the alarm policy (and serve
    as Lightning's validation set), the other half only measure lead time. For
    ``sensor_table``, ``test_fraction`` of the run-to-failure units become test units,
    truncated at a random reading as in C-MAPSS (seeded).

    ``extra_train_subsets`` (``cmapss`` only): the *training* files of other subsets with the
    same number of operating conditions (FD001 + FD003, or FD002 + FD004) join the training
    units after the split, so the validation, lead-time and test units stay exactly those of
    ``subset`` alone; no other subset's test units are used.
    """

    kind: str = "cmapss"
    subset: str = "FD001"
    data_dir: str | None = None  # None: $KEEL_DATA_DIR/maintenance/cmapss
    table_path: str | None = None
    schema_path: str | None = None
    events_path: str | None = None
    n_conditions: int | None = None  # None: C-MAPSS subset's own count (1 for sensor tables)
    condition_onehot: bool = False
    val_fraction: float = 0.3
    test_fraction: float = 0.3
    extra_train_subsets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise MaintenanceDataError(f"data.kind={self.kind!r}: expected one of {DATA_KINDS}")
        if self.extra_train_subsets and self.kind != "cmapss":
            raise MaintenanceDataError(
                "data.extra_train_subsets needs data.kind='cmapss' (other subsets' training files)"
            )
        if self.subset in self.extra_train_subsets:
            raise MaintenanceDataError(
                f"data.extra_train_subsets lists {self.subset}, the subset itself: its training "
                "units are already in; adding them again would leak validation units into training"
            )
        if self.kind == "sensor_table" and not (
            self.table_path and self.schema_path and self.events_path
        ):
            raise MaintenanceDataError(
                "data.kind='sensor_table' needs data.table_path, data.schema_path and data.events_path"
            )

    def resolve(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(os.path.expandvars(value))
        return p if p.is_absolute() else PROJECT_ROOT / p

    def cmapss_dir(self) -> Path:
        return self.resolve(self.data_dir) or default_cmapss_dir()


@dataclass
class AlarmConfig(YamlConfig):
    """``eval_horizon``: the operator's requirement "warn when failure is within H" (cycles or
    ``time_unit``); the policy's threshold and k are searched over ``horizons`` x ``ks`` on the
    policy-validation units under ``false_alarm_budget`` false alarms per 1000 healthy steps.

    ``false_alarm_estimate``: how a candidate's rate is estimated on the few validation units.
    ``observed`` (false episodes / healthy steps) lets the search pick the most aggressive
    policy that just fits the budget on validation, which then breaks it on new units;
    ``plus_one`` counts one more false episode than observed (a rule-of-one upper estimate),
    so a candidate passes only when the budget would hold even with one more false alarm.
    ``lead_target``: prefer the latest-warning policy whose validation median lead reaches it
    (see :class:`apps.maintenance.alarms.AlarmPolicySelector`)."""

    eval_horizon: float = 30.0
    horizons: tuple[float, ...] = (15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0)
    ks: tuple[int, ...] = (1, 2, 3, 5, 8)
    false_alarm_budget: float = 1.0
    alarm_loss_weight: float = 0.2
    false_alarm_estimate: str = "plus_one"  # or "observed"
    lead_target: float | None = None

    def __post_init__(self) -> None:
        if self.false_alarm_estimate not in FA_ESTIMATES:
            raise MaintenanceDataError(
                f"alarm.false_alarm_estimate={self.false_alarm_estimate!r}: expected one of {FA_ESTIMATES}"
            )
        self.horizons = tuple(float(h) for h in self.horizons)
        self.ks = tuple(int(k) for k in self.ks)


def small_backbone() -> BackboneConfig:
    return core_small_backbone(dropout=0.1)


@dataclass
class MaintenanceConfig(YamlConfig):
    """Everything one training run needs (see module docstring).

    Training recipe knobs: ``steps_per_epoch`` (None: one pass over all training windows; else
    that many batches of windows drawn at random, so an "epoch" costs the same on every subset);
    ``restore_best`` keeps the weights of the epoch with the lowest validation RMSE (capped
    truth, on the policy-validation units: every reading, or with ``val_max_rul`` only the
    readings whose true RUL is at most that, i.e. cuts "some time before failure" like the
    test units', not the long healthy stretch early in each run) and ``early_stopping_patience`` stops after that many epochs without improvement.
    ``age_feature`` adds the number of readings seen so far (/ ``age_scale``), observable at
    scoring time, as an input channel. ``input_noise``: std of Gaussian noise added to every
    (normalised) input channel of training windows only, at real (not padded) steps, a regulariser against memorising
    the few training engines. ``rul_smoothing``: the RUL reported at a reading is the mean of
    the last ``rul_smoothing`` window estimates, each minus the time elapsed since it (causal:
    readings up to that one only; 1 = off); it applies everywhere the model is read (alarm
    policy choice, lead time, the test protocol, scoring). ``input_smoothing``: causal per-unit
    denoising of the normalised sensors before windowing (:mod:`apps.maintenance.input_smoothing`;
    stored with the normaliser, so scoring applies it too). ``unit_baseline_readings``: when > 0,
    each kept sensor also enters as its drift from the mean of the unit's first that many
    readings (:mod:`apps.maintenance.unit_baseline`; causal, stored with the normaliser; 0 = off).
    ``ensemble_size``: that many models,
    each from its own seed and with its own best epoch, averaged (:class:`RULEnsemble`; K times
    the training and scoring cost); the validation history reported is member 0's.
    ``distill_mixup``: read only when this config is a distillation student
    (:mod:`apps.maintenance.distillation`): that many extra windows per training window, each
    a convex mix of two training windows, labelled by the teacher alone (0 = off).
    """

    data: DataConfig = field(default_factory=DataConfig)
    window: int = 30
    patch_len: int = 5
    train_stride: int = 1
    rul_cap: float = 125.0
    loss: str = "huber"  # or "mse"
    batch_size: int = 256
    steps_per_epoch: int | None = None
    early_stopping_patience: int | None = None
    restore_best: bool = False
    age_feature: bool = False
    age_scale: float = 100.0
    input_noise: float = 0.0
    input_smoothing: InputSmoothingConfig = field(default_factory=InputSmoothingConfig)
    unit_baseline_readings: int = 0
    ensemble_size: int = 1
    val_max_rul: float | None = None
    rul_smoothing: int = 1
    alarm: AlarmConfig = field(default_factory=AlarmConfig)
    distill_mixup: float = 0.0
    pretrain_epochs: int = 0
    pretrain_mask_ratio: float = 0.3
    pretrain_lr: float = 1e-3
    model: BackboneConfig = field(default_factory=small_backbone)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig.quiet(30))
    seed: int = 0
    eval_plot_units: int = 4

    def __post_init__(self) -> None:
        if self.window < 1 or self.patch_len < 1:
            raise MaintenanceDataError(
                f"window={self.window}, patch_len={self.patch_len}: expected >= 1"
            )
        if self.loss not in ("huber", "mse"):
            raise MaintenanceDataError(f"loss={self.loss!r}: expected 'huber' or 'mse'")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise MaintenanceDataError(f"steps_per_epoch={self.steps_per_epoch}: expected >= 1")
        if self.age_scale <= 0:
            raise MaintenanceDataError(f"age_scale={self.age_scale}: expected > 0")
        if self.input_noise < 0:
            raise MaintenanceDataError(f"input_noise={self.input_noise}: expected >= 0")
        if self.val_max_rul is not None and self.val_max_rul <= 0:
            raise MaintenanceDataError(f"val_max_rul={self.val_max_rul}: expected > 0 or null")
        if self.unit_baseline_readings < 0:
            raise MaintenanceDataError(
                f"unit_baseline_readings={self.unit_baseline_readings}: expected >= 0 (0 = off)"
            )
        if self.ensemble_size < 1:
            raise MaintenanceDataError(f"ensemble_size={self.ensemble_size}: expected >= 1")
        if self.rul_smoothing < 1:
            raise MaintenanceDataError(f"rul_smoothing={self.rul_smoothing}: expected >= 1")
        if self.distill_mixup < 0:
            raise MaintenanceDataError(
                f"distill_mixup={self.distill_mixup}: expected >= 0 (0 = off)"
            )
        if self.pretrain_epochs < 0:
            raise MaintenanceDataError(f"pretrain_epochs={self.pretrain_epochs}: expected >= 0")


def load_config(name_or_path: str | Path) -> MaintenanceConfig:
    """``demo`` / ``fd001`` (a file in ``configs/``) or a YAML path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        raise MaintenanceDataError(f"maintenance config {p} not found")
    return MaintenanceConfig.from_yaml(p)


def demo_config() -> MaintenanceConfig:
    return load_config("demo")
