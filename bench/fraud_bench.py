"""Fraud benchmark: backbone vs LightGBM on the ULB and handbook protocols, same run,
and scoring throughput with features included.

* ``ulb`` (``configs/ulb.yaml``): first 70 % of time trains (its last 20 % validates:
  best epoch of the weight-averaged model, calibration, threshold, LightGBM early
  stopping), last 30 % tests; PR-AUC, ROC-AUC, recall at precision 0.9 on the whole test
  block. ``KEEL_BENCH_RESULTS=<dir>`` writes the JSON elsewhere (``bench.common.record``).
* ``handbook`` (``configs/handbook.yaml``): 7 train days (last 2 validate) / 7 delay / 7
  test days from 2018-07-25, known-compromised cards removed; Card Precision@100 per day
  (mean over the 7 test days), AP.
* ``throughput``: rows/s of raw ULB rows -> features (``apps.fraud.fastscore.RowFeatures``)
  -> score, timed side by side for the backbone, a distilled MLP student and LightGBM
  (2 threads each on CPU). On CPU it needs the ULB fit (run in the same call). With
  ``--device cuda`` it needs only torch + numpy + PyYAML + lightning (no polars, lightgbm,
  mlflow, no data): the ULB architecture with random weights (speed does not depend on
  weight values) scores synthetic raw rows.

Writes ``bench/results/fraud.json`` via ``bench.common.record`` and prints a table::

    python -m bench.fraud_bench [--only ulb|handbook|throughput ...] [--device cpu|cuda]
                                [--ulb-config ulb|ulb_ema|PATH.yaml]
                                [--handbook-config handbook|PATH.yaml] [--refit]

``--seeds 0 1 2 3 4 [--jobs 2]`` runs ``--only ulb`` / ``handbook`` once per seed and
records ``<key>_seeds_mean`` (per-seed values, sd, paired backbone - LightGBM PR-AUC) beside
the single-run keys.

``--select CANDIDATES.yaml [--folds N] [--candidates NAME ...]`` runs prequential model selection
(``apps.fraud.selection``) for ``--only ulb`` / ``handbook``: every candidate recipe on the
protocol's earlier folds, never the test split; records ``<name>_prequential_selection``
(value: the winner's mean fold metric; details: every candidate's per-fold figures);
``--candidates`` runs only the named recipes (their winner is among those alone).

``--refit`` sets ``refit_on_validation`` (see ``apps.fraud.config.FraudConfig``): step 1
as above, then backbone and LightGBM retrained from scratch on train + validation rows for
the chosen epoch / tree count, calibration and thresholds kept from step 1; the same run
records step 1's figures under the usual keys and the refit's under ``<key>_refit``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, record, sync, time_fn

KEYS = {
    "ulb": {
        "pr_auc": "ulb_ap",
        "roc_auc": "ulb_roc_auc",
        "recall_at_precision_0.9": "ulb_recall_at_p90",
        "baseline/pr_auc": "ulb_ap_lightgbm",
        "baseline/roc_auc": "ulb_roc_auc_lightgbm",
        "baseline/recall_at_precision_0.9": "ulb_recall_at_p90_lightgbm",
    },
    "handbook": {
        "card_precision_at_100": "handbook_cp100",
        "pr_auc": "handbook_ap",
        "baseline/card_precision_at_100": "handbook_cp100_lightgbm",
        "baseline/pr_auc": "handbook_ap_lightgbm",
    },
}
ULB_YAML = Path(__file__).resolve().parents[1] / "apps" / "fraud" / "configs" / "ulb.yaml"


def _cmd(argv: list[str] | None) -> str:
    return "python -m bench.fraud_bench " + " ".join(argv if argv is not None else sys.argv[1:])


def protocol_config(name: str, args: argparse.Namespace) -> Any:
    """Protocol ``name``'s config: ``--ulb-config`` / ``--handbook-config`` (default the
    shipped file), with ``--epochs`` applied."""
    from apps.fraud.config import load_config

    override = {"ulb": args.ulb_config, "handbook": args.handbook_config}.get(name)
    cfg = load_config(override or name)
    if args.epochs:
        cfg.trainer.max_epochs = args.epochs
    return cfg


def fit_protocol(name: str, args: argparse.Namespace, seed: int | None = None) -> tuple[Any, float]:
    """``(FitOutput, seconds)`` of protocol ``name``'s config (``--ulb-config`` /
    ``--handbook-config``, ``--epochs``, ``--refit``), with ``seed`` when given."""
    from apps.fraud.training import fit

    cfg = protocol_config(name, args)
    if args.refit:
        cfg.refit_on_validation = True
    if seed is not None:
        cfg.seed = seed
    t0 = time.time()
    out = fit(cfg, device=None if args.device == "cpu" else args.device)
    return out, time.time() - t0


def run_protocol(name: str, args: argparse.Namespace, cmd: str, rows: list) -> Any:
    out, secs = fit_protocol(name, args)
    m = out.evaluation.metrics
    split = out.data.split
    details = {
        "protocol": out.evaluation.protocol,
        "seconds": round(secs),
        "command": cmd,
        "test_rows": len(split.test),
        "test_frauds": int(out.data.y[split.test].sum()),
        "valid_frauds": int(out.data.y[split.valid].sum()),
        **{k: v for k, v in out.extra.items() if v is not None},
    }
    if out.baseline is not None:
        details["lightgbm_trees"] = out.baseline.best_iteration_
    by_kind = {k: v for k, v in m.items() if k.startswith(("pr_auc/", "baseline/pr_auc/"))}
    if by_kind:  # AP of each kind of fraud (the simulator's answer key; never a feature)
        details["test_pr_auc_by_kind"] = by_kind
    print(f"[{name}] test block: {details['test_rows']} rows, {details['test_frauds']} frauds")
    for metric, key in KEYS[name].items():
        for got, where in refit_keys(metric, key, args.refit):
            if got in m:
                record("fraud", where, float(m[got]), details)
                rows.append((where, m[got]))
    rows.append((f"{name}_seconds", secs))
    return out


def mlp_student_figures(
    name: str,
    out: Any,
    args: argparse.Namespace,
    seed: int | None = None,
    more_teachers: Sequence[Any] = (),
) -> tuple[dict[str, float], dict[str, Any]]:
    """The deployable CPU scorer (``student.kind: mlp`` + ``configs/mlp_distill.yaml``,
    what ``keel fraud distill`` registers) distilled from ``out``'s backbone (with
    ``more_teachers``' predictors: their mean logit) on the same split: ``(test metrics
    named as in KEYS, details)``."""
    from apps.fraud.config import config_path
    from apps.fraud.distillation import distill_mlp_predictor
    from core.distill import DistillConfig

    cfg = protocol_config(name, args)
    cfg.student.kind = "mlp"
    if seed is not None:
        cfg.seed = seed
    dcfg = DistillConfig.from_yaml(config_path("mlp_distill"))
    t0 = time.time()
    res = distill_mlp_predictor(
        cfg, out.predictor, dcfg, data=out.data, more_teachers=more_teachers
    )
    m = res.evaluation.metrics
    metrics = {k: float(m[k]) for k in KEYS[name] if not k.startswith("baseline/") and k in m}
    details = {
        "protocol": res.evaluation.protocol,
        "seconds": round(time.time() - t0),
        "validation_ap": res.extra.get("validation_ap"),
        "n_teachers": res.extra.get("n_teachers"),
        "student": {"hidden": list(cfg.student.hidden), "epochs": cfg.student.epochs},
        "student_active_params": res.student_active_params,
        "teacher_active_params": res.teacher_active_params,
    }
    return metrics, details


def run_mlp_student(name: str, out: Any, args: argparse.Namespace, cmd: str, rows: list) -> None:
    """``--mlp-student`` (single run): records ``<key>_mlp_student`` for the protocol's model
    keys, with the teacher's figures of the same run."""
    metrics, details = mlp_student_figures(name, out, args)
    teacher = out.evaluation.metrics
    details = {
        **details,
        "command": cmd,
        "teacher_same_run": {k: float(teacher[k]) for k in KEYS[name] if k in teacher},
    }
    for metric, key in KEYS[name].items():
        if metric in metrics:
            record("fraud", f"{key}_mlp_student", metrics[metric], details)
            rows.append((f"{key}_mlp_student", metrics[metric]))


