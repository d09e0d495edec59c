"""C-MAPSS benchmark of the maintenance app (no MLflow, no polars, no matplotlib needed).

Per subset and seed (each seed is one independent run; seeds are never pooled, though a run
may itself average ``ensemble_size`` members trained on that seed's split): train on
the training units (a seeded 20% of units held out: half are the validation units that pick the
best epoch and choose the alarm policy, half only measure lead time), then the official test
protocol, one prediction per test unit at its last cycle: RMSE and PHM08 with the truth capped
at 125 (and uncapped). Reported: mean and sample sd over the seeds; beside them, for choosing
the recipe, the validation RMSE (policy-validation units, every reading, or those with true
RUL <= ``val_max_rul``) at the configured causal smoothing (``*_val_rmse``; per smoothing
length in the details, ``val_rmse_by_smoothing_mean``).
Lead time on FD001's held-out *training* units (full run-to-failure, never trained on, never
used to choose anything), at horizon 30 cycles, pooled over the seeds' hold-outs.
Results go to ``bench/results/maintenance.json`` via ``bench.common.record``.

GPU (one H200; runs ``--jobs`` trainings at once, each in its own process, because these
small models are launch-bound and one process leaves the GPU mostly idle)::

    python -m bench.maintenance_bench --device cuda --subsets FD001 FD002 FD003 FD004 \\
        --seeds 0 1 2 3 4 --data-dir data/cmapss

Recipe sweeps: ``--set model.d_model=32 window=60 patch_len=5 rul_smoothing=5 --no-record
--json-out sweep.json`` (every run's data, validation tables included, as JSON).

CPU check (one thread: the development machine's 2 cores are shared)::

    python -m bench.maintenance_bench --subsets FD001 --seeds 0 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = {"FD001": 11.0, "FD002": 13.5, "FD003": 11.0, "FD004": 15.0}


def run_one(subset: str, seed: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (subset, seed); returns plain data (runs in a worker process)."""
    import torch

    torch.set_num_threads(opts["threads"])
    if opts["verbose"]:
        import logging

        logging.basicConfig(format=f"{subset}/{seed} %(message)s")
        logging.getLogger("apps.maintenance.training").setLevel(logging.INFO)
    if opts["device"] == "cuda":
        torch.set_float32_matmul_precision("high")
    from apps.maintenance.config import load_config
    from apps.maintenance.training import evaluate_prepared, fit

    cfg = load_config(subset.lower())
    cfg.seed = seed
    cfg.trainer.seed = seed
    cfg.trainer.accelerator = "gpu" if opts["device"] == "cuda" else "cpu"
    cfg.trainer.devices = 1
    cfg.trainer.precision = opts["precision"]
    if opts["epochs"] is not None:
        cfg.trainer.max_epochs = opts["epochs"]
    if opts["steps_per_epoch"] is not None:
        cfg.steps_per_epoch = opts["steps_per_epoch"]
    if opts["data_dir"]:
        cfg.data.data_dir = opts["data_dir"]
    for item in opts["overrides"]:
        cfg = apply_override(cfg, item)
    t0 = time.perf_counter()
    out = fit(cfg, device=opts["device"])
    t_fit = time.perf_counter() - t0
    if opts["device"] == "cuda":
        out.predictor.model.to("cuda")
    ev = evaluate_prepared(out.predictor, out.data, cfg, figures=False)
    lead = ev.tables["lead_per_unit"]
    last = ev.tables["test_last_cycle"]
    readings = out.data.test.groupby("unit").size()
    return {
        "subset": subset,
        "seed": seed,
        "metrics": ev.metrics,
        "protocol": ev.protocol,
        "lead_times": lead["lead_time"].astype(float).tolist(),
        "lead_detected": lead["detected"].astype(bool).tolist(),
        "lead_false_alarms": int(lead["n_false_alarms"].sum()),
        "lead_healthy_steps": int(lead["healthy_steps"].sum()),
        "val_rmse_history": out.val_rmse_history,
        "best_epoch": out.best_epoch,
        "val_rmse_by_smoothing": {str(k): v for k, v in out.val_rmse_by_smoothing.items()},
        "rul_smoothing": cfg.rul_smoothing,
        "test_last_cycle": {  # one row per test unit, for the error breakdown
            "rul_pred": last["rul_pred"].astype(float).tolist(),
            "rul_true": last["rul_true"].astype(float).tolist(),
            "n_readings": readings.loc[last["unit"]].astype(int).tolist(),
        },
        "rul_cap": cfg.rul_cap,
        "window": cfg.window,
        "fit_s": t_fit,
        "total_s": time.perf_counter() - t0,
    }


