"""Synthetic fleets of timestamped run-to-failure assets (deterministic by seed).

Each asset is read hourly. It runs in a few operating conditions (regimes that switch every
few hours and shift every sensor's level, like C-MAPSS's flight conditions, and show up in two
noisy setting columns). Within one run, health is perfect until a random degradation onset,
then degrades exponentially until failure:
``h(t) = (exp(b (t - onset) / (L - onset)) - 1) / (exp(b) - 1)``, 0 before onset and 1 at the
failure time L; a subset of sensors drifts by ``amplitude * h(t)`` on top of noise. A failure is
followed by downtime and a maintenance event that resets health, and the asset starts a new
run. Some runs are instead ended early by preventive maintenance (censored: no failure), and
the last run of some assets is still going when observation ends.

Written tables: readings (``asset_id, timestamp, op_setting_1, op_setting_2, sensor_01..``),
events (``asset_id, timestamp, event`` with ``failure``/``maintenance``), and the generator's
ground truth per run (``<prefix>_lives``: onset, outcome; for analysis and tests, never a
feature), plus the :class:`SensorSchema` YAML to load the readings with. Optionally the failed
runs in the NASA C-MAPSS text layout (``--cmapss``).

CLI: ``python -m apps.maintenance.synthetic --out data_samples/maintenance/ [--assets N]
[--sensors S] [--seed K] [--nan-fraction F] [--cmapss] [--config fleet.yaml]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from apps.maintenance._io import atomic_write, atomic_write_text
from apps.maintenance.cmapss import CMAPSS_COLUMNS, SENSOR_COLUMNS, write_cmapss
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.schema import SensorSchema
from core.configio import YamlConfig

ASSET, TIME, EVENT = "asset_id", "timestamp", "event"
SETTINGS = ("op_setting_1", "op_setting_2")


@dataclass
class FleetConfig(YamlConfig):
    """Generator settings. Ranges are ``(low, high)``, inclusive; durations in hours."""

    n_assets: int = 12
    n_sensors: int = 10
    n_degrading: int = 4
    n_conditions: int = 3
    runs_per_asset: tuple[int, int] = (2, 4)
    life_hours: tuple[int, int] = (150, 400)
    onset_fraction: tuple[float, float] = (0.3, 0.7)
    drift_sharpness: tuple[float, float] = (2.0, 4.0)
    drift_amplitude: tuple[float, float] = (4.0, 8.0)  # at failure, in units of the noise std
    noise: float = 1.0
    downtime_hours: tuple[int, int] = (6, 48)
    p_preventive: float = 0.15
    p_open_last: float = 0.5
    condition_dwell_hours: tuple[int, int] = (4, 24)
    nan_fraction: float = 0.0
    start: str = "2024-01-01T00:00:00"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "runs_per_asset",
            "life_hours",
            "onset_fraction",
            "drift_sharpness",
            "drift_amplitude",
            "downtime_hours",
            "condition_dwell_hours",
        ):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise MaintenanceDataError(f"FleetConfig.{name}=({lo}, {hi}): low > high")
            setattr(self, name, (lo, hi))
        if not 1 <= self.n_sensors <= len(SENSOR_COLUMNS):
            raise MaintenanceDataError(
                f"FleetConfig.n_sensors={self.n_sensors}: expected 1..{len(SENSOR_COLUMNS)}"
            )
        if not 1 <= self.n_degrading <= self.n_sensors:
            raise MaintenanceDataError(
                f"FleetConfig.n_degrading={self.n_degrading}: expected 1..n_sensors"
            )
        if self.n_assets < 1 or self.n_conditions < 1 or self.runs_per_asset[0] < 1:
            raise MaintenanceDataError(
                "FleetConfig: n_assets, n_conditions and runs_per_asset must be >= 1"
            )
        if self.life_hours[0] < 10 or not 0 < self.onset_fraction[0] <= self.onset_fraction[1] < 1:
            raise MaintenanceDataError(
                "FleetConfig: life_hours >= 10 and 0 < onset_fraction < 1 required"
            )
        if not 0 <= self.nan_fraction < 1:
            raise MaintenanceDataError(
                f"FleetConfig.nan_fraction={self.nan_fraction}: expected 0 <= f < 1"
            )


@dataclass
class SyntheticFleet:
    sensors: pd.DataFrame
    events: pd.DataFrame
    lives: pd.DataFrame
    schema: SensorSchema
    degrading_sensors: tuple[str, ...]
    config: FleetConfig = field(repr=False)


def sensor_names(n: int) -> tuple[str, ...]:
    return tuple(f"sensor_{i:02d}" for i in range(1, n + 1))


def generate_fleet(cfg: FleetConfig | None = None) -> SyntheticFleet:
    """Generate a fleet (see module docstring). Same config, same seed: identical tables."""
    cfg = cfg or FleetConfig()
    rng = np.random.default_rng(cfg.seed)
    names = sensor_names(cfg.n_sensors)
    n_s = cfg.n_sensors

    # fleet-wide sensor physics
    level = np.round(rng.uniform(10.0, 1000.0, n_s), 2)
    scale = level * rng.uniform(0.002, 0.01, n_s)  # noise std of each sensor
    cond_effect = scale * rng.normal(0.0, 10.0, (cfg.n_conditions, n_s))
    degrading = np.sort(rng.permutation(n_s)[: cfg.n_degrading])
    amplitude = np.zeros(n_s)
    amplitude[degrading] = (
        rng.choice([-1.0, 1.0], cfg.n_degrading)
        * rng.uniform(*cfg.drift_amplitude, cfg.n_degrading)
        * scale[degrading]
    )
    cond_settings = np.stack(
        [
            rng.choice(43, cfg.n_conditions, replace=False).astype(float),
            np.round(rng.uniform(0, 0.9, cfg.n_conditions), 2),
        ],
        axis=1,
    )
    start = pd.Timestamp(cfg.start)

    readings, events, lives = [], [], []
    for a in range(cfg.n_assets):
        asset = f"asset_{a:03d}"
        asset_offset = scale * rng.normal(0.0, 0.5, n_s)  # manufacturing variation
        clock = int(rng.integers(0, 72))  # hours since cfg.start
        n_runs = int(rng.integers(cfg.runs_per_asset[0], cfg.runs_per_asset[1] + 1))
        for r in range(n_runs):
            life = int(rng.integers(cfg.life_hours[0], cfg.life_hours[1] + 1))
            onset = life * rng.uniform(*cfg.onset_fraction)
            sharp = rng.uniform(*cfg.drift_sharpness)
            if r == n_runs - 1 and rng.random() < cfg.p_open_last:
                outcome, last = "open", max(1, int(life * rng.uniform(0.2, 0.9)))
            elif rng.random() < cfg.p_preventive:
                outcome, last = "maintenance", max(1, int(life * rng.uniform(0.3, 0.95)))
            else:
                outcome, last = "failure", life
            hours = np.arange(last + 1, dtype=np.float64)  # readings at clock + 0..last hours
            rel = np.clip((hours - onset) / (life - onset), 0.0, None)
            health = np.where(hours >= onset, np.expm1(sharp * rel) / np.expm1(sharp), 0.0)
            cond = _regimes(rng, len(hours), cfg.n_conditions, cfg.condition_dwell_hours)
            noise = rng.normal(0.0, 1.0, (len(hours), n_s)) * scale * cfg.noise
            values = level + cond_effect[cond] + asset_offset + health[:, None] * amplitude + noise
            settings = cond_settings[cond] + rng.normal(0.0, 1.0, (len(hours), 2)) * [0.003, 0.0003]
            t = start + pd.to_timedelta(clock + hours, unit="h")
            block = pd.DataFrame(np.round(values, 4), columns=list(names))
            block.insert(0, SETTINGS[1], np.round(settings[:, 1], 4))
            block.insert(0, SETTINGS[0], np.round(settings[:, 0], 4))
            block.insert(0, TIME, t)
            block.insert(0, ASSET, asset)
            readings.append(block)
            end = t[-1]
            lives.append(
                {
                    ASSET: asset,
                    "run_index": r,
                    "start": t[0],
                    "end": end,
                    "onset_time": t[0] + pd.Timedelta(hours=float(np.ceil(onset))),
                    "life_hours": life,
                    "outcome": outcome,
                    "failure_time": end if outcome == "failure" else pd.NaT,
                }
            )
            if outcome == "open":
                break
            if outcome == "failure":
                events.append({ASSET: asset, TIME: end, EVENT: "failure"})
            downtime = int(rng.integers(cfg.downtime_hours[0], cfg.downtime_hours[1] + 1))
            events.append(
                {ASSET: asset, TIME: end + pd.Timedelta(hours=downtime), EVENT: "maintenance"}
            )
            clock += last + downtime + 1

    sensors = pd.concat(readings, ignore_index=True)
    if cfg.nan_fraction > 0:
        mask = rng.random((len(sensors), n_s)) < cfg.nan_fraction
        block = sensors[list(names)].to_numpy(copy=True)
        block[mask] = np.nan
        sensors[list(names)] = block
    schema = SensorSchema(
        asset_column=ASSET,
        time_column=TIME,
        sensor_columns=names,
        time_kind="timestamp",
        setting_columns=SETTINGS,
        time_unit="h",
    )
    return SyntheticFleet(
        sensors=sensors,
        events=pd.DataFrame(events, columns=[ASSET, TIME, EVENT]),
        lives=pd.DataFrame(lives),
        schema=schema,
        degrading_sensors=tuple(names[i] for i in degrading),
        config=cfg,
    )


def _regimes(
    rng: np.random.Generator, n: int, n_conditions: int, dwell: tuple[int, int]
) -> np.ndarray:
    """Piecewise-constant operating condition per hour, switching after random dwell times."""
    out = np.empty(n, dtype=np.int64)
    i = 0
    while i < n:
        d = int(rng.integers(dwell[0], dwell[1] + 1))
        out[i : i + d] = rng.integers(0, n_conditions)
        i += d
    return out


def to_cmapss(
    fleet: SyntheticFleet, test_fraction: float = 0.3, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The fleet's failed runs as C-MAPSS units: one unit per run to failure, cycles = hours
    since the run started (1-based). A ``test_fraction`` of units is truncated at a random
    cycle (keeping at least 5) with its true RUL returned. Settings 3 is a constant 100 and
    sensors beyond the fleet's count a constant 0 (the normaliser drops them)."""
    f = fleet.sensors
    names = list(fleet.schema.sensor_columns)
    failed = fleet.lives[fleet.lives["outcome"] == "failure"].reset_index(drop=True)
    if len(failed) < 2:
        raise MaintenanceDataError("to_cmapss: the fleet has fewer than 2 runs to failure")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(failed), dtype=bool)
    is_test[rng.permutation(len(failed))[: max(1, round(test_fraction * len(failed)))]] = True
    train_parts, test_parts, rul = [], [], []
    counters = {False: 0, True: 0}
    for i, run in failed.iterrows():
        sel = (f[ASSET] == run[ASSET]) & (f[TIME] >= run["start"]) & (f[TIME] <= run["end"])
        g = f.loc[sel]
        n = len(g)
        counters[bool(is_test[i])] += 1
        block = pd.DataFrame(0.0, index=range(n), columns=list(CMAPSS_COLUMNS))
        block["unit"] = counters[bool(is_test[i])]
        block["cycle"] = np.arange(1, n + 1)
        block["setting_1"] = g[SETTINGS[0]].to_numpy()
        block["setting_2"] = g[SETTINGS[1]].to_numpy()
        block["setting_3"] = 100.0
        for j, s in enumerate(names):
            block[SENSOR_COLUMNS[j]] = g[s].to_numpy()
        if is_test[i]:
            keep = int(rng.integers(min(5, n), n + 1))
            test_parts.append(block.iloc[:keep])
            rul.append(n - keep)
        else:
            train_parts.append(block)
    return (
        pd.concat(train_parts, ignore_index=True),
        pd.concat(test_parts, ignore_index=True),
        np.asarray(rul, dtype=np.int64),
    )