def run_mlp_ensemble(name: str, out: Any, args: argparse.Namespace, cmd: str, rows: list) -> None:
    """``--mlp-teachers K`` (with ``--mlp-student``): backbones of seeds 1..K-1 beside
    ``out`` (seed 0, the headline run) teach one MLP student through their mean logit;
    for every ``--student-seeds`` seed, that student and the single-teacher student of
    ``out`` are fitted, and ``<key>_mlp_student_ens<K>`` records the ensemble students'
    mean with both students' validation AP (what may choose between the recipes)."""
    import statistics

    teachers = [out]
    for seed in range(1, args.mlp_teachers):
        o, secs = fit_protocol(name, args, seed)
        m = o.evaluation.metrics
        print(f"[{name}] teacher seed {seed}: pr_auc {m['pr_auc']:.4f} ({secs:.0f} s)", flush=True)
        teachers.append(o)
    more = [t.predictor for t in teachers[1:]]
    ens, single = [], []
    for seed in args.student_seeds:
        ens.append(mlp_student_figures(name, out, args, seed, more_teachers=more))
        single.append(mlp_student_figures(name, out, args, seed))
        print(
            f"[{name}] student seed {seed}: ensemble-taught {ens[-1][0]} (validation AP"
            f" {ens[-1][1]['validation_ap']:.4f}); seed-0-taught {single[-1][0]} (validation"
            f" AP {single[-1][1]['validation_ap']:.4f})",
            flush=True,
        )
    lgb = {k: float(v) for k, v in out.evaluation.metrics.items() if k.startswith("baseline/")}

    def summary(runs: list) -> dict[str, Any]:
        keys = runs[0][0]
        return {
            "mean": {k: statistics.fmean(r[0][k] for r in runs) for k in keys},
            "sd": {k: statistics.stdev(r[0][k] for r in runs) for k in keys}
            if len(runs) > 1
            else None,
            "per_seed": [r[0] for r in runs],
            "validation_ap_mean": statistics.fmean(r[1]["validation_ap"] for r in runs),
            "validation_ap_per_seed": [r[1]["validation_ap"] for r in runs],
        }

    details = {
        "command": cmd,
        "protocol": ens[0][1]["protocol"],
        "student_seeds": list(args.student_seeds),
        "n_teachers": args.mlp_teachers,
        "teacher_seeds": list(range(args.mlp_teachers)),
        "teachers_test": [
            {k: float(v) for k, v in t.evaluation.metrics.items() if k in KEYS[name]}
            for t in teachers
        ],
        "ensemble_taught": summary(ens),
        "seed0_taught": summary(single),
        "lightgbm_same_run": lgb,
        "student_active_params": ens[0][1]["student_active_params"],
        "teacher_active_params": ens[0][1]["teacher_active_params"],
    }
    for metric, key in KEYS[name].items():
        if metric in ens[0][0]:
            value = details["ensemble_taught"]["mean"][metric]
            record("fraud", f"{key}_mlp_student_ens{args.mlp_teachers}", value, details)
            rows.append((f"{key}_mlp_student_ens{args.mlp_teachers}", value))


