"""Prequential model selection: choose a recipe on rolling blocks before the test split.

The protocol asks for hyper-parameters chosen on validation data, never on test. On
time-ordered fraud data one validation block is a thin basis: ULB's holds 32 frauds, and
five seeds of three recipes all scored 0.87-0.90 validation AP there while their test AP
ranged from 0.63 to 0.76 (issue #3). So each candidate recipe here runs the whole training
protocol (features fitted on its training rows, best epoch, calibration, threshold, LightGBM)
on ``n_folds`` earlier splits whose assessment blocks tile the time just before the test
split's training ends, and the candidate with the best mean assessment metric wins.

* handbook (``protocol.kind: handbook``): fold ``i`` trains from ``train_start - (delay +
  test) - i * test`` days, the handbook's own prequential scheme (its chapter on model
  selection): fold 0 assesses the test split's training week, fold 1 the week before, and
  so on; delay block and known-compromised removal as in the test protocol.
* ``time_fraction`` (ULB): fold ``i`` trains on the time before ``train_frac - (i + 1) *
  assess_frac`` of the range (its last ``valid_frac`` validates) and assesses the slice up
  to ``train_frac - i * assess_frac``.

Every fold of every candidate uses the candidate's seed, so candidates meet on the same rows.
No fold reads a row of the test split's delay or test period: every fold :func:`fold_configs`
builds ends by the test split's training end (handbook: checked against the first delay day;
``time_fraction``: at or before ``train_frac``), as the tests check on real splits.
Nothing here imports MLflow (``keel fraud select`` logs the result; see ``pipelines.cli``).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Any

import numpy as np

from apps.fraud.config import FraudConfig
from apps.fraud.errors import FraudConfigError, FraudDataError
from core.spec import SelectResult

log = logging.getLogger(__name__)

RANKING_METRICS = ("pr_auc", "roc_auc", "recall_at_precision_0.9", "recall_at_fpr_0.01")


def selection_metrics(cfg: FraudConfig) -> tuple[str, ...]:
    """Metrics a selection may rank by: the ranking metrics (they do not depend on the
    threshold) and, on the handbook protocol, Card Precision@k per day."""
    if cfg.protocol.kind == "handbook":
        return (*RANKING_METRICS, f"card_precision_at_{cfg.protocol.card_precision_k}")
    return RANKING_METRICS


@dataclass(frozen=True)
class Fold:
    """One prequential fold: its config (a shifted protocol) and what it assesses."""

    index: int
    config: FraudConfig
    assesses: str  # human-readable assessment block


def fold_configs(cfg: FraudConfig, n_folds: int = 3, assess_frac: float = 0.1) -> list[Fold]:
    """The ``n_folds`` prequential folds of ``cfg``'s protocol, newest first (module doc).

    handbook: assessment blocks of ``protocol.test_days`` days, the newest ending on the
    test split's first delay day. ``time_fraction``: slices of ``assess_frac`` of the time
    range, the newest ending at ``protocol.train_frac``. Raises ``FraudConfigError`` when a
    fold would have no training time or would reach past the test split's training part.
    """
    if n_folds < 1:
        raise FraudConfigError(f"n_folds must be >= 1, got {n_folds}")
    p = cfg.protocol
    folds = []
    if p.kind == "handbook":
        if isinstance(p.train_start, int):  # a day offset: folds need the calendar date
            raise FraudConfigError(
                "prequential folds need protocol.train_start as a date (ISO string), got "
                f"{p.train_start!r}"
            )
        start = date.fromisoformat(str(p.train_start)[:10])
        limit = start + timedelta(days=p.train_days)  # the test split's first delay day
        for i in range(n_folds):
            s = start - timedelta(days=p.delay_days + p.test_days + i * p.test_days)
            a0 = s + timedelta(days=p.train_days + p.delay_days)
            a1 = a0 + timedelta(days=p.test_days)
            if a1 > limit:  # cannot happen with the arithmetic above; kept as the guarantee
                raise FraudConfigError(f"fold {i} assesses up to {a1}, past {limit}")
            fold_cfg = replace(cfg, protocol=replace(p, train_start=s.isoformat()))
            folds.append(Fold(i, fold_cfg, f"days {a0}..{a1 - timedelta(days=1)}"))
        return folds
    if not 0 < assess_frac < 1:
        raise FraudConfigError(f"assess_frac must be in (0, 1), got {assess_frac}")
    if p.test_end_frac < 1:
        raise FraudConfigError("cfg is already a fold (protocol.test_end_frac < 1)")
    for i in range(n_folds):
        # rounded: 0.7 - 0.1 must read 0.6 in reports, not 0.6000000000000001
        end = round(p.train_frac - i * assess_frac, 6)
        train = round(end - assess_frac, 6)
        if train <= 0.05:
            raise FraudConfigError(
                f"fold {i} would train on the first {max(train, 0):.0%} of the time range only:"
                f" use fewer folds or a smaller assess_frac ({n_folds} x {assess_frac})"
            )
        fold_cfg = replace(cfg, protocol=replace(p, train_frac=train, test_end_frac=end))
        folds.append(Fold(i, fold_cfg, f"time range {train:.0%}..{end:.0%}"))
    return folds


def _fit_fold(payload: dict[str, Any]) -> dict[str, Any]:
    """One (candidate, fold) fit in a worker: plain data in and out (picklable)."""
    import torch

    from apps.fraud.training import fit

    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    cfg = FraudConfig.from_dict(payload["config"])
    t0 = time.perf_counter()
    out = fit(cfg)
    m = out.evaluation.metrics
    split = out.data.split
    keep = {k: float(v) for k, v in m.items() if isinstance(v, int | float)}
    return {
        "candidate": payload["candidate"],
        "fold": payload["fold"],
        "assesses": payload["assesses"],
        "metrics": keep,
        "assess_rows": int(len(split.test)),
        "assess_frauds": int(out.data.y[split.test].sum()),
        "valid_frauds": int(out.data.y[split.valid].sum()),
        "best_epoch": out.extra.get("best_epoch"),
        "best_val_ap": out.extra.get("best_val_ap"),
        "seconds": time.perf_counter() - t0,
    }


def _summary(
    names: Sequence[str], overrides: Mapping[str, Mapping[str, Any]], rows: list[dict], metric: str
) -> list[dict[str, Any]]:
    folds = sorted({r["fold"] for r in rows})
    value = {(r["candidate"], r["fold"]): r["metrics"].get(metric, math.nan) for r in rows}
    bad = [k for k, v in value.items() if not math.isfinite(v)]
    if bad:  # NaN would make the ranking arbitrary; say which fit has no figure
        (n, f) = bad[0]
        raise FraudDataError(
            f"candidate {n!r}, fold {f}: no finite {metric} (does the assessed block hold "
            "frauds?); use other folds"
        )
    best_per_fold = {f: max(value[n, f] for n in names) for f in folds}
    out = []
    for n in names:
        v = [value[n, f] for f in folds]
        out.append(
            {
                "candidate": n,
                "overrides": dict(overrides[n]),
                f"mean_{metric}": float(np.mean(v)),
                f"sd_{metric}": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "per_fold": [float(x) for x in v],
                "folds_won": int(sum(value[n, f] == best_per_fold[f] for f in folds)),
            }
        )
    return out


def select(
    cfg: FraudConfig,
    candidates: Mapping[str, Mapping[str, Any]],
    *,
    n_folds: int = 3,
    metric: str = "pr_auc",
    assess_frac: float = 0.1,
    jobs: int = 1,
    threads: int | None = None,
    baseline_once: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SelectResult:
    """Run every candidate (dotted-key overrides of ``cfg``; ``{}`` is ``cfg`` itself) on
    the prequential folds of ``cfg``'s protocol; the highest mean ``metric`` over folds wins
    (ties: the candidate listed first, so list the shipped recipe first).

    ``baseline_once``: fit LightGBM on each fold with the first candidate only (it does not
    depend on the backbone's recipe; its fold figures show how hard each block is).
    ``jobs > 1`` runs fits in that many spawned processes with ``threads`` torch threads each.
    Returns a :class:`core.spec.SelectResult`: ``summary`` has one dict per candidate (mean
    and sd of ``metric`` over folds, the per-fold values, folds won), ``rows`` one per fit.
    """
    allowed = selection_metrics(cfg)
    if metric not in allowed:
        raise FraudConfigError(f"metric must be one of {allowed} for this protocol, got {metric!r}")
    if not candidates:
        raise FraudConfigError("no candidates to select from")
    say = progress or log.info
    names = list(candidates)
    configs = {}
    for i, n in enumerate(names):
        try:
            c = cfg.with_overrides(candidates[n])
        except (KeyError, TypeError, ValueError) as err:
            raise FraudConfigError(f"candidate {n!r}: {err}") from None
        if baseline_once and i > 0:
            c = replace(c, baseline=replace(c.baseline, enabled=False))
        configs[n] = c
    if jobs > 1 and threads is None:  # spawned workers would each take every core
        threads = max(1, (os.cpu_count() or 1) // jobs)
    payloads = []
    folds_of = {n: fold_configs(configs[n], n_folds, assess_frac) for n in names}
    for n in names:
        for fold in folds_of[n]:
            payloads.append(
                {
                    "candidate": n,
                    "fold": fold.index,
                    "assesses": fold.assesses,
                    "config": fold.config.to_dict(),
                    "threads": threads,
                }
            )
    say(f"prequential selection: {len(names)} candidates x {n_folds} folds = {len(payloads)} fits")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        rows.append(r)
        say(
            f"[{len(rows)}/{len(payloads)}] {r['candidate']} fold {r['fold']} ({r['assesses']}, "
            f"{r['assess_frauds']} frauds): {metric} {r['metrics'].get(metric, math.nan):.4f} "
            f"in {r['seconds']:.0f} s (elapsed {time.perf_counter() - t0:.0f} s)"
        )

    if jobs <= 1:
        for p in payloads:
            done(_fit_fold(p))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            for fut in as_completed([pool.submit(_fit_fold, p) for p in payloads]):
                done(fut.result())
    rows.sort(key=lambda r: (names.index(r["candidate"]), r["fold"]))
    summary = _summary(names, candidates, rows, metric)
    best = max(summary, key=lambda s: (s[f"mean_{metric}"], -names.index(s["candidate"])))
    protocol = (
        f"prequential model selection on {cfg.schema}: {n_folds} folds ("
        + "; ".join(f.assesses for f in folds_of[names[0]])
        + f"), each the full training protocol ({cfg.protocol.kind}) with the fold's own "
        "validation block for best epoch, calibration and threshold; candidates ranked by "
        f"the mean assessment-block {metric} over folds; no row of the test split's delay or "
        "test period is read"
    )
    return SelectResult(
        best=best["candidate"],
        best_config=cfg.with_overrides(candidates[best["candidate"]]),
        metric=metric,
        summary=summary,
        rows=rows,
        protocol=protocol,
    )
