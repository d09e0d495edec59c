"""Stage 2 (false-positive reduction) on top of a trained stage-1 detector, LUNA16 FROC.

    python -m bench.medical_fp_bench --data <npz dir> --model-dir <stage-1 model dir> \\
        --cache <dir> [--fit-scans N] [--out-model <dir>]

Stage 1 is the saved dense heat map (e.g. the one ``bench.medical_bench`` trained on the
H200); this bench adds the stage-2 crop classifier of ``fp_reduction`` and fuses the two
scores (``p1 ** (1 - w) * p2 ** w``), ``w`` chosen on the validation series by CPM. The
data split is the one ``bench.medical_bench`` uses: held-out series by UID
(``data.heldout_fraction``), and within the training series the validation part that chose
the NMS radius (``data.val_fraction``). Stage 2 trains on the first ``--fit-scans`` fitting
series (all by default), never on validation or held-out ones.

Stage-1 candidates are cached per series in ``--cache`` (Parquet; what
:func:`apps.medical.model.stage1_candidates` returns, i.e. ``NoduleDetector.detect`` before
stage 2): stage 1 dominates the cost on a CPU (about 20-50 s per synthetic series on 2
cores), so a re-run only trains and scores stage 2. Also reported: each stage's ROC-AUC for
telling held-out candidates inside a nodule from false positives.
The held-out figures are computed from those cached candidates with the fused probability,
which is what ``NoduleDetector.detect`` computes with stage 2 on (tested in
``tests/apps/medical/test_predictor.py``). Writes ``synthetic_*_two_stage`` keys to
bench/results/medical.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.common import record


def cached_candidates(predictor: Any, scan: Any, cache: Path) -> pd.DataFrame:
    """Stage-1 candidates of ``scan``, from ``cache`` or computed into it."""
    from apps.medical.model import stage1_candidates

    path = cache / f"{scan.seriesuid}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    cands = stage1_candidates(predictor.config, predictor.detector, scan)
    tmp = path.with_suffix(".tmp")
    cands.to_parquet(tmp)
    tmp.replace(path)
    return cands


def separation_auc(
    stage1: list[pd.DataFrame], p2: list[np.ndarray], truth: Any, uids: list[str]
) -> dict[str, float]:
    """ROC-AUC of each stage's score for telling candidates inside a nodule (LUNA16 hit:
    within its radius) from false positives; candidates on excluded findings are left out."""
    from sklearn.metrics import roc_auc_score

    from apps.medical.froc import match_candidates

    sub = truth.subset(uids)
    # match_candidates keeps the row order (it returns the validated frame, reindexed)
    labelled, _ = match_candidates(
        pd.concat(stage1, ignore_index=True), sub.annotations, uids, sub.excluded
    )
    p2_all = np.concatenate(p2) if p2 else np.zeros(0)
    keep = labelled["status"].isin(["tp", "duplicate", "fp"]).to_numpy()
    y = labelled["status"].isin(["tp", "duplicate"]).to_numpy()[keep]
    return {
        "stage1": float(roc_auc_score(y, labelled["probability"].to_numpy()[keep])),
        "stage2": float(roc_auc_score(y, p2_all[keep])),
        "n_candidates": int(keep.sum()),
        "n_inside_nodules": int(y.sum()),
    }


def froc_of(frames: list[pd.DataFrame], truth: Any, uids: list[str]) -> dict[str, Any]:
    from apps.medical.evaluation import froc_metrics
    from apps.medical.froc import evaluate_froc

    sub = truth.subset(uids)
    res = evaluate_froc(pd.concat(frames, ignore_index=True), sub.annotations, uids, sub.excluded)
    m = froc_metrics(res)
    return {
        "cpm": float(m["cpm"]),
        "sensitivity_at_4fp": float(m["sensitivity_at_4fp"]),
        "sensitivity_at_1fp": float(m["sensitivity_at_1fp"]),
        "sensitivity_at_fp": {
            f"{r:g}": float(s) for r, s in zip(res.fp_rates, res.sensitivity_at, strict=True)
        },
        "n_detected_any_threshold": int(res.n_detected),
        "n_nodules": int(res.n_nodules),
    }


def main() -> None:
    from apps.medical.data import load_prepared, read_truth, split_series
    from apps.medical.model import fuse_scores, score_candidates
    from apps.medical.predictor import NoduleDetector
    from apps.medical.training import fit_fp_reduction, split_validation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="npz dataset folder")
    ap.add_argument("--model-dir", type=Path, required=True, help="saved stage-1 detector")
    ap.add_argument("--cache", type=Path, required=True, help="stage-1 candidate cache")
    ap.add_argument("--fit-scans", type=int, default=None, help="stage-2 training series")
    ap.add_argument("--grid", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.0])
    ap.add_argument("--epochs", type=int, default=None, help="stage-2 epochs (config: 20)")
    ap.add_argument("--out-model", type=Path, default=None, help="save the two-stage model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)

    predictor = NoduleDetector.load(args.model_dir)
    cfg = predictor.config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor.detector.to(device)
    fc = cfg.fp_reduction
    fc.score_weight_grid = tuple(args.grid)
    if args.epochs is not None:
        fc.trainer.max_epochs = args.epochs
    fc.trainer.accelerator = "gpu" if device == "cuda" else "cpu"
    truth = read_truth(args.data)
    train, held = split_series(truth.seriesuids, cfg.data.heldout_fraction, cfg.data.split_seed)
    t0 = time.time()
    scans = load_prepared(cfg, args.data, train)
    fit, val = split_validation(scans, cfg.data.val_fraction, cfg.data.split_seed)
    fit = fit[: args.fit_scans] if args.fit_scans else fit
    print(f"[fp] {len(fit)} fitting, {len(val)} validation, {len(held)} held-out series")
    cands = {s.seriesuid: cached_candidates(predictor, s, args.cache) for s in [*val, *fit]}
    print(f"[fp] stage-1 candidates ready at {time.time() - t0:.0f} s", flush=True)
    t1 = time.time()
    fp_model = fit_fp_reduction(
        cfg, predictor.detector, fit, truth, candidates=cands, val_scans=val
    )
    t_fit = time.time() - t1
    weight = float(fc.score_weight)
    print(f"[fp] stage 2 trained in {t_fit:.0f} s; weight chosen on validation: {weight:g}")
    fc.enabled = True
    del scans

    fp_model.to(device)
    stage1, p2s = [], []
    for u in held:
        scan = load_prepared(cfg, args.data, [u])[0]  # as the training series
        c = cached_candidates(predictor, scan, args.cache)
        stage1.append(c)
        p2s.append(
            score_candidates(fp_model, scan.image, c[["z", "y", "x"]].to_numpy(), fc.crop_zyx)
            if len(c)
            else np.zeros(0)
        )
    held = list(held)
    by_weight = {
        f"{w:g}": froc_of(
            [
                c.assign(probability=fuse_scores(c["probability"].to_numpy(), p, w))
                for c, p in zip(stage1, p2s, strict=True)
            ],
            truth,
            held,
        )
        for w in sorted({*args.grid, 0.0, 1.0})
    }
    auc = separation_auc(stage1, p2s, truth, held)
    print(f"[fp] held-out ROC-AUC, inside a nodule vs false positive: {auc}")
    chosen = by_weight[f"{weight:g}"]
    print(f"[fp] held-out, chosen weight {weight:g}: {chosen}")
    print(f"[fp] stage 1 alone: {by_weight['0']}")
    if args.out_model is not None:
        NoduleDetector(cfg, predictor.detector.cpu(), fp_model.cpu()).save(args.out_model)
    details = {
        **chosen,
        "score_weight_chosen_on_validation": weight,
        "heldout_by_weight": by_weight,
        "heldout_candidate_roc_auc": auc,
        "stage1_model": str(args.model_dir),
        "n_fit_series_stage2": len(fit),
        "n_validation_series": len(val),
        "n_heldout_series": len(held),
        "stage2": {
            "crop_zyx": list(fc.crop_zyx),
            "d_model": fc.backbone.d_model,
            "n_layers": fc.backbone.n_layers,
            "epochs": fc.trainer.max_epochs,
            "train_seconds": round(t_fit, 1),
        },
        "device": device,
        "protocol": "LUNA16 FROC (apps/medical/froc.py) on held-out synthetic series",
        "targets": {"sensitivity_at_4fp": 0.94, "cpm": 0.85},
    }
    record("medical", "synthetic_sens_at_4fp_two_stage", chosen["sensitivity_at_4fp"], details)
    record(
        "medical",
        "synthetic_cpm_two_stage",
        chosen["cpm"],
        {"see": "synthetic_sens_at_4fp_two_stage"},
    )


if __name__ == "__main__":
    main()
