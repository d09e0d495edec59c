"""Fraud: what LightGBM adds beside the backbone, as a blend or as a teacher (issue #3).

The backbone trails LightGBM on both real sets (BENCHMARKS.md). This bench asks whether
the two together do better than LightGBM alone, in three ways, each on the headline
protocol's own split and models (one ``apps.fraud.training.fit`` per protocol):

* **blend**: ``w * backbone + (1 - w) * LightGBM`` on logits, either raw or each
  standardised by its validation-block mean and sd. The rule, fixed before any run:
  ``w`` on a grid of 0.1 steps is chosen by validation AP (ties: the smaller ``w``), and
  the test block is scored at that ``w`` only. The whole grid is recorded as a diagnostic.
* **LightGBM as the MLP student's teacher** (``--only ulb``; on the handbook set the MLP
  cannot read the card history, BENCHMARKS.md issue #3): the deployable CPU scorer
  (``apps.fraud.fastscore.distill_student``, the recipe of ``configs/mlp_distill.yaml``)
  fitted to LightGBM's cross-fitted margins on every training row, beside the same student
  fitted to the backbone's logits. Cross-fitted: each of ``--folds`` contiguous time
  chunks of the training block is scored by a LightGBM trained on the other chunks, with
  the baseline's early-stopped tree count, so no row's target comes from a model that saw
  its label (a boosted model's margins on its own training rows are over-confident).
* **LightGBM as the backbone's teacher** (``--only ulb``): the shipped backbone recipe
  trained on the same cross-fitted margins as stored soft labels (MSE on the logit,
  alpha 1; core.distill), on the shipped recipe's sub-sampled training rows.

No test row is fitted by anything: cross-fitting stays inside the training block, the
blend weight comes from the validation block (or the prequential folds, below) and every
best epoch from the validation block::

    python -m bench.fraud_teachers [--only ulb handbook] [--student-seeds 0 1 2]
                                   [--folds 5] [--threads 2] [--seed 0]
                                   [--prequential-folds 3] [--blend-only]

``--prequential-folds N`` also chooses the blend weight the way the protocol chooses
recipes (``apps.fraud.selection``): by mean AP over N earlier folds' assessment blocks. The
validation block is biased towards the backbone there, since it chose the backbone's
best epoch.

Records ``<protocol>_*_blend*`` (``*_blend_prequential`` with ``--prequential-folds``) and
``ulb_ap_*_lightgbm_teacher`` in
``bench/results/fraud.json`` (``bench.common.record``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bench.common import machine, record

BLEND_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def standardised(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``values`` in units of ``reference``'s sd from its mean (the validation block's)."""
    sd = float(np.std(reference))
    return (values - float(np.mean(reference))) / (sd if sd > 0 else 1.0)


def blend(nn: np.ndarray, gb: np.ndarray, w: float) -> np.ndarray:
    return w * np.asarray(nn, np.float64) + (1.0 - w) * np.asarray(gb, np.float64)


def choose_blend_weight(
    y_valid: np.ndarray,
    nn_valid: np.ndarray,
    gb_valid: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    grid: Sequence[float] = BLEND_GRID,
) -> tuple[float, dict[float, float]]:
    """The grid weight with the best validation ``metric`` (ties: the smaller weight, i.e.
    closer to LightGBM alone) and the validation metric at every weight."""
    per_w = {float(w): float(metric(y_valid, blend(nn_valid, gb_valid, w))) for w in grid}
    best = max(per_w.values())
    return min(w for w, v in per_w.items() if v == best), per_w


def cross_fitted_margins(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray], n_rows: int, folds: int
) -> np.ndarray:
    """Out-of-fold predictions over ``n_rows`` rows in time order: ``folds`` contiguous
    chunks, each predicted by ``fit_predict(train_positions, predict_positions)``, which
    must fit on the first and return predictions for the second."""
    if not 2 <= folds <= n_rows:
        raise ValueError(f"folds={folds}: expected 2 <= folds <= {n_rows} rows")
    out = np.empty(n_rows, np.float64)
    positions = np.arange(n_rows)
    for chunk in np.array_split(positions, folds):
        rest = np.setdiff1d(positions, chunk)
        out[chunk] = fit_predict(rest, chunk)
    return out