def _seed_run(name: str, args: argparse.Namespace, seed: int, threads: int) -> dict[str, Any]:
    """One seed of ``--seeds``: the metrics :data:`KEYS` names, and what the run chose
    (picklable, for a worker process)."""
    torch.set_num_threads(threads)
    out, secs = fit_protocol(name, args, seed)
    m = out.evaluation.metrics
    student = mlp_student_figures(name, out, args, seed)[0] if args.mlp_student else {}
    return {
        "seed": seed,
        "metrics": {k: float(m[k]) for k in KEYS[name] if k in m},
        "mlp_student_metrics": student,
        "best_epoch": out.extra.get("best_epoch"),
        "best_val_ap": out.extra.get("best_val_ap"),  # what chose the epoch; validation only
        "lightgbm_trees": out.baseline.best_iteration_ if out.baseline is not None else None,
        "protocol": out.evaluation.protocol,
        "test_frauds": int(out.data.y[out.data.split.test].sum()),
        "seconds": round(secs),
    }


def run_seeds(name: str, args: argparse.Namespace, cmd: str, rows: list) -> None:
    """``--seeds``: the protocol once per seed (the backbone's initialisation, batch order and
    negative sampling, and LightGBM's ``random_state``); records ``<key>_seeds_mean`` for
    every key of :data:`KEYS`, with the per-seed values, sd and the paired backbone-minus-
    LightGBM difference in the details. The single-run headline keys are left alone."""
    import statistics
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    threads = max(1, args.threads // args.jobs)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_seed_run, name, args, s, threads) for s in args.seeds]
            runs = [f.result() for f in futures]
    else:
        runs = [_seed_run(name, args, s, threads) for s in args.seeds]
    for r in runs:
        print(
            f"[{name}] seed {r['seed']}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
            + f" | best epoch {r['best_epoch']} (validation AP {r['best_val_ap']}), {r['seconds']} s",
            flush=True,
        )
    ap, lgb = "pr_auc", "baseline/pr_auc"
    diff = [r["metrics"][ap] - r["metrics"][lgb] for r in runs if lgb in r["metrics"]]
    val_ap = [r["best_val_ap"] for r in runs if r["best_val_ap"] is not None]
    details = {
        "protocol": runs[0]["protocol"],
        "command": cmd,
        "seeds": list(args.seeds),
        "mean_best_val_ap": statistics.fmean(val_ap) if val_ap else None,
        "test_frauds": runs[0]["test_frauds"],
        "runs": runs,
        "backbone_minus_lightgbm_pr_auc": {
            "mean": statistics.fmean(diff) if diff else None,
            "sd": statistics.stdev(diff) if len(diff) > 1 else None,
            "backbone_wins": sum(d > 0 for d in diff),
            "n_seeds": len(diff),
        },
    }
    for metric, key in KEYS[name].items():
        vals = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
        if not vals:
            continue
        mean, sd = statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None
        record("fraud", f"{key}_seeds_mean", mean, {**details, "sd": sd, "per_seed": vals})
        rows.append((f"{key}_seeds_mean", mean))
        if sd is not None:
            rows.append((f"{key}_seeds_sd", sd))
        svals = [r["mlp_student_metrics"].get(metric) for r in runs]
        if all(v is not None for v in svals):  # model keys of a --mlp-student run
            smean = statistics.fmean(svals)
            ssd = statistics.stdev(svals) if len(svals) > 1 else None
            sdet = {**details, "sd": ssd, "per_seed": svals, "model": "deployable MLP student"}
            if lgb in runs[0]["metrics"] and metric == ap:
                sdiff = [r["mlp_student_metrics"][ap] - r["metrics"][lgb] for r in runs]
                sdet["student_minus_lightgbm_pr_auc"] = {
                    "mean": statistics.fmean(sdiff),
                    "sd": statistics.stdev(sdiff) if len(sdiff) > 1 else None,
                    "student_wins": sum(d > 0 for d in sdiff),
                    "n_seeds": len(sdiff),
                }
            record("fraud", f"{key}_mlp_student_seeds_mean", smean, sdet)
            rows.append((f"{key}_mlp_student_seeds_mean", smean))


def pick_candidates(
    candidates: dict[str, Any], names: list[str] | None, path: str
) -> dict[str, Any]:
    """``--candidates``: only the named recipes of a candidates file, in the file's order
    (to add one recipe's folds beside a recorded run of the others; the fits are
    deterministic per seed). ``None`` keeps them all; an unknown name is an error that
    lists the file's names."""
    if not names:
        return candidates
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise SystemExit(f"--candidates {unknown}: not in {path} (it lists {list(candidates)})")
    return {n: o for n, o in candidates.items() if n in names}


def run_selection(name: str, args: argparse.Namespace, cmd: str, rows: list) -> None:
    """``--select``: prequential selection among the candidates file's recipes on the
    ``name`` protocol's folds (``--jobs`` fits at once); records the summary."""
    from apps.fraud.selection import select
    from core.configio import load_candidates

    cfg = protocol_config(name, args)
    grid = load_candidates(args.select)
    grid["candidates"] = pick_candidates(grid["candidates"], args.candidates, args.select)
    folds = args.folds or grid["folds"] or 3
    metric = grid["metric"] or "pr_auc"
    threads = max(1, args.threads // args.jobs)
    t0 = time.time()
    sel = select(
        cfg,
        grid["candidates"],
        n_folds=folds,
        metric=metric,
        jobs=args.jobs,
        threads=threads,
        progress=lambda msg: print(f"[{name}] {msg}", flush=True),
    )
    print(f"[{name}] {sel.protocol}")
    for s in sel.summary:
        per = " / ".join(f"{v:.4f}" for v in s["per_fold"])
        print(
            f"[{name}] {s['candidate']:28s} mean {metric} {s[f'mean_{metric}']:.4f} "
            f"(sd {s[f'sd_{metric}']:.4f}; folds {per}; won {s['folds_won']})"
        )
    print(f"[{name}] selected: {sel.best}")
    best = next(s for s in sel.summary if s["candidate"] == sel.best)
    details = {
        "protocol": sel.protocol,
        "command": cmd,
        "metric": metric,
        "selected": sel.best,
        "candidates_run": list(grid["candidates"]),
        "summary": sel.summary,
        "runs": sel.rows,
        "seconds": round(time.time() - t0),
    }
    key = f"{name}_prequential_selection"
    record("fraud", key, best[f"mean_{metric}"], details)
    rows.append((key, best[f"mean_{metric}"]))


def refit_keys(metric: str, key: str, refit: bool) -> list[tuple[str, str]]:
    """``(metric in the evaluation, results key)`` pairs: with ``--refit`` the refit models'
    figures go to ``<key>_refit`` and step 1's (``no_refit/`` metrics of the same run,
    the same figures as a run without ``--refit``) to the usual key."""
    if not refit:
        return [(metric, key)]
    return [(f"no_refit/{metric}", key), (metric, f"{key}_refit")]


def _ulb_raw(out: Any) -> np.ndarray:
    """Test-block raw rows ``[time_s, amount, V1..V28]`` (what RowFeatures reads)."""
    schema = out.data.schema
    raw = out.data.raw
    cols = [schema.time_column, schema.amount_column, *schema.numeric_columns]
    return raw.select(cols).to_numpy()[out.data.split.test].astype(np.float64)


def throughput_cpu(out: Any, cmd: str, rows: list, threads: int) -> None:
    """Backbone, student and LightGBM on the same raw test rows, features included."""
    from apps.fraud.fastscore import RowFeatures, distill_student, score_rows
    from apps.fraud.metrics import fraud_metrics

    torch.set_num_threads(threads)
    state = out.predictor.inputs.state_dict()
    feats = RowFeatures.from_state(state)
    raw_np = _ulb_raw(out)
    raw = torch.from_numpy(raw_np)
    # features in torch == features of the evaluated pipeline
    x_ref = out.inputs.x_num[out.data.split.test]
    x_got = feats(raw).numpy()
    max_diff = float(np.abs(x_got - x_ref).max())
    if max_diff > 1e-4:
        raise RuntimeError(f"RowFeatures differ from InputBuilder by {max_diff}")
    model = out.predictor.model.float().eval()
    split, y = out.data.split, out.data.y
    teacher_rows = np.concatenate([split.train, split.valid])
    teacher = out.predictor.score_inputs(out.inputs.take(teacher_rows))[0]
    t0 = time.time()
    student = distill_student(out.inputs.x_num[teacher_rows], teacher, seed=0)
    distill_s = time.time() - t0
    s_logits = score_rows(feats, student, raw).numpy()
    sm = fraud_metrics(y[split.test], s_logits)
    n = raw.shape[0]
    details = {"command": cmd, "rows": n, "threads": threads, "features": "included"}

    def rate(fn: Any) -> float:
        t = time_fn(fn, warmup=1, reps=3)
        return n / (t["median_ms"] / 1e3)

    r_backbone = rate(lambda: score_rows(feats, model, raw, batch_size=4096))
    r_student = rate(lambda: score_rows(feats, student, raw))
    booster = out.baseline.model_.booster_
    it = out.baseline.best_iteration_

    def lgb_score() -> np.ndarray:
        x = feats(raw, scaled=False).numpy()
        return booster.predict(x, num_iteration=it, num_threads=threads)

    r_lgb = rate(lgb_score)
    common = {**details, "student_ap": sm["pr_auc"], "distill_seconds": round(distill_s)}
    common["student_recall_at_p90"] = sm["recall_at_precision_0.9"]
    record("fraud", "score_rows_per_s_cpu", r_student, {**common, "model": "distilled MLP student"})
    record("fraud", "score_rows_per_s_cpu_backbone", r_backbone, {**details, "model": "backbone"})
    record("fraud", "score_rows_per_s_cpu_lightgbm", r_lgb, {**details, "trees": it})
    record("fraud", "ulb_ap_student", sm["pr_auc"], common)
    rows += [
        ("score_rows_per_s_cpu (student)", r_student),
        ("score_rows_per_s_cpu_backbone", r_backbone),
        ("score_rows_per_s_cpu_lightgbm", r_lgb),
        ("ulb_ap_student", sm["pr_auc"]),
    ]


def throughput_synthetic(cmd: str, rows: list, n_rows: int, device: str = "cuda") -> None:
    """rows/s of the ULB backbone (bf16 autocast) and a student on ``device``, features
    included, on synthetic raw rows with random weights (no data, polars or lightgbm).
    Records ``score_rows_per_s_gpu`` (the student, rows resident on the GPU),
    ``score_rows_per_s_gpu_student_h2d`` (rows copied from pinned host memory inside the
    timed call) and ``score_rows_per_s_gpu_backbone`` only for CUDA (CPU runs are smoke
    tests)."""
    import yaml

    from apps.fraud.fastscore import RowFeatures, StudentMLP, score_rows
    from apps.fraud.model import FraudModel

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    cfg = yaml.safe_load(ULB_YAML.read_text())
    numeric = [f"V{i}" for i in range(1, 29)]
    names = ["amount", "amount_log1p", "hour", "is_night", *numeric]
    f = len(names)
    feats = RowFeatures(
        names,
        numeric,
        dict.fromkeys(numeric, 0.0),
        [True, True, True, True] + [False] * 28,
        [3.0, 3.0, 2.5, 0.2] + [0.0] * 28,
        [1.5, 1.5, 0.5, 0.4] + [1.0] * 28,
    ).to(device)
    head = cfg.get("head", {})
    model = (
        FraudModel(
            cfg["model"],
            None,
            n_numeric=f,
            numeric_encoding=head.get("numeric_encoding", "linear"),
            n_frequencies=head.get("n_frequencies", 16),
            frequency_scale=head.get("frequency_scale", 0.5),
            n_bins=head.get("n_bins", 16),
            bin_steps=head.get("bin_steps", False),
            wide=head.get("wide", False),
            row_mlp=head.get("row_mlp") or (),
        )
        .to(device)
        .eval()
    )
    student = StudentMLP(f).to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    raw = torch.randn(n_rows, 30, device=device, generator=g)
    raw[:, 0] = torch.rand(n_rows, device=device, generator=g) * 172_800
    raw[:, 1] = torch.exp(raw[:, 1] * 1.5 + 3)
    details = {"command": cmd, "rows_per_call": n_rows, "features": "included (torch)"}
    # The scoring model is the distilled student (as for the CPU key); the backbone and the
    # student fed from pinned host memory (a batch job's rows arrive on the host) beside it.
    raw_host = raw.cpu().pin_memory() if device == "cuda" else raw
    for name, mdl, bs, key, src in (
        ("student", student, n_rows, "score_rows_per_s_gpu", raw),
        (
            "student, rows copied from pinned host memory",
            student,
            n_rows,
            "score_rows_per_s_gpu_student_h2d",
            raw_host,
        ),
        ("backbone", model, 65536, "score_rows_per_s_gpu_backbone", raw),
    ):

        def fn(mdl=mdl, bs=bs, src=src) -> torch.Tensor:
            x = src.to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                return score_rows(feats, mdl, x, batch_size=bs)

        sync()
        t = time_fn(fn, warmup=3, reps=10)
        r = n_rows / (t["median_ms"] / 1e3)
        if device == "cuda":
            record("fraud", key, r, {**details, "model": name, "batch": bs, **t})
        rows.append((key if device == "cuda" else f"{key} ({device} smoke)", r))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=[*sorted(KEYS), "throughput"], action="append")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument(
        "--ulb-config", default=None, help="shipped config name or YAML path for ulb (default ulb)"
    )
    ap.add_argument(
        "--handbook-config",
        default=None,
        help="shipped config name or YAML path for handbook (default handbook)",
    )
    ap.add_argument(
        "--refit",
        action="store_true",
        help="also retrain backbone and LightGBM on train+validation for the chosen epoch / "
        "tree count (refit_on_validation); records <key>_refit beside the usual keys",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run ulb / handbook once per seed and record <key>_seeds_mean (mean, sd, per seed)",
    )
    ap.add_argument(
        "--select",
        default=None,
        metavar="CANDIDATES.yaml",
        help="prequential model selection among these recipes (apps.fraud.selection)",
    )
    ap.add_argument("--folds", type=int, default=None, help="--select folds (default: file's, 3)")
    ap.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        metavar="NAME",
        help="--select: run only these recipes of the candidates file",
    )
    ap.add_argument("--jobs", type=int, default=1, help="--seeds / --select runs at once")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for scoring")
    ap.add_argument("--rows", type=int, default=1 << 21, help="rows per GPU throughput call")
    ap.add_argument(
        "--synthetic", action="store_true", help="throughput on synthetic rows, random weights"
    )
    ap.add_argument(
        "--mlp-student",
        action="store_true",
        help="also distil the deployable MLP student (student.kind: mlp) from each protocol's "
        "backbone and record <key>_mlp_student",
    )
    ap.add_argument(
        "--mlp-teachers",
        type=int,
        default=1,
        help="with --mlp-student: K > 1 also distils the student from the mean logit of the"
        " backbones of seeds 0..K-1 (records <key>_mlp_student_ens<K>)",
    )
    ap.add_argument(
        "--student-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="--mlp-teachers: the student seeds fitted for each teacher",
    )
    args = ap.parse_args(argv)
    cmd = _cmd(argv)
    if args.mlp_teachers > 1 and (not args.mlp_student or args.seeds or args.select):
        ap.error("--mlp-teachers needs --mlp-student in a single run (no --seeds / --select)")
    if args.candidates and not args.select:
        ap.error("--candidates picks recipes of a --select candidates file")
    todo = args.only or ["ulb", "handbook", "throughput"]
    rows: list = []
    if args.select:
        if "throughput" in todo or args.seeds or args.refit or args.synthetic:
            ap.error("--select runs the ulb / handbook protocols only (--only ulb|handbook)")
        for name in todo:
            run_selection(name, args, cmd, rows)
    elif args.seeds:
        if "throughput" in todo or args.refit or args.synthetic:
            ap.error(
                "--seeds runs the ulb / handbook protocols only (--only ulb|handbook), no --refit"
            )
        for name in todo:
            run_seeds(name, args, cmd, rows)
    elif args.synthetic or (args.device == "cuda" and todo == ["throughput"]):
        throughput_synthetic(cmd, rows, args.rows, args.device)
    else:
        torch.set_num_threads(args.threads)
        ulb = None
        for name in todo:
            if name in KEYS:
                out = run_protocol(name, args, cmd, rows)
                ulb = out if name == "ulb" else ulb
                if args.mlp_student:
                    run_mlp_student(name, out, args, cmd, rows)
                if args.mlp_teachers > 1:
                    run_mlp_ensemble(name, out, args, cmd, rows)
        if "throughput" in todo:
            if args.device == "cuda":
                throughput_synthetic(cmd, rows, args.rows, "cuda")
            else:
                ulb = ulb or run_protocol("ulb", args, cmd, rows)
                throughput_cpu(ulb, cmd, rows, args.threads)
    print(f"\nfraud bench on {machine()}")
    for key, value in rows:
        print(f"  {key:34s} {value:14.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
