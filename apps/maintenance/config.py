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
from core.config import BackboneConfig
from core.config import small_backbone as core_small_backbone
from core.configio import YamlConfig
from core.engine import TrainerConfig
from core.optim import OptimConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATA_KINDS = ("cmapss", "sensor_table")


@dataclass
class DataConfig(YamlConfig):
    """Where the readings come from and how units are split.

    Relative paths are taken from the project root. ``val_fraction`` of the training units
    (never rows) is held out of training; half of those choose the alarm policy (and serve
    as Lightning's validation set), the other half only measure lead time. For
    ``sensor_table``, ``test_fraction`` of the run-to-failure units become test units,
    truncated at a random reading as in C-MAPSS (seeded).
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

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise MaintenanceDataError(f"data.kind={self.kind!r}: expected one of {DATA_KINDS}")
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
    policy-validation units under ``false_alarm_budget`` false alarms per 1000 healthy steps."""

    eval_horizon: float = 30.0
    horizons: tuple[float, ...] = (15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0)
    ks: tuple[int, ...] = (1, 2, 3, 5, 8)
    false_alarm_budget: float = 1.0
    alarm_loss_weight: float = 0.2

    def __post_init__(self) -> None:
        self.horizons = tuple(float(h) for h in self.horizons)
        self.ks = tuple(int(k) for k in self.ks)


def small_backbone() -> BackboneConfig:
    return core_small_backbone(dropout=0.1)


@dataclass
class MaintenanceConfig(YamlConfig):
    """Everything one training run needs (see module docstring)."""

    data: DataConfig = field(default_factory=DataConfig)
    window: int = 30
    patch_len: int = 5
    train_stride: int = 1
    rul_cap: float = 125.0
    loss: str = "huber"  # or "mse"
    batch_size: int = 256
    alarm: AlarmConfig = field(default_factory=AlarmConfig)
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
