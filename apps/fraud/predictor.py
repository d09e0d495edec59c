"""``FraudPredictor``: raw transactions in, calibrated score + decision + reasons out.

Input: the schema's raw transaction columns (:attr:`FraudPredictor.input_columns`: id,
time, card, terminal, amount, the schema's categorical and numeric columns), never
features and never the label. Output, one row per input row, same order:
``<id column>`` (if the schema has one), ``score`` (calibrated fraud probability),
``decision`` (``score >= thresholds["alert"]``), ``reasons`` (for alerts: the top
contributing features, ``name=+contribution`` to the logit, see ``model.py``) and
``reject_reason`` (``None`` for valid rows). Invalid rows (missing/NaN/negative amount,
missing or unparseable time, missing card or terminal id) are kept, with a reason and a
null score; they never change the features of the valid rows.

How a new file is scored: features are causal per-card / per-terminal aggregates and the
card-history tokens need the card's earlier transactions. They are computed over the
rows handed to :meth:`predict` in time order (ties: input order), after the optional
history frame (``history_path`` in the config, or :meth:`set_history`): transactions
strictly before the file's first one, e.g. the last 30 days of the production stream
(labels there, if present, feed the delayed terminal risk features; never the label of a
scored row). Without history, aggregates count only the file's own rows, so scores of a
card's first rows in the file are those of a card with no past. Results are
deterministic for the same input and history. Batch scoring keeps a card's rows in one
chunk (``scoring_metadata["group_column"]``; sort the input by card, then time).

The scorer is either the backbone (``model``) or a distilled MLP student (``student``,
:class:`apps.fraud.fastscore.StudentMLP`, made by ``keel fraud distill`` with
``student.kind: mlp``). A student reads the scaled numeric features only; its calibration,
threshold and reasons (gradient x input on those features) are its own, and a predictor
holding one carries no backbone.

Saved as plain files only: ``predictor.json`` (model hyper-parameters, thresholds,
calibration, options), ``inputs.json`` (schema, feature config, vocabularies, scaling)
and ``weights.pt`` (the backbone's ``state_dict``) or ``student.pt`` (the student's), both
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import torch

from apps.fraud.calibration import apply_calibration
from apps.fraud.errors import FraudDataError
from apps.fraud.fastscore import StudentMLP
from apps.fraud.inputs import InputBuilder, canonical_frame
from apps.fraud.model import FraudEnsemble, FraudModel, fraud_model_from_hparams, predict_logits
from apps.fraud.schema import TIME_UNITS, TS, FraudSchema

_NEW = "__new_row"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def raw_input_columns(schema: FraudSchema) -> list[str]:
    cols = [schema.id_column, schema.time_column, schema.card_column, schema.terminal_column]
    cols.append(schema.amount_column)
    cols += list(schema.categorical_columns) + list(schema.numeric_columns)
    return [c for c in cols if c is not None]


def parse_times(values: pd.Series, schema: FraudSchema) -> pd.Series:
    """Event times as naive UTC ``datetime64[us]``; NaT where missing or unparseable."""
    if schema.time_kind == "offset":
        num = pd.to_numeric(values, errors="coerce").astype("float64")
        num[~np.isfinite(num)] = np.nan
        origin = pd.Timestamp(schema.time_origin) if schema.time_origin else pd.Timestamp(0)
        us = (num * TIME_UNITS[schema.time_unit] * 1e6).round()
        out = origin + pd.to_timedelta(us, unit="us")
        return out.astype("datetime64[us]")
    if pd.api.types.is_datetime64_any_dtype(values):
        ts = values
    else:
        text = values.astype("string").str.strip()
        ts = pd.to_datetime(text, format=schema.time_format, errors="coerce", utc=True)
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    return ts.astype("datetime64[us]")


def validate_rows(frame: pd.DataFrame, schema: FraudSchema) -> tuple[pd.Series, pd.Series]:
    """``(reject_reason per row (None = valid), parsed times)``; nothing is dropped."""
    reasons = pd.Series([None] * len(frame), index=frame.index, dtype=object)

    def flag(mask: pd.Series, text: str) -> None:
        reasons[mask.to_numpy() & reasons.isna().to_numpy()] = text

    ts = parse_times(frame[schema.time_column], schema)
    raw_time = frame[schema.time_column]
    flag(raw_time.isna(), f"{schema.time_column}: missing time")
    flag(ts.isna(), f"{schema.time_column}: unparseable time")
    amount = pd.to_numeric(frame[schema.amount_column], errors="coerce").astype("float64")
    flag(~np.isfinite(amount), f"{schema.amount_column}: missing, NaN or non-numeric amount")
    if not schema.allow_negative_amount:
        flag(amount < 0, f"{schema.amount_column}: negative amount")
    for col, role in ((schema.card_column, "card"), (schema.terminal_column, "terminal")):
        if col:
            flag(frame[col].isna(), f"{col}: missing {role} id")
    return reasons, ts


def _id_text(v: Any) -> str | None:
    """Ids and categories as text; a float id ``123.0`` (an id column read with missing
    values) is the same card as the integer ``123``."""
    if pd.isna(v):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


class FraudPredictor:
    """See the module docstring. Build with :func:`apps.fraud.spec.train` or :meth:`load`."""

    def __init__(
        self,
        model: FraudModel | FraudEnsemble | None,
        inputs: InputBuilder,
        calibration: dict[str, Any],
        thresholds: dict[str, float],
        options: dict[str, Any] | None = None,
        student: StudentMLP | None = None,
    ) -> None:
        if (model is None) == (student is None):
            raise FraudDataError(
                "a FraudPredictor scores with exactly one of: a backbone or a student"
            )
        self.model = model.cpu().eval() if model is not None else None
        self.student = student.cpu().eval() if student is not None else None
        self.inputs = inputs
        self.calibration = calibration
        self.thresholds = dict(thresholds)
        self.options = {"n_reasons": 3, "history_path": None, "batch_size": 2048, **(options or {})}
        self._history: pl.DataFrame | None = None
        self._history_loaded = False

    # ------------------------------------------------------------------ metadata
    @property
    def schema(self) -> FraudSchema:
        return self.inputs.schema

    @property
    def input_columns(self) -> list[str]:
        return raw_input_columns(self.schema)

    @property
    def scoring_metadata(self) -> dict[str, str]:
        card = self.schema.card_column
        return {"group_column": card} if card and self.inputs.history_len else {}

    @property
    def threshold(self) -> float:
        return float(self.thresholds["alert"])

    # ------------------------------------------------------------------ history
    def set_history(self, history: pl.DataFrame | pd.DataFrame | None) -> FraudPredictor:
        """Earlier transactions (raw columns, optionally the label) prepended when scoring."""
        if history is None:
            self._history = None
        else:
            hist_pd = history.to_pandas() if isinstance(history, pl.DataFrame) else history
            self._history = self._valid_polars(hist_pd, keep_label=True)[0]
        self._history_loaded = True
        return self

    def _history_frame(self) -> pl.DataFrame | None:
        if not self._history_loaded:
            path = self.options.get("history_path")
            if path:
                from apps.fraud.readers import load_transactions

                hist = load_transactions(path, self.schema, require_label=False)
                self._history = canonical_frame(
                    hist.select(
                        [
                            c
                            for c in hist.columns
                            if c in {*self.input_columns, TS, self.schema.label_column}
                            and c != self.schema.time_column
                        ]
                    ),
                    self.schema,
                )
            self._history_loaded = True
        return self._history

    # ------------------------------------------------------------------ scoring
    def _valid_polars(
        self, frame: pd.DataFrame, keep_label: bool = False
    ) -> tuple[pl.DataFrame, pd.Series]:
        missing = [c for c in self.input_columns if c not in frame.columns]
        if missing:
            raise FraudDataError(
                f"input lacks columns {missing} of schema {self.schema.name!r}; expected the raw "
                f"transaction columns {self.input_columns}"
            )
        reasons, ts = validate_rows(frame, self.schema)
        ok = reasons.isna().to_numpy()
        cols = [c for c in self.input_columns if c != self.schema.time_column]
        label = self.schema.label_column
        if keep_label and label in frame.columns:
            cols.append(label)
        good = frame.loc[ok, cols].copy()
        good[self.schema.amount_column] = pd.to_numeric(
            good[self.schema.amount_column], errors="coerce"
        )
        for col in self.schema.numeric_columns:
            good[col] = pd.to_numeric(good[col], errors="coerce")
        for col in self.schema.categorical_columns + tuple(
            c for c in (self.schema.card_column, self.schema.terminal_column) if c
        ):
            good[col] = good[col].map(_id_text).astype(object)
        good[TS] = ts[ok].to_numpy()
        pl_frame = pl.from_pandas(good.reset_index(drop=True))
        return canonical_frame(pl_frame, self.schema), reasons

    def score_inputs(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, calibrated scores)`` of prepared model inputs."""
        if self.student is not None:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(arrays["x_num"], np.float32))
                logits = self.student(x).double().numpy()
        else:
            logits = predict_logits(self.model, arrays, self.options["batch_size"])
        return logits, apply_calibration(logits, self.calibration)

    def _student_contributions(self, x_num: np.ndarray) -> np.ndarray:
        """Gradient x input of the student's logit per numeric feature: the first-order
        share of each feature, measured from the training mean (the scaled features are
        0 there), so a typical value contributes about nothing."""
        x = torch.from_numpy(np.ascontiguousarray(x_num, np.float32)).requires_grad_(True)
        with torch.enable_grad():
            self.student(x).sum().backward()
        return (x.grad * x).detach().numpy()

    def _contributions(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Per-row contributions to the logit, one column per :meth:`_reason_names` entry."""
        if self.student is not None:
            return self._student_contributions(arrays["x_num"])
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return self.model.attributions(batch)[1].numpy()

    def _reason_names(self) -> list[str]:
        """What the scorer reads: a student the numeric features; the backbone every
        feature token, plus the card's history sequence when it has one."""
        if self.student is not None:
            return list(self.inputs.feature_columns.numeric)
        history = ["card_history"] if self.model.history_len else []
        return self.inputs.feature_columns.all + history

    def explain_inputs(self, arrays: dict[str, np.ndarray], top: int | None = None) -> list[str]:
        """``"feat=+0.21; feat2=-0.05"`` per row: the ``top`` largest |contributions|."""
        top = top or int(self.options["n_reasons"])
        names = self._reason_names()
        out: list[str] = []
        bs = 512
        for s in range(0, len(arrays["x_num"]), bs):
            c = self._contributions({k: v[s : s + bs] for k, v in arrays.items()})
            for row in c:
                idx = np.argsort(-np.abs(row), kind="stable")[:top]
                out.append("; ".join(f"{names[i]}={row[i]:+.2f}" for i in idx))
        return out

    def predict(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> pd.DataFrame:
        """Score raw transactions (see the module docstring); ``history`` overrides the
        configured history for this call."""
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        good, reasons = self._valid_polars(frame)
        n = len(frame)
        score = np.full(n, np.nan)
        decision = np.zeros(n, dtype=bool)
        expl = np.full(n, None, dtype=object)
        ok = np.flatnonzero(reasons.isna().to_numpy())
        if len(ok):
            hist = (
                self._valid_polars(history, keep_label=True)[0]
                if history is not None
                else self._history_frame()
            )
            new = good.with_columns(pl.lit(True).alias(_NEW))
            if hist is not None and hist.height:
                first = new.get_column(TS).min()
                hist = hist.filter(pl.col(TS) < first).with_columns(pl.lit(False).alias(_NEW))
                cols = [c for c in new.columns if c in hist.columns]
                label = self.schema.label_column
                if label in hist.columns:
                    cols.append(label)
                    new = new.with_columns(pl.lit(None, dtype=hist.schema[label]).alias(label))
                both = pl.concat([hist.select(cols), new.select(cols)], how="vertical_relaxed")
            else:
                both = new
            inputs = self.inputs.transform(both.drop(_NEW) if _NEW in both.columns else both)
            rows = (
                np.flatnonzero(both.get_column(_NEW).to_numpy())
                if _NEW in both.columns
                else np.arange(both.height)
            )
            arrays = inputs.take(rows)
            _, s = self.score_inputs(arrays)
            score[ok] = s
            decision[ok] = s >= self.threshold
            alert = np.flatnonzero(s >= self.threshold)
            if len(alert):
                sub = {k: v[alert] for k, v in arrays.items()}
                expl[ok[alert]] = self.explain_inputs(sub)
        out = {}
        if self.schema.id_column:
            out[self.schema.id_column] = frame[self.schema.id_column].to_numpy()
        out.update(
            score=score,
            decision=decision,
        )
        result = pd.DataFrame(out, index=frame.index)
        # object columns with None (not a string dtype with NaN): None = valid / no alert
        result["reasons"] = pd.Series(list(expl), index=frame.index, dtype=object)
        rejects = [r if isinstance(r, str) else None for r in reasons.tolist()]
        result["reject_reason"] = pd.Series(rejects, index=frame.index, dtype=object)
        return result

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        student = self.student
        config = {
            "format_version": 1,
            "model": dict(self.model.hparams) if self.model is not None else None,
            "student": (
                {"n_features": student.n_features, "hidden": list(student.hidden)}
                if student is not None
                else None
            ),
            "calibration": self.calibration,
            "thresholds": self.thresholds,
            "options": self.options,
        }
        # weights first, the json that names them last: a first save cut short leaves no
        # predictor.json, so no half-written folder loads as a predictor
        weights = student if student is not None else self.model
        name = "student.pt" if student is not None else "weights.pt"
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".weights.", suffix=".tmp")
        os.close(fd)
        torch.save(weights.state_dict(), tmp)
        os.replace(tmp, path / name)
        _atomic_write_text(path / "inputs.json", json.dumps(self.inputs.state_dict(), indent=1))
        _atomic_write_text(path / "predictor.json", json.dumps(config, indent=1, default=float))

    @classmethod
    def load(cls, path: Path) -> FraudPredictor:
        path = Path(path)
        for name in ("predictor.json", "inputs.json"):
            if not (path / name).exists():
                raise FraudDataError(f"{path}: not a saved FraudPredictor (missing {name})")
        config = json.loads((path / "predictor.json").read_text())
        spec = config.get("student")
        weights = path / ("student.pt" if spec else "weights.pt")
        if not weights.exists():
            raise FraudDataError(f"{path}: not a saved FraudPredictor (missing {weights.name})")
        state = torch.load(weights, weights_only=True, map_location="cpu")
        model, student = None, None
        if spec:
            student = StudentMLP(int(spec["n_features"]), [int(h) for h in spec["hidden"]])
            student.load_state_dict(state)
        else:
            model = fraud_model_from_hparams(config["model"])
            model.load_state_dict(state)
        inputs = InputBuilder.from_state(json.loads((path / "inputs.json").read_text()))
        return cls(
            model,
            inputs,
            config["calibration"],
            config["thresholds"],
            config["options"],
            student=student,
        )