def write_fleet(fleet: SyntheticFleet, out_dir: str | Path, prefix: str = "fleet") -> list[Path]:
    """Write readings, events, run truth (Parquet), schema and config (YAML), atomically."""
    out = Path(out_dir)
    written = []
    for name, frame in (
        ("sensors", fleet.sensors),
        ("events", fleet.events),
        ("lives", fleet.lives),
    ):
        written.append(
            atomic_write(
                out / f"{prefix}_{name}.parquet", lambda p, fr=frame: fr.to_parquet(p, index=False)
            )
        )
    written.append(atomic_write_text(out / f"{prefix}_schema.yaml", fleet.schema.to_yaml()))
    written.append(atomic_write_text(out / f"{prefix}_config.yaml", fleet.config.to_yaml()))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apps.maintenance.synthetic",
        description="Write a synthetic run-to-failure fleet.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--config", type=Path, help="FleetConfig YAML (flags below override it)")
    parser.add_argument("--assets", type=int, help="number of assets")
    parser.add_argument("--sensors", type=int, help="number of sensors (8-14 is typical)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--nan-fraction", type=float, help="share of sensor values set to NaN")
    parser.add_argument("--prefix", default="fleet", help="file name prefix (default: fleet)")
    parser.add_argument(
        "--cmapss", action="store_true", help="also write the failed runs in C-MAPSS layout"
    )
    args = parser.parse_args(argv)
    cfg = FleetConfig.from_yaml(args.config) if args.config else FleetConfig()
    overrides = {
        "n_assets": args.assets,
        "n_sensors": args.sensors,
        "seed": args.seed,
        "nan_fraction": args.nan_fraction,
    }
    data = cfg.to_dict() | {k: v for k, v in overrides.items() if v is not None}
    if args.sensors is not None and "n_degrading" not in data:
        data["n_degrading"] = min(cfg.n_degrading, args.sensors)
    data["n_degrading"] = min(data["n_degrading"], data["n_sensors"])
    try:
        cfg = FleetConfig.from_dict(data)
        fleet = generate_fleet(cfg)
        written = write_fleet(fleet, args.out, args.prefix)
        if args.cmapss:
            # C-MAPSS text has no NaN: export the same fleet without the injected gaps (the
            # gaps are drawn last, so every other value is identical)
            clean = (
                fleet if cfg.nan_fraction == 0 else generate_fleet(replace(cfg, nan_fraction=0.0))
            )
            train, test, rul = to_cmapss(clean, seed=cfg.seed)
            written += write_cmapss(args.out / "cmapss", "SYN", train, test, rul)
    except MaintenanceDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    outcomes = fleet.lives["outcome"].value_counts().to_dict()
    print(
        f"{len(fleet.sensors)} readings of {cfg.n_assets} assets, {len(fleet.lives)} runs {outcomes}, "
        f"{len(fleet.events)} events; degrading sensors {list(fleet.degrading_sensors)}"
    )
    for path in written:
        print(f"  {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
