"""Fraud benchmark: backbone vs LightGBM on the ULB and handbook protocols, same run.

* ULB (``configs/ulb.yaml``): first 70 % of time trains (its last 20 % validates), last
  30 % tests; PR-AUC, ROC-AUC, recall at precision 0.9.
* Handbook (``configs/handbook.yaml``): 7 train days (last 2 validate) / 7 delay / 7 test
  days from 2018-07-25, known-compromised cards removed; Card Precision@100 per day, AP.

No MLflow (runs on a GPU box without it); polars, lightgbm, lightning, torch needed.
Writes ``bench/results/fraud.json`` via ``bench.common.record`` and prints a table::

    python -m bench.fraud_bench [--only ulb|handbook] [--device cpu|cuda] [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
import time

from apps.fraud.config import load_config
from apps.fraud.training import fit
from bench.common import machine, record

KEYS = {
    "ulb": {
        "pr_auc": "ulb_pr_auc",
        "roc_auc": "ulb_roc_auc",
        "recall_at_precision_0.9": "ulb_recall_at_p90",
        "baseline/pr_auc": "ulb_lightgbm_pr_auc",
        "baseline/roc_auc": "ulb_lightgbm_roc_auc",
        "baseline/recall_at_precision_0.9": "ulb_lightgbm_recall_at_p90",
    },
    "handbook": {
        "card_precision_at_100": "handbook_cp100",
        "pr_auc": "handbook_ap",
        "baseline/card_precision_at_100": "handbook_lightgbm_cp100",
        "baseline/pr_auc": "handbook_lightgbm_ap",
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(KEYS), action="append")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.only or ["ulb", "handbook"]:
        cfg = load_config(name)
        if args.epochs:
            cfg.trainer.max_epochs = args.epochs
        t0 = time.time()
        out = fit(cfg, device=args.device)
        secs = time.time() - t0
        m = out.evaluation.metrics
        cmd = "python -m bench.fraud_bench " + " ".join(argv if argv is not None else sys.argv[1:])
        for metric, key in KEYS[name].items():
            if metric in m:
                record(
                    "fraud",
                    key,
                    float(m[metric]),
                    {"protocol": out.evaluation.protocol, "seconds": round(secs), "command": cmd},
                )
                rows.append((key, m[metric]))
        rows.append((f"{name}_seconds", secs))
    print(f"\nfraud bench on {machine()}")
    for key, value in rows:
        print(f"  {key:32s} {value:10.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
