"""``MaintenancePredictor``: a sensor table in, one row per asset out (RUL now, alarm state).

Scoring follows what an operator needs from a fleet snapshot: for each asset, from its
history in the frame, the predicted RUL at its last reading, whether the alarm policy is
firing at that reading, and when it first fired within the given history. Every reading is
checked with the training :class:`SensorSchema` *per asset*: an asset whose readings are
invalid (NaN or text in a sensor, duplicated or unsorted times beyond the configured repair)
gets a row with ``reject_reason`` and null predictions; the other assets are scored. Nothing
is dropped silently. With ``rul_smoothing`` > 1 each reading's RUL is the causal mean of the
last ``rul_smoothing`` window estimates, each moved forward by the time elapsed since
(:func:`causal_smooth_rul`; only readings up to that reading are used).

Give each asset's readings since its last maintenance. The model was trained on runs that start
with reset health. With ``unit_baseline_readings``, the first readings given are taken as the
run's start; with ``age_feature``, the number of readings given is taken as the run's age.

``save`` writes only plain files: ``config.json`` (model hyperparameters, schema, normaliser
statistics, alarm policy, RUL smoothing) and ``weights.pt`` (a ``state_dict``, loaded with
``weights_only=True``). No pickle, so loading a registered model executes no stored code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from apps.maintenance._io import atomic_write_text
from apps.maintenance.alarms import AlarmPolicy
from apps.maintenance.errors import MaintenanceDataError
from apps.maintenance.input_smoothing import causal_smooth_inputs
from apps.maintenance.model import RULEnsemble, RULModel, load_rul_model
from apps.maintenance.preprocess import SensorNormalizer
from apps.maintenance.schema import SensorSchema, validate_sensor_frame
from apps.maintenance.unit_baseline import add_drift_channels, drift_names
from apps.maintenance.windows import build_windows

FORMAT_VERSION = 1


# ------------------------------------------------------------------ causal RUL smoothing
def causal_smooth_rul(
    rul_N: np.ndarray,
    unit_N: np.ndarray,
    elapsed_N: np.ndarray,
    n_last: int,
    cap: float | None = None,
) -> np.ndarray:
    """Causal smoothing of per-reading RUL estimates: at reading i of a unit, the mean over
    its last ``n_last`` readings i-j (as many as exist) of ``rul[i-j] - (t[i] - t[i-j])``.

    Each term is an estimate of the RUL *now* made from an earlier window (its RUL minus the
    time elapsed since), so the mean keeps the estimate unbiased on the degradation slope
    while averaging out window-to-window noise. Only readings at or before i enter: nothing
    from the future. Rows must be sorted by unit then time (as :func:`build_windows` emits);
    ``elapsed_N`` is time in RUL units (cycles, or elapsed hours for timestamps). The result
    is clipped to ``[0, cap]`` (``cap=None``: only at 0). ``n_last=1`` returns ``rul`` as is.
    On the flat capped plateau every term but j=0 is low by its j, so large ``n_last`` pulls
    healthy estimates down by about ``(n_last - 1) / 2``: choose it on validation units.
    """
    rul = np.asarray(rul_N, dtype=np.float64)
    if n_last < 1:
        raise MaintenanceDataError(f"rul_smoothing={n_last}: expected >= 1")
    if n_last == 1 or len(rul) == 0:
        return rul.copy()
    unit = np.asarray(unit_N)
    t = np.asarray(elapsed_N, dtype=np.float64)
    starts = np.r_[True, unit[1:] != unit[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(rul)), 0))  # unit's first row
    total = np.zeros_like(rul)
    count = np.zeros_like(rul)
    for j in range(n_last):
        i = np.arange(j, len(rul))
        ok = i - j >= first[i]  # the earlier reading belongs to the same unit
        i = i[ok]
        total[i] += rul[i - j] - (t[i] - t[i - j])
        count[i] += 1.0
    return np.clip(total / count, 0.0, cap if cap is not None else np.inf)


def elapsed_in(time_N: np.ndarray, time_unit: str) -> np.ndarray:
    """Times as floats in RUL units: numbers (cycles) as given, timestamps as the number of
    ``time_unit`` (``"h"``, ``"D"``, ...) since 1970 (only differences matter)."""
    t = np.asarray(time_N)
    if np.issubdtype(t.dtype, np.datetime64) or isinstance(t.dtype, pd.DatetimeTZDtype):
        ts = pd.to_datetime(pd.Series(t))
        if ts.dt.tz is not None:
            ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
        return ((ts - pd.Timestamp(0)) / pd.Timedelta(1, time_unit)).to_numpy(np.float64)
    if t.dtype == object:
        ts = pd.to_datetime(pd.Series(t), utc=True).dt.tz_localize(None)
        return ((ts - pd.Timestamp(0)) / pd.Timedelta(1, time_unit)).to_numpy(np.float64)
    return t.astype(np.float64)


# ------------------------------------------------------------------ normaliser as plain data
def normalizer_state(norm: SensorNormalizer) -> dict[str, Any]:
    """A fitted :class:`SensorNormalizer` as JSON-able data (no sklearn object, no pickle)."""
    state: dict[str, Any] = {
        "setting_columns": list(norm.setting_columns_),
        "kept_sensors": list(norm.kept_sensors_),
        "dropped_sensors": list(norm.dropped_sensors_),
        "n_conditions": int(norm.n_conditions_),
        "mean": norm.mean_.tolist(),
        "scale": norm.scale_.tolist(),
        "condition_onehot": bool(norm.condition_onehot),
        "method": "single",
    }
    if norm.kmeans_ is not None:
        state |= {
            "method": "kmeans",
            "centers": norm.kmeans_.cluster_centers_.tolist(),
            "setting_center": norm.setting_center_.tolist(),
            "setting_scale": norm.setting_scale_.tolist(),
            "remap": norm.cluster_remap_.tolist(),
        }
    elif norm.condition_table_ is not None:
        state |= {
            "method": "round",
            "table": norm.condition_table_.tolist(),
            "decimals": norm._decimals(len(norm.setting_columns_)),
        }
    return state


def apply_normalizer(
    state: dict[str, Any],
    frame: pd.DataFrame,
    unit_column: str = "unit",
    time_column: str = "time",
) -> pd.DataFrame:
    """Same result as the fitted ``SensorNormalizer.transform`` (nearest KMeans centroid on
    standardised settings, or exact rounded-setting lookup), from :func:`normalizer_state`.

    When ``state["age_feature"]`` is set, an ``age`` column is added: the number of readings of
    the row's unit up to and including it, minus one, divided by ``state["age_scale"]`` (causal
    and observable when scoring: it only counts the readings given so far). When
    ``state["input_smoothing"]`` is set, the normalised kept sensors are then smoothed causally
    within each unit (:func:`causal_smooth_inputs`). With ``state["unit_baseline_readings"]``,
    each kept sensor's drift from the mean of its unit's first readings is added
    (:func:`add_drift_channels`)."""
    n = len(frame)
    if state["method"] == "single":
        cond = np.zeros(n, dtype=np.int64)
    else:
        s = frame[state["setting_columns"]].to_numpy(np.float64)
        if state["method"] == "kmeans":
            z = (s - np.asarray(state["setting_center"])) / np.asarray(state["setting_scale"])
            centers = np.asarray(state["centers"])
            d2 = ((z[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
            cond = np.asarray(state["remap"])[d2.argmin(axis=1)].astype(np.int64)
        else:
            keys = np.stack([np.round(s[:, j], d) for j, d in enumerate(state["decimals"])], axis=1)
            lookup = {tuple(r): i for i, r in enumerate(np.asarray(state["table"]) + 0.0)}
            cond = np.array([lookup.get(tuple(r), -1) for r in keys + 0.0], dtype=np.int64)
            if (cond < 0).any():
                r = int(np.argmax(cond < 0))
                raise MaintenanceDataError(
                    f"row {r}: settings {s[r].tolist()} are an operating condition not seen in training"
                )
    kept = state["kept_sensors"]
    mean, scale = np.asarray(state["mean"]), np.asarray(state["scale"])
    out = frame.drop(columns=[c for c in state["dropped_sensors"] if c in frame]).copy()
    out[kept] = (frame[kept].to_numpy(np.float64) - mean[cond]) / scale[cond]
    if state.get("input_smoothing"):
        out = causal_smooth_inputs(out, kept, state["input_smoothing"], unit_column, time_column)
    if state.get("unit_baseline_readings"):
        out = add_drift_channels(
            out, kept, int(state["unit_baseline_readings"]), unit_column, time_column
        )
    out["condition"] = cond
    if state["condition_onehot"]:
        for c in range(state["n_conditions"]):
            out[f"condition_{c}"] = (cond == c).astype(np.float64)
    if state.get("age_feature"):
        for col in (unit_column, time_column):
            if col not in frame.columns:
                raise MaintenanceDataError(f"age feature: input lacks column {col!r}")
        order = frame.groupby(unit_column, sort=False)[time_column].rank(method="first")
        out["age"] = (order.to_numpy(np.float64) - 1.0) / float(state["age_scale"])
    return out


def feature_names(state: dict[str, Any]) -> list[str]:
    names = list(state["kept_sensors"])
    if state.get("unit_baseline_readings"):
        names += drift_names(state["kept_sensors"])
    if state["condition_onehot"]:
        names += [f"condition_{c}" for c in range(state["n_conditions"])]
    if state.get("age_feature"):
        names.append("age")
    return names


# ------------------------------------------------------------------------------ predictor
class MaintenancePredictor:
    """Per-asset RUL and alarm state from a sensor table (see module docstring).

    ``input_columns``: asset id, time, setting columns, sensor columns (the schema's).
    ``predict(frame)`` -> one row per asset: ``<asset>, rul, alarm, alarm_first_fired,
    last_time, n_readings, p_fail_within_horizon, reject_reason``. ``predict_trajectory``
    gives the same per reading. ``scoring_metadata`` tells batch scoring to keep an asset's
    rows in one chunk.
    """

    def __init__(
        self,
        model: RULModel | RULEnsemble,
        normalizer: dict[str, Any],
        schema: SensorSchema,
        policy: AlarmPolicy,
        time_unit: str = "cycles",
        rul_smoothing: int = 1,
    ) -> None:
        self.model = model.eval()
        self.normalizer = normalizer
        self.schema = schema
        self.policy = policy
        self.time_unit = time_unit
        self.rul_smoothing = int(rul_smoothing)
        self.input_columns = [
            schema.asset_column,
            schema.time_column,
            *schema.setting_columns,
            *schema.sensor_columns,
        ]
        self.scoring_metadata = {"group_column": schema.asset_column}
        self.thresholds = {
            "alarm_rul_threshold": policy.horizon,
            "alarm_consecutive_steps": policy.k,
            "eval_horizon": model.alarm_horizon,
        }

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hp = dict(self.model.hparams)
        config = {
            "format_version": FORMAT_VERSION,
            "model": {
                "backbone_config": hp.pop("backbone_config"),
                "optim_config": hp.pop("optim_config"),
                **hp,
            },
            "normalizer": self.normalizer,
            "schema": self.schema.to_dict(),
            "policy": {"horizon": self.policy.horizon, "k": self.policy.k},
            "time_unit": self.time_unit,
            "rul_smoothing": self.rul_smoothing,
        }
        atomic_write_text(path / "config.json", json.dumps(config, indent=1))
        tmp = path / ".weights.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp)
        tmp.replace(path / "weights.pt")

    @classmethod
    def load(cls, path: str | Path) -> MaintenancePredictor:
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("format_version") != FORMAT_VERSION:
            raise MaintenanceDataError(
                f"{path / 'config.json'}: format_version {cfg.get('format_version')}; expected {FORMAT_VERSION}"
            )
        model = load_rul_model(cfg["model"])
        state = torch.load(path / "weights.pt", weights_only=True, map_location="cpu")
        model.load_state_dict(state)
        return cls(
            model,
            cfg["normalizer"],
            SensorSchema.from_dict(cfg["schema"]),
            AlarmPolicy(float(cfg["policy"]["horizon"]), int(cfg["policy"]["k"])),
            cfg.get("time_unit", "cycles"),
            rul_smoothing=int(cfg.get("rul_smoothing", 1)),
        )

    # ---------------------------------------------------------------- scoring
    def _validate(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[Any, str], list[Any]]:
        """Valid readings (sorted, repaired per schema), reasons per rejected asset, asset order."""
        missing = [c for c in self.input_columns if c not in frame.columns]
        if missing:
            raise MaintenanceDataError(
                f"input lacks column(s) {missing}; expected {self.input_columns}"
            )
        a = self.schema.asset_column
        frame = frame[self.input_columns].reset_index(drop=True)
        reasons: dict[Any, str] = {}
        if frame[a].isna().any():
            r = int(np.argmax(frame[a].isna().to_numpy()))
            raise MaintenanceDataError(f"column {a!r}, row {r}: missing asset id")
        order = list(pd.unique(frame[a]))
        good = []
        for asset, g in frame.groupby(a, sort=False):
            try:
                table = validate_sensor_frame(g, self.schema, source=f"asset {asset!r}")
            except MaintenanceDataError as err:
                reasons[asset] = str(err)
                continue
            if len(table.frame) == 0:
                reasons[asset] = f"asset {asset!r}: no readings left after repairs"
                continue
            good.append(table.frame)
        valid = pd.concat(good, ignore_index=True) if good else frame.iloc[:0]
        return valid, reasons, order

    def _trajectories(self, valid: pd.DataFrame) -> pd.DataFrame:
        s = self.schema
        if len(valid) == 0:
            return pd.DataFrame(columns=[s.asset_column, s.time_column, "rul", "p_fail", "alarm"])
        norm = apply_normalizer(self.normalizer, valid, s.asset_column, s.time_column)
        w = build_windows(
            norm,
            feature_names(self.normalizer),
            self.model.window,
            unit_column=s.asset_column,
            time_column=s.time_column,
            target_column=None,
        )
        rul, prob = self.model.predict_windows(w.x, w.mask)
        rul = causal_smooth_rul(
            rul, w.unit, elapsed_in(w.time, self.time_unit), self.rul_smoothing, self.model.rul_cap
        )
        traj = pd.DataFrame({s.asset_column: w.unit, s.time_column: w.time, "rul": rul})
        traj["p_fail"] = prob
        traj["alarm"] = np.zeros(len(traj), dtype=bool)
        for _, idx in traj.groupby(s.asset_column, sort=False).indices.items():
            traj.loc[traj.index[idx], "alarm"] = self.policy.firing(rul[idx])
        if pd.api.types.is_datetime64_any_dtype(valid[s.time_column]):
            traj[s.time_column] = traj[s.time_column].astype(valid[s.time_column].dtype)
        return traj

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per asset, in the order assets first appear in ``frame``."""
        s = self.schema
        valid, reasons, order = self._validate(frame)
        traj = self._trajectories(valid)
        time_dtype = (
            valid[s.time_column].dtype
            if pd.api.types.is_datetime64_any_dtype(valid[s.time_column])
            else np.dtype("float64")
        )
        rows = {}
        for asset, g in traj.groupby(s.asset_column, sort=False):
            fired = g[s.time_column][g["alarm"].to_numpy()]
            rows[asset] = {
                "rul": float(g["rul"].iloc[-1]),
                "alarm": bool(g["alarm"].iloc[-1]),
                "alarm_first_fired": fired.iloc[0] if len(fired) else None,
                "last_time": g[s.time_column].iloc[-1],
                "n_readings": int(len(g)),
                "p_fail_within_horizon": float(g["p_fail"].iloc[-1]),
            }
        n = len(order)
        out = pd.DataFrame({s.asset_column: pd.Series(order, dtype=frame[s.asset_column].dtype)})
        out["rul"] = [rows[a]["rul"] if a in rows else np.nan for a in order]
        out["alarm"] = pd.array([rows[a]["alarm"] if a in rows else None for a in order], "boolean")
        for col in ("alarm_first_fired", "last_time"):
            vals = [rows[a][col] if a in rows else None for a in order]
            out[col] = pd.Series(
                [np.nan if v is None else v for v in vals] if time_dtype.kind == "f" else vals,
                dtype=time_dtype,
            )
        out["n_readings"] = [rows[a]["n_readings"] if a in rows else 0 for a in order]
        out["p_fail_within_horizon"] = [
            rows[a]["p_fail_within_horizon"] if a in rows else np.nan for a in order
        ]
        out["reject_reason"] = pd.Series([reasons.get(a) for a in order], dtype=object)
        assert len(out) == n
        return out

    def predict_trajectory(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per valid reading (``rul``, ``alarm``, ``p_fail``) plus one row per rejected
        asset carrying its ``reject_reason`` (time and predictions null)."""
        s = self.schema
        valid, reasons, _ = self._validate(frame)
        traj = self._trajectories(valid)
        traj["reject_reason"] = None
        if reasons:
            bad = pd.DataFrame(
                {s.asset_column: list(reasons), "reject_reason": list(reasons.values())}
            )
            traj = pd.concat([traj, bad], ignore_index=True)
        return traj
