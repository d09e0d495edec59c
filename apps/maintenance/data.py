"""From a :class:`MaintenanceConfig` to normalised run-to-failure units, split for training.

Every source ends in the same layout so the model, metrics and predictor need not know where
the data came from: frames with ``unit``, ``time`` (cycles or timestamps), the raw input
columns (settings, sensors) and ``rul_uncapped`` (true RUL at each reading, in cycles or the
schema's ``time_unit``). Splits are by *unit*:

* ``train``: fits the normaliser and the model;
* ``policy``: held-out full run-to-failure units; Lightning's validation set and the only data
  that chooses the alarm policy (horizon, k);
* ``lead``: held-out full run-to-failure units touched by nothing else; lead time, false alarms
  and the prognostic metrics are measured here;
* ``test``: truncated units with their true RUL after the last reading (C-MAPSS test files, or
  a seeded truncation of held-out sensor-table runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from apps.maintenance.cmapss import N_CONDITIONS, SENSOR_COLUMNS, SETTING_COLUMNS, load_cmapss
from apps.maintenance.config import MaintenanceConfig
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.events import label_runs, load_events
from apps.maintenance.preprocess import (
    SensorNormalizer,
    add_cmapss_targets,
    split_units,
)
from apps.maintenance.schema import RepairPolicy, SensorSchema, load_sensor_table
from apps.maintenance.windows import WindowSet, build_windows


@dataclass
class PreparedData:
    """Split units, the fitted normaliser and the schema the predictor will validate with."""

    train: pd.DataFrame
    policy: pd.DataFrame
    lead: pd.DataFrame
    test: pd.DataFrame
    normalizer: SensorNormalizer
    schema: SensorSchema
    feature_names: tuple[str, ...]
    source: str

    @property
    def time_unit(self) -> str:
        return self.schema.time_unit if self.schema.time_kind == "timestamp" else "cycles"

    def normalised(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.normalizer.transform(frame)


def cmapss_schema() -> SensorSchema:
    """C-MAPSS as a sensor table; scoring sorts unsorted cycles but refuses duplicates/NaNs."""
    return SensorSchema(
        asset_column="unit",
        time_column="cycle",
        sensor_columns=SENSOR_COLUMNS,
        setting_columns=SETTING_COLUMNS,
        time_kind="cycle",
        repair=RepairPolicy(unsorted="sort"),
    )


def _std_frame(frame: pd.DataFrame, schema: SensorSchema, unit_col: str) -> pd.DataFrame:
    cols = [*schema.setting_columns, *schema.sensor_columns]
    out = frame[[unit_col, schema.time_column, *cols, "rul_uncapped"]].copy()
    return out.rename(columns={unit_col: "unit", schema.time_column: "time"})


def _load_cmapss(cfg: MaintenanceConfig) -> tuple[pd.DataFrame, pd.DataFrame, SensorSchema, str]:
    d = load_cmapss(cfg.data.cmapss_dir(), cfg.data.subset)
    train, test = add_cmapss_targets(d.train, d.test, d.test_rul, cap=cfg.rul_cap)
    schema = cmapss_schema()
    src = f"C-MAPSS {cfg.data.subset} ({d.data_dir})"
    return _std_frame(train, schema, "unit"), _std_frame(test, schema, "unit"), schema, src


EXTRA_UNIT_OFFSET = 1000  # extra subset i's unit u becomes (i + 1) * 1000 + u: no id collides


def _extra_cmapss_train(cfg: MaintenanceConfig, schema: SensorSchema) -> pd.DataFrame:
    """The training units of ``data.extra_train_subsets``, renumbered (their test units unused)."""
    want = N_CONDITIONS.get(cfg.data.subset)
    parts = []
    for i, sub in enumerate(cfg.data.extra_train_subsets):
        if N_CONDITIONS.get(sub) != want:
            raise MaintenanceDataError(
                f"data.extra_train_subsets: {sub} runs in {N_CONDITIONS.get(sub)} operating "
                f"condition(s), {cfg.data.subset} in {want}; only subsets with the same "
                "conditions share a normaliser (FD001 + FD003, FD002 + FD004)"
            )
        d = load_cmapss(cfg.data.cmapss_dir(), sub)
        if d.train["unit"].max() >= EXTRA_UNIT_OFFSET:
            raise MaintenanceDataError(
                f"{sub}: unit ids reach {d.train['unit'].max()}; renumbering needs < {EXTRA_UNIT_OFFSET}"
            )
        train = add_cmapss_targets(d.train, d.test, d.test_rul, cap=cfg.rul_cap)[0]
        frame = _std_frame(train, schema, "unit")
        frame["unit"] = frame["unit"] + (i + 1) * EXTRA_UNIT_OFFSET
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _load_sensor_table(
    cfg: MaintenanceConfig,
) -> tuple[pd.DataFrame, pd.DataFrame, SensorSchema, str]:
    dc = cfg.data
    schema = SensorSchema.from_yaml(dc.resolve(dc.schema_path))
    table = load_sensor_table(dc.resolve(dc.table_path), schema)
    if not schema.sensor_columns:
        schema.sensor_columns = table.sensor_columns
    labelled = label_runs(table, load_events(dc.resolve(dc.events_path), schema))
    f = labelled.frame[labelled.frame["run_failed"].astype(bool)].copy()
    if f["run_id"].nunique() < 4:
        raise MaintenanceDataError(
            f"{dc.table_path}: only {f['run_id'].nunique()} runs end in a failure; need >= 4"
        )
    f["rul_uncapped"] = f["rul"].astype(np.float64)
    # a run is a unit; its id keeps the asset's id type (text) so examples match scoring input
    f["run_unit"] = f[schema.asset_column].astype(str) + "/run" + f["run_index"].astype(str)
    full = _std_frame(f, schema, "run_unit")
    units = np.unique(full["unit"])
    rest, test_units = split_units(units, dc.test_fraction, seed=cfg.seed + 1000)
    rng = np.random.default_rng(cfg.seed + 1001)
    test_parts = []
    for u in test_units:  # truncate like C-MAPSS: keep a random prefix of >= 5 readings
        g = full[full["unit"] == u]
        keep = int(rng.integers(min(5, len(g)), len(g) + 1))
        test_parts.append(g.iloc[:keep])
    train = full[full["unit"].isin(rest)]
    src = f"sensor table {dc.table_path} (failed runs as units, {len(test_units)} truncated test runs)"
    return train, pd.concat(test_parts, ignore_index=True), schema, src


def prepare_data(cfg: MaintenanceConfig) -> PreparedData:
    """Load, split by unit (seeded), fit the normaliser on training units only."""
    if cfg.data.kind == "cmapss":
        train_all, test, schema, src = _load_cmapss(cfg)
        default_k = N_CONDITIONS.get(cfg.data.subset, 1)
    else:
        train_all, test, schema, src = _load_sensor_table(cfg)
        default_k = 1
    tr_units, held = split_units(train_all["unit"].unique(), cfg.data.val_fraction, seed=cfg.seed)
    if len(held) < 2:
        raise MaintenanceDataError(
            f"only {len(held)} held-out unit(s); raise data.val_fraction to hold out >= 2"
        )
    policy_units, lead_units = split_units(held, 0.5, seed=cfg.seed + 1)
    pick = train_all["unit"]
    train = train_all[pick.isin(tr_units)].reset_index(drop=True)
    if cfg.data.extra_train_subsets:  # after the split: held-out and test units are unchanged
        extra = _extra_cmapss_train(cfg, schema)
        train = pd.concat([train, extra], ignore_index=True)
        src += f" + training units of {', '.join(cfg.data.extra_train_subsets)}"
    k = cfg.data.n_conditions or default_k
    normalizer = SensorNormalizer(
        sensor_columns=schema.sensor_columns,
        setting_columns=schema.setting_columns if k > 1 else (),
        n_conditions=k,
        max_constant_levels=2 if cfg.data.kind == "cmapss" else 1,
        condition_onehot=cfg.data.condition_onehot,
        random_state=cfg.seed,
    ).fit(train)
    return PreparedData(
        train=train,
        policy=train_all[pick.isin(policy_units)].reset_index(drop=True),
        lead=train_all[pick.isin(lead_units)].reset_index(drop=True),
        test=test.reset_index(drop=True),
        normalizer=normalizer,
        schema=schema,
        feature_names=tuple(normalizer.get_feature_names_out()),
        source=src,
    )


def windows_of(
    data: PreparedData, frame: pd.DataFrame, cfg: MaintenanceConfig, **kw: object
) -> WindowSet:
    """Causal windows of a split; ``rul`` holds the *uncapped* truth (cap it for training)."""
    return build_windows(
        data.normalised(frame),
        data.feature_names,
        cfg.window,
        unit_column="unit",
        time_column="time",
        target_column="rul_uncapped",
        **kw,  # type: ignore[arg-type]
    )