def apply_override(cfg: Any, item: str) -> Any:
    """``--set a.b=value``: ``cfg`` with a (nested) config field set, through
    ``YamlConfig.with_overrides`` (the config's own checks run again); the value is parsed as
    YAML (``window=50``, ``age_feature=false``, ``model.d_model=128``, ``alarm.ks=[3,5,8]``)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected key=value")
    try:
        return cfg.with_overrides({key.strip(): yaml.safe_load(raw)})
    except KeyError as err:
        raise SystemExit(f"--set {item!r}: {err.args[0]}") from None


def _sd(v: list[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


TRUTH_BANDS = (0, 25, 50, 75, 100, 124.5, 125.5)  # the last band: truth at the cap


def last_cycle_error_breakdown(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Where the capped test error sits, pooled over the runs: per band of capped true RUL
    (and for units with no more readings than the window), units, RMSE, mean error (pred -
    true) and share of the total squared error."""
    pred = np.concatenate([r["test_last_cycle"]["rul_pred"] for r in runs])
    cap = runs[0]["rul_cap"]
    true = np.minimum(np.concatenate([r["test_last_cycle"]["rul_true"] for r in runs]), cap)
    n_read = np.concatenate([r["test_last_cycle"]["n_readings"] for r in runs])
    err = pred - true
    total = float((err**2).sum())
    groups = {
        f"truth {lo:g}-{hi:g}" if hi < cap else f"truth at the cap ({cap:g})": (true > lo)
        & (true <= hi)
        for lo, hi in zip(TRUTH_BANDS[:-1], TRUTH_BANDS[1:], strict=True)
    }
    groups[f"<= {runs[0]['window']} readings"] = n_read <= runs[0]["window"]
    return {
        name: {
            "units": int(sel.sum()),
            "rmse": float(np.sqrt((err[sel] ** 2).mean())),
            "mean_error": float(err[sel].mean()),
            "share_of_squared_error": float((err[sel] ** 2).sum() / total),
        }
        for name, sel in groups.items()
        if sel.any()
    }


