"""C-MAPSS benchmark of the maintenance app (no MLflow, no polars needed).

Per subset and seed: train on the training units (a seeded 20% of units held out: half choose
the alarm policy, half measure lead time), then the official test protocol, one prediction
per test unit at its last cycle: RMSE and PHM08 with the truth capped at 125 (and uncapped).
Lead time on FD001's held-out *training* units (full run-to-failure, never trained on), at
horizon 30 cycles. Results go to ``bench/results/maintenance.json`` via ``bench.common.record``.

    python -m bench.maintenance_bench --device cuda --subsets FD001 FD002 FD003 FD004 \
        --seeds 0 1 2 3 4 --data-dir /path/to/cmapss
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from apps.maintenance.config import load_config
from apps.maintenance.training import evaluate_prepared, fit
from bench.common import machine, record

TARGETS = {"FD001": 11.0, "FD002": 13.5, "FD003": 11.0, "FD004": 15.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--subsets", nargs="+", default=["FD001", "FD002", "FD003", "FD004"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    ap.add_argument("--data-dir", default=None, help="folder with the C-MAPSS *.txt.gz files")
    ap.add_argument("--precision", default=None, help="e.g. bf16-mixed on GPU")
    ap.add_argument("--no-record", action="store_true", help="print only")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cmd = "python -m bench.maintenance_bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    summary: dict[str, float] = {}
    for subset in args.subsets:
        rmses, phms, rmse_unc = [], [], []
        lead = None
        for seed in args.seeds:
            cfg = load_config(subset.lower())
            cfg.seed = seed
            cfg.trainer.seed = seed
            cfg.trainer.accelerator = "gpu" if args.device == "cuda" else "cpu"
            cfg.trainer.devices = 1
            if args.epochs is not None:
                cfg.trainer.max_epochs = args.epochs
            if args.precision:
                cfg.trainer.precision = args.precision
            if args.data_dir:
                cfg.data.data_dir = args.data_dir
            t0 = time.perf_counter()
            out = fit(cfg, device=args.device)
            ev = evaluate_prepared(out.predictor, out.data, cfg, figures=False)
            m = ev.metrics
            rmses.append(m["rmse_capped"])
            phms.append(m["phm08_capped"])
            rmse_unc.append(m["rmse_uncapped"])
            print(
                f"{subset} seed {seed}: rmse_capped {m['rmse_capped']:.2f} phm08_capped "
                f"{m['phm08_capped']:.1f} rmse_uncapped {m['rmse_uncapped']:.2f} "
                f"lead det {m.get('lead_detection_rate', float('nan')):.2f} median "
                f"{m.get('lead_time_median', float('nan')):.1f} FA/1000 "
                f"{m.get('false_alarms_per_1000_healthy', float('nan')):.2f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            if lead is None:
                lead = (m, ev.protocol)
        key = subset.lower()
        sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
        summary |= {
            f"{key}_rmse_mean": float(np.mean(rmses)),
            f"{key}_rmse_sd": sd(rmses),
            f"{key}_phm08_mean": float(np.mean(phms)),
            f"{key}_phm08_sd": sd(phms),
            f"{key}_rmse_uncapped_mean": float(np.mean(rmse_unc)),
        }
        details = {
            "protocol": lead[1] if lead else "",
            "seeds": args.seeds,
            "per_seed_rmse_capped": rmses,
            "per_seed_phm08_capped": phms,
            "target_rmse": TARGETS.get(subset),
            "machine": machine(),
            "command": cmd,
        }
        if not args.no_record:
            for k in (
                f"{key}_rmse_mean",
                f"{key}_rmse_sd",
                f"{key}_phm08_mean",
                f"{key}_phm08_sd",
                f"{key}_rmse_uncapped_mean",
            ):
                record("maintenance", k, summary[k], details)
        if subset == "FD001" and lead is not None:
            m = lead[0]
            lead_keys = {
                "fd001_lead_detection_rate": m.get("lead_detection_rate", float("nan")),
                "fd001_lead_median": m.get("lead_time_median", float("nan")),
                "fd001_lead_p10": m.get("lead_time_p10", float("nan")),
                "fd001_false_alarms_per_1000": m.get("false_alarms_per_1000_healthy", float("nan")),
            }
            summary |= lead_keys
            if not args.no_record:
                for k, v in lead_keys.items():
                    record(
                        "maintenance",
                        k,
                        float(v),
                        {
                            **details,
                            "note": f"first seed ({args.seeds[0]}), horizon 30 cycles, "
                            "held-out FD001 training units",
                        },
                    )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