def _ranking(y: np.ndarray, s: np.ndarray, data: Any, rows: np.ndarray, k: int):
    from apps.fraud.metrics import average_precision, card_precision_at_k, recall_at_precision

    m = {"pr_auc": average_precision(y, s), "recall_at_precision_0.9": recall_at_precision(y, s)}
    if data.cards is not None:  # card ids: Card Precision@k (handbook protocol)
        m["card_precision_at_100"] = card_precision_at_k(s, y, data.cards[rows], data.days[rows], k)
    return {key: round(float(v), 4) for key, v in m.items()}


def model_logits(out: Any, x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(backbone logits, LightGBM margins)`` of a fit's ``rows``; ``x``: the fit's LightGBM
    feature matrix (``apps.fraud.baseline.stack_features``, built once by the caller).
    Margins are log-odds: LightGBM's ``decision_function`` is ``P(fraud)``, which squashes
    the top of the ranking."""
    from apps.fraud.model import predict_logits

    return predict_logits(out.predictor.model, out.inputs.take(rows)), out.baseline.margin(x[rows])


def prequential_blend_weight(cfg: Any, n_folds: int) -> tuple[float, dict[str, Any]]:
    """The blend weight chosen on the protocol's prequential folds
    (``apps.fraud.selection.fold_configs``: whole-protocol fits on earlier splits, never
    the test split): the grid weight with the best mean AP over the folds' assessment
    blocks (ties: the smaller weight). Unlike the validation block, an assessment block
    chose neither model's best epoch, so it does not favour the backbone."""
    from apps.fraud.baseline import stack_features
    from apps.fraud.metrics import average_precision
    from apps.fraud.selection import fold_configs
    from apps.fraud.training import fit

    folds = []
    for fold in fold_configs(cfg, n_folds):
        t0 = time.time()
        out = fit(fold.config)
        rows = out.data.split.test
        x, _ = stack_features(out.inputs.x_raw, out.inputs.x_cat)
        nn, gb = model_logits(out, x, rows)
        y = out.data.y[rows]
        _, per_w = choose_blend_weight(y, nn, gb, average_precision)
        folds.append(
            {
                "assesses": fold.assesses,
                "frauds": int(y.sum()),
                "ap_by_w": {f"{w:.1f}": round(v, 4) for w, v in per_w.items()},
                "seconds": round(time.time() - t0),
            }
        )
        print(f"[fold {fold.index}] {fold.assesses}: {folds[-1]['ap_by_w']}", flush=True)
    w, mean = weight_from_folds([f["ap_by_w"] for f in folds])
    return w, {"folds": folds, "mean_ap_by_w": {f"{g:.1f}": round(v, 4) for g, v in mean.items()}}


def weight_from_folds(per_fold: Sequence[dict[str, float]]) -> tuple[float, dict[float, float]]:
    """The grid weight with the best mean metric over folds (each fold: ``"0.3" -> metric``
    for every grid weight; ties: the smaller weight) and the mean at every weight."""
    if not per_fold:
        raise ValueError("no folds to choose a blend weight on")
    mean = {w: float(np.mean([f[f"{w:.1f}"] for f in per_fold])) for w in BLEND_GRID}
    best = max(mean.values())
    return min(g for g, v in mean.items() if v == best), mean


def run_protocol(name: str, args: argparse.Namespace) -> None:
    from apps.fraud.baseline import stack_features
    from apps.fraud.config import load_config
    from apps.fraud.metrics import average_precision
    from apps.fraud.training import fit

    cfg = dataclasses.replace(load_config(name), seed=args.seed)
    t0 = time.time()
    out = fit(cfg)
    data, mi, split = out.data, out.inputs, out.data.split
    x, cat = stack_features(mi.x_raw, mi.x_cat)
    k = cfg.protocol.card_precision_k
    logits = {
        blk: model_logits(out, x, rows)
        for blk, rows in (("valid", split.valid), ("test", split.test))
    }
    y_va, y_te = data.y[split.valid], data.y[split.test]
    alone = {
        "backbone": _ranking(y_te, logits["test"][0], data, split.test, k),
        "lightgbm": _ranking(y_te, logits["test"][1], data, split.test, k),
    }
    print(f"[{name}] fit {time.time() - t0:.0f} s; test alone {alone}", flush=True)
    key = name
    for space in ("logit", "standardised"):
        nn_va, gb_va = logits["valid"]
        nn_te, gb_te = logits["test"]
        if space == "standardised":
            nn_va, nn_te = (
                standardised(nn_va, logits["valid"][0]),
                standardised(nn_te, logits["valid"][0]),
            )
            gb_va, gb_te = (
                standardised(gb_va, logits["valid"][1]),
                standardised(gb_te, logits["valid"][1]),
            )
        w, val_by_w = choose_blend_weight(y_va, nn_va, gb_va, average_precision)
        grid = {
            f"{g:.1f}": {
                "valid_ap": round(val_by_w[g], 4),
                **{
                    f"test_{m}": v
                    for m, v in _ranking(y_te, blend(nn_te, gb_te, g), data, split.test, k).items()
                },
            }
            for g in BLEND_GRID
        }
        chosen = grid[f"{w:.1f}"]
        details = {
            "protocol": out.evaluation.protocol,
            "rule": "w (backbone weight) by validation AP on a 0.1 grid, ties to the smaller w;"
            " test scored at that w",
            "space": space,
            "chosen_w": w,
            "chosen": chosen,
            "alone": alone,
            "grid": grid,
            "seed": args.seed,
            "machine": machine(),
        }
        suffix = "" if space == "logit" else "_standardised"
        record("fraud", f"{key}_ap_blend{suffix}", chosen["test_pr_auc"], details)
        if data.cards is not None:
            record(
                "fraud", f"{key}_cp100_blend{suffix}", chosen["test_card_precision_at_100"], details
            )
    if args.prequential_folds:
        w, folds = prequential_blend_weight(cfg, args.prequential_folds)
        nn_te, gb_te = logits["test"]
        chosen = _ranking(y_te, blend(nn_te, gb_te, w), data, split.test, k)
        details = {
            "protocol": out.evaluation.protocol,
            "rule": f"w (backbone weight, logit blend) by mean AP over {args.prequential_folds}"
            " prequential folds' assessment blocks (apps.fraud.selection.fold_configs), 0.1"
            " grid, ties to the smaller w; test scored at that w",
            "chosen_w": w,
            "chosen": chosen,
            "alone": alone,
            "prequential": folds,
            "seed": args.seed,
        }
        record("fraud", f"{key}_ap_blend_prequential", chosen["pr_auc"], details)
    if name == "ulb" and not args.blend_only:
        run_lightgbm_teachers(cfg, out, x, cat, alone, args)


def run_lightgbm_teachers(
    cfg: Any, out: Any, x: np.ndarray, cat: list[int], alone: dict, args: argparse.Namespace
) -> None:
    from apps.fraud.config import config_path
    from apps.fraud.distillation import build_student
    from apps.fraud.fastscore import distill_student, student_distill_config, student_logits
    from apps.fraud.model import loader, predict_logits
    from apps.fraud.training import KeepBestWeights, baseline_estimator, training_rows
    from core.distill import DistillConfig, distill_fit
    from core.engine import seed_everything

    data, mi, split = out.data, out.inputs, out.data.split
    tr, va, te = split.train, split.valid, split.test
    n_trees = out.baseline.best_iteration_
    t0 = time.time()

    def fit_predict(fit_pos: np.ndarray, pred_pos: np.ndarray) -> np.ndarray:
        est = baseline_estimator(cfg, n_trees).fit(
            x[tr[fit_pos]], data.y[tr[fit_pos]], categorical_feature=cat
        )
        return est.margin(x[tr[pred_pos]])

    margins = np.zeros(len(data.y), np.float32)
    margins[tr] = cross_fitted_margins(fit_predict, len(tr), args.folds)
    margins[va] = out.baseline.margin(x[va])  # validation: the baseline itself
    oof_secs = round(time.time() - t0)
    k = cfg.protocol.card_precision_k
    teachers = {
        "backbone": predict_logits(out.predictor.model, mi.take(tr)),
        "lightgbm": margins[tr],
    }
    dcfg = student_distill_config(DistillConfig.from_yaml(config_path("mlp_distill")))
    sc = cfg.student
    students: dict[str, list[dict[str, float]]] = {t: [] for t in teachers}
    for teacher, target in teachers.items():
        for seed in args.student_seeds:
            st = distill_student(
                mi.x_num[tr],
                target,
                hidden=sc.hidden,
                epochs=sc.epochs,
                batch_size=sc.batch_size,
                lr=sc.lr,
                seed=seed,
                cfg=dcfg,
            )
            m = _ranking(data.y[te], student_logits(st, mi.x_num[te]), data, te, k)
            m["valid_ap"] = _ranking(data.y[va], student_logits(st, mi.x_num[va]), data, va, k)[
                "pr_auc"
            ]
            students[teacher].append(m)
            print(f"[ulb] MLP student of the {teacher}, seed {seed}: {m}", flush=True)
    summary = {
        t: {
            "test_pr_auc_mean": round(float(np.mean([r["pr_auc"] for r in rows])), 4),
            "test_pr_auc_sd": round(float(np.std([r["pr_auc"] for r in rows], ddof=1)), 4)
            if len(rows) > 1
            else 0.0,
            "test_recall_at_p90_mean": round(
                float(np.mean([r["recall_at_precision_0.9"] for r in rows])), 4
            ),
            "valid_ap_mean": round(float(np.mean([r["valid_ap"] for r in rows])), 4),
            "per_seed": rows,
        }
        for t, rows in students.items()
    }
    details = {
        "protocol": out.evaluation.protocol,
        "teacher": f"LightGBM margins cross-fitted over {args.folds} contiguous time chunks of"
        f" the training block ({n_trees} trees, the baseline's early-stopped count;"
        f" {oof_secs} s)",
        "student": {"hidden": list(sc.hidden), "epochs": sc.epochs, "distill": dcfg.to_dict()},
        "student_seeds": list(args.student_seeds),
        "students": summary,
        "alone": alone,
        "seed": args.seed,
    }
    record(
        "fraud",
        "ulb_ap_mlp_student_lightgbm_teacher",
        summary["lightgbm"]["test_pr_auc_mean"],
        details,
    )

    # The backbone itself on the same margins (stored soft labels; core.distill).
    seed_everything(cfg.seed)
    rows, _ = training_rows(data, cfg)
    bcfg = DistillConfig(alpha=1.0, kind="regression")
    train = {**mi.take(rows), "y": data.y[rows], bcfg.soft_label_key: margins[rows]}
    valid = {**mi.take(va), "y": data.y[va], bcfg.soft_label_key: margins[va]}
    student = build_student(cfg, out.predictor, 1.0, train)
    keep = KeepBestWeights(cfg.head.select_best or "val/ap")
    student = distill_fit(
        student,
        None,
        loader(train, cfg.head.batch_size, shuffle=True, seed=cfg.seed),
        loader(valid, max(cfg.head.batch_size, 1024), shuffle=False),
        dataclasses.replace(cfg.trainer, seed=cfg.seed),
        bcfg,
        False,
        extra_callbacks=[keep],
    )
    m = _ranking(data.y[te], predict_logits(student, mi.take(te)), data, te, k)
    details = {
        "protocol": out.evaluation.protocol,
        "teacher": details["teacher"],
        "recipe": "ulb.yaml's backbone, its sub-sampled training rows, MSE on the logit, alpha 1;"
        " best epoch by validation AP",
        "best_epoch": keep.best_epoch,
        "best_val_ap": keep.best,
        "test": m,
        "alone": alone,
        "seed": cfg.seed,
    }
    record("fraud", "ulb_ap_backbone_lightgbm_teacher", m["pr_auc"], details)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=["ulb", "handbook"], default=["ulb", "handbook"])
    ap.add_argument("--student-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the protocol fit's seed")
    ap.add_argument(
        "--prequential-folds",
        type=int,
        default=0,
        help="also choose the blend weight on this many prequential folds (records"
        " <protocol>_ap_blend_prequential)",
    )
    ap.add_argument(
        "--blend-only", action="store_true", help="skip the LightGBM-teacher students (ulb)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.only:
        run_protocol(name, args)


if __name__ == "__main__":
    main()