def summarise(subset: str, runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sd over seeds; FD001 also the lead-time figures pooled over the seeds."""
    key = subset.lower()
    m = [r["metrics"] for r in runs]
    rm = [x["rmse_capped"] for x in m]
    sc = [x["phm08_capped"] for x in m]
    out = {
        f"{key}_rmse": float(np.mean(rm)),
        f"{key}_rmse_sd": _sd(rm),
        f"{key}_score": float(np.mean(sc)),
        f"{key}_score_sd": _sd(sc),
        f"{key}_rmse_uncapped": float(np.mean([x["rmse_uncapped"] for x in m])),
    }
    # validation units only (what recipe choices are made on): RMSE on the policy-validation
    # units after restoring the best epoch, at the configured causal smoothing length
    n = str(runs[0].get("rul_smoothing", 1))
    if n in runs[0].get("val_rmse_by_smoothing", {}):
        out[f"{key}_val_rmse"] = float(np.mean([r["val_rmse_by_smoothing"][n] for r in runs]))
    if subset == "FD001":
        leads = np.concatenate([r["lead_times"] for r in runs])
        det = np.concatenate([r["lead_detected"] for r in runs])
        fa = sum(r["lead_false_alarms"] for r in runs)
        healthy = sum(r["lead_healthy_steps"] for r in runs)
        out |= {
            "fd001_detection_rate": float(det.mean()),
            "fd001_median_lead_cycles": float(np.median(leads)),
            "fd001_lead_p10_cycles": float(np.percentile(leads, 10)),
            "fd001_false_alarms_per_1000": fa / healthy * 1000.0 if healthy else float("nan"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--subsets", nargs="+", default=["FD001", "FD002", "FD003", "FD004"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="override steps_per_epoch")
    ap.add_argument("--data-dir", default=None, help="folder with the C-MAPSS *.txt.gz files")
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32 on cpu")
    ap.add_argument("--jobs", type=int, default=None, help="trainings at once (cuda: 5, cpu: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per training")
    ap.add_argument("--no-record", action="store_true", help="print only")
    ap.add_argument("--json-out", default=None, help="also write every run's data here (JSON)")
    ap.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every run, e.g. --set window=50 model.d_model=128",
    )
    ap.add_argument("--verbose", action="store_true", help="print each epoch's validation RMSE")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    jobs = args.jobs or (5 if cuda else 1)
    opts = {
        "device": args.device,
        "precision": args.precision or ("bf16-mixed" if cuda else "32"),
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        # relative to where the command runs, not to the project root
        "verbose": args.verbose,
        "overrides": list(args.overrides),
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
        "threads": args.threads or (max(1, min(4, (os.cpu_count() or 2) // jobs)) if cuda else 1),
    }
    cmd = "python -m bench.maintenance_bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    tasks = [(s, seed) for s in args.subsets for seed in args.seeds]
    t_all = time.perf_counter()
    results: list[dict[str, Any]] = []

    def report(r: dict[str, Any]) -> None:
        m = r["metrics"]
        print(
            f"{r['subset']} seed {r['seed']}: rmse_capped {m['rmse_capped']:.2f} phm08_capped "
            f"{m['phm08_capped']:.1f} rmse_uncapped {m['rmse_uncapped']:.2f} | lead det "
            f"{m.get('lead_detection_rate', float('nan')):.2f} median "
            f"{m.get('lead_time_median', float('nan')):.1f} FA/1000 "
            f"{m.get('false_alarms_per_1000_healthy', float('nan')):.2f} policy "
            f"(H={m.get('alarm_policy_threshold', float('nan')):g}, "
            f"k={m.get('alarm_policy_k', float('nan')):g}) | best epoch {r['best_epoch']} "
            f"of {len(r['val_rmse_history'])}, val rmse {min(r['val_rmse_history'] or [np.nan]):.2f}"
            f" | val rmse by smoothing "
            + " ".join(f"{k}:{v:.2f}" for k, v in r.get("val_rmse_by_smoothing", {}).items())
            + f" | fit {r['fit_s']:.0f} s, total {r['total_s']:.0f} s",
            flush=True,
        )
        results.append(r)

    if jobs == 1:
        for s, seed in tasks:
            report(run_one(s, seed, opts))
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, s, seed, opts) for s, seed in tasks]
            for f in futures:
                report(f.result())
    wall = time.perf_counter() - t_all

    summary: dict[str, float] = {}
    for subset in args.subsets:
        runs = sorted((r for r in results if r["subset"] == subset), key=lambda r: r["seed"])
        figs = summarise(subset, runs)
        summary |= figs
        details = {
            "protocol": runs[0]["protocol"],
            "seeds": args.seeds,
            "per_seed_rmse_capped": [r["metrics"]["rmse_capped"] for r in runs],
            "per_seed_phm08_capped": [r["metrics"]["phm08_capped"] for r in runs],
            "val_rmse_by_smoothing_mean": {
                n: float(np.mean([r["val_rmse_by_smoothing"][n] for r in runs]))
                for n in runs[0].get("val_rmse_by_smoothing", {})
            },
            "rul_smoothing": runs[0].get("rul_smoothing", 1),
            "test_error_breakdown": last_cycle_error_breakdown(runs),
            "target_rmse": TARGETS.get(subset),
            "device": args.device,
            "precision": opts["precision"],
            "jobs": jobs,
            "overrides": list(args.overrides),
            "bench_wall_s": round(wall, 1),
            "command": cmd,
        }
        print(f"{subset} test error by capped true RUL (pooled over seeds):", flush=True)
        for name, row in details["test_error_breakdown"].items():
            print(
                f"  {name:>22}: {row['units']:4d} units, rmse {row['rmse']:5.2f}, mean error "
                f"{row['mean_error']:+6.2f}, {100 * row['share_of_squared_error']:4.1f}% of the "
                "squared error",
                flush=True,
            )
        if subset == "FD001":
            details |= {
                "lead_note": "held-out FD001 training units (10 per seed), eval horizon 30 cycles, "
                "pooled over seeds: detection = detected / units, median over units "
                "(misses count 0), false alarms = false episodes / healthy steps * 1000",
                "per_seed_lead": [
                    {
                        k: r["metrics"].get(k)
                        for k in (
                            "lead_detection_rate",
                            "lead_time_median",
                            "false_alarms_per_1000_healthy",
                            "alarm_policy_threshold",
                            "alarm_policy_k",
                        )
                    }
                    for r in runs
                ],
            }
        if not args.no_record:
            from bench.common import record

            for k, v in figs.items():
                record("maintenance", k, float(v), details)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "runs": results}))
    print(json.dumps(summary, indent=1))
    print(f"wall time {wall:.0f} s for {len(tasks)} trainings ({jobs} at once)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
