"""The ``keel`` command line: generic over every app that ships a spec.

keel apps
keel <app> train    [--config cfg.yaml] [--margin M] [--no-promote]
keel <app> evaluate [--model models:/keel-<app>@champion] [--config cfg.yaml]
keel <app> score    --input PATH --output PATH [--model URI]
keel <app> distill  [--teacher URI] [--config student.yaml] [--distill-config d.yaml]
keel <app> select   --candidates grid.yaml [--config base.yaml] [--folds N] [--output best.yaml]
keel score          --model URI --input PATH --output PATH [--engine spark --spark-master M]
keel models list | show NAME | promote NAME VERSION | rollback NAME
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from core import tracking
from core.sharding import launched_as_secondary_rank
from core.spec import discover_apps, load_app_spec


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def _load_config(spec: Any, path: str | None) -> Any:
    if path:
        return spec.config_cls.from_yaml(path)
    return spec.demo_config() if spec.demo_config else spec.config_cls()


def _add_score_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    p.add_argument(
        "--model", required=model_required, help="model URI, e.g. models:/keel-fraud@champion"
    )
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--rejects", default=None)
    p.add_argument("--chunk-rows", type=int, default=50_000)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--engine",
        choices=["local", "spark"],
        default="local",
        help="local: chunked, resumable job on this machine; spark: Spark job, Parquet folders",
    )
    p.add_argument(
        "--spark-master",
        default=None,
        help="Spark master (local[N], yarn, k8s://..., spark://...); default local[2], or the "
        "one spark-submit set",
    )
    p.add_argument(
        "--spark-mode",
        choices=["auto", "udf", "grouped", "partitions"],
        default="auto",
        help="auto: grouped when the model declares a group column, else mlflow spark_udf; "
        "partitions: predictors returning other than one row per input row",
    )
    p.add_argument(
        "--env-manager",
        choices=["local", "virtualenv", "uv", "conda"],
        default="local",
        help="executors' Python environment for spark_udf (udf mode only)",
    )
    p.add_argument("--overwrite", action="store_true", help="spark: replace an existing output")


def _add_distill_parser(asub: Any) -> None:
    d = asub.add_parser(
        "distill",
        help="distil a registered teacher into the (smaller) model of --config; the student"
        " is registered as challenger (promote it with `keel models promote`)",
    )
    d.add_argument("--teacher", default=None, help="default: models:/keel-<app>@champion")
    d.add_argument("--config", default=None, help="the student's app config YAML")
    d.add_argument("--distill-config", default=None, help="core.distill.DistillConfig YAML")
    d.add_argument("--alpha", type=float, default=None, help="weight of the teacher term")
    d.add_argument("--temperature", type=float, default=None)


def _distill_hook(spec: Any) -> Any:
    """``spec.distill``, else ``apps.<app>.distillation.distill`` (not yet wired), else None."""
    hook = getattr(spec, "distill", None)
    if hook is not None:
        return hook
    import importlib

    try:
        module = importlib.import_module(f"apps.{spec.name}.distillation")
    except ModuleNotFoundError as err:
        if err.name != f"apps.{spec.name}.distillation":
            raise
        return None
    return getattr(module, "distill", None)


def _distill(spec: Any, args: argparse.Namespace) -> int:
    """Teacher from the registry -> student trained + evaluated by the app -> challenger."""
    import mlflow

    from core.distill import DistillConfig
    from pipelines import registry
    from pipelines.lifecycle import register_result

    hook = _distill_hook(spec)
    if hook is None:
        print(f"the {spec.name} app has no distillation (AppSpec.distill)", file=sys.stderr)
        return 2
    name = registry.model_name(spec.name)
    teacher_uri = args.teacher or f"models:/{name}@{registry.CHAMPION}"
    dcfg = DistillConfig.from_yaml(args.distill_config) if args.distill_config else DistillConfig()
    over = {"alpha": args.alpha, "temperature": args.temperature}
    dcfg = DistillConfig.from_dict(
        {**dcfg.to_dict(), **{k: v for k, v in over.items() if v is not None}}
    )
    teacher = mlflow.pyfunc.load_model(teacher_uri).unwrap_python_model().predictor
    cfg = _load_config(spec, args.config)
    cfg_dict = tracking.config_dict(cfg)
    if launched_as_secondary_rank():  # see pipelines.lifecycle.train_register_promote
        hook(cfg, teacher, run=None, distill_cfg=dcfg)
        return 0
    with tracking.start_run(
        f"keel-{spec.name}",
        config={**cfg_dict, "distill": dcfg.to_dict()},
        run_name=f"{spec.name}-distill",
        tags={"keel.distilled_from": teacher_uri},
    ) as run:
        result = hook(cfg, teacher, run=run, distill_cfg=dcfg)
        card_extra = {"distilled_from": teacher_uri, "distill_config": dcfg.to_dict()}
        version = register_result(spec, result, name, card_extra)
        mlflow.MlflowClient().set_model_version_tag(
            name, version, "keel.distilled_from", teacher_uri
        )
        run_id = run.info.run_id
    print(f"{name} v{version} (challenger, distilled from {teacher_uri}); run {run_id}")
    print(f"protocol: {result.evaluation.protocol}")
    _print_table(
        [{"metric": k, "value": round(v, 4)} for k, v in result.evaluation.metrics.items()]
    )
    return 0


def _add_select_parser(asub: Any) -> None:
    p = asub.add_parser(
        "select",
        help="choose among candidate recipes on the app's validation folds (never test data);"
        " logs every fold to MLflow and writes the winner's config",
    )
    p.add_argument("--config", default=None, help="the base config YAML (default: the demo's)")
    p.add_argument(
        "--candidates",
        required=True,
        help="YAML: candidates (name -> dotted-key overrides), optional metric and folds",
    )
    p.add_argument("--folds", type=int, default=None, help="default: the file's, else the app's")
    p.add_argument("--metric", default=None, help="default: the file's, else the app's")
    p.add_argument("--jobs", type=int, default=1, help="fits at once (processes)")
    p.add_argument("--output", default=None, help="write the winning config here (YAML)")


def _select(spec: Any, args: argparse.Namespace) -> int:
    """Candidates -> the app's fold protocol -> one MLflow run with every fold's figures,
    the table, the winner's config as an artifact (and at ``--output``)."""
    import os
    import tempfile
    from pathlib import Path

    import mlflow
    import pandas as pd
    import yaml

    from core.configio import load_candidates

    if spec.select is None:
        print(f"the {spec.name} app has no model selection (AppSpec.select)", file=sys.stderr)
        return 2
    grid = load_candidates(args.candidates)
    cfg = _load_config(spec, args.config)
    folds = args.folds or grid["folds"]
    metric = args.metric or grid["metric"]
    cfg_dict = tracking.config_dict(cfg)
    with tracking.start_run(
        f"keel-{spec.name}",
        config={**cfg_dict, "select": {"candidates": grid["candidates"], "folds": folds}},
        run_name=f"{spec.name}-select",
    ) as run:
        result = spec.select(
            cfg,
            grid["candidates"],
            n_folds=folds,
            metric=metric,
            jobs=args.jobs,
            progress=lambda msg: print(msg, flush=True),  # fits take minutes each
        )
        m = result.metric
        for i, s in enumerate(result.summary):
            mlflow.log_metric(f"select/{i}/mean_{m}", s[f"mean_{m}"])
            for f, v in enumerate(s["per_fold"]):
                mlflow.log_metric(f"select/{i}/fold{f}_{m}", v)
        names = {str(i): s["candidate"] for i, s in enumerate(result.summary)}
        mlflow.set_tags(
            {"keel.selected": result.best, "keel.select_protocol": result.protocol[:5000]}
        )
        mlflow.log_dict(names, "selection/candidate_index.json")
        mlflow.log_dict({"summary": result.summary, "rows": result.rows}, "selection/result.json")
        flat = [
            {"candidate": r["candidate"], "fold": r["fold"], **r.get("metrics", {})}
            for r in result.rows
        ]
        mlflow.log_table(pd.DataFrame(flat), "selection/folds.json")
        best_dict = result.best_config.to_dict()
        mlflow.log_dict(best_dict, "selection/best_config.yaml")
        run_id = run.info.run_id
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# chosen by keel {spec.name} select (run {run_id}): {result.best}\n")
            yaml.safe_dump(best_dict, fh, sort_keys=False)
        os.replace(tmp, out)
    print(f"protocol: {result.protocol}")
    _print_table(
        [
            {
                "candidate": s["candidate"],
                f"mean_{m}": round(s[f"mean_{m}"], 4),
                f"sd_{m}": round(s[f"sd_{m}"], 4),
                "per_fold": " / ".join(f"{v:.4f}" for v in s["per_fold"]),
            }
            for s in result.summary
        ]
    )
    print(
        f"selected: {result.best}; run {run_id}"
        + (f"; config -> {args.output}" if args.output else "")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel", description="Keel: train, evaluate, register and score."
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: ./mlflow.db)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("apps", help="list the installed apps")

    for app in discover_apps():
        ap = sub.add_parser(app, help=f"the {app} app")
        asub = ap.add_subparsers(dest="action", required=True)
        t = asub.add_parser(
            "train", help="train, evaluate, register as challenger, promote if better"
        )
        t.add_argument("--config", default=None)
        t.add_argument("--margin", type=float, default=0.0)
        t.add_argument("--no-promote", action="store_true")
        e = asub.add_parser("evaluate", help="evaluate a registered model under the app's protocol")
        e.add_argument("--model", default=None)
        e.add_argument("--config", default=None)
        s = asub.add_parser("score", help="batch-score a file with a registered model")
        _add_score_args(s, model_required=False)
        _add_distill_parser(asub)
        _add_select_parser(asub)

    s = sub.add_parser("score", help="batch-score a file with any registered model")
    _add_score_args(s, model_required=True)

    m = sub.add_parser("models", help="the model registry")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    sh = msub.add_parser("show")
    sh.add_argument("name")
    pr = msub.add_parser("promote")
    pr.add_argument("name")
    pr.add_argument("version")
    rb = msub.add_parser("rollback")
    rb.add_argument("name")
    return parser


def _score(args: argparse.Namespace, default_model: str | None = None) -> int:
    if args.engine == "spark":
        from pipelines.spark_score import spark_score

        report = spark_score(
            args.model or default_model,
            args.input,
            args.output,
            rejects_path=args.rejects,
            master=args.spark_master,
            mode=args.spark_mode,
            env_manager=args.env_manager,
            overwrite=args.overwrite,
        )
        print(json.dumps(vars(report), indent=1, default=str))
        return 0
    from pipelines.score import score

    report = score(
        args.model or default_model,
        args.input,
        args.output,
        rejects_path=args.rejects,
        chunk_rows=args.chunk_rows,
        progress=not args.no_progress,
    )
    print(json.dumps({k: v for k, v in vars(report).items()}, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    uri = tracking.configure(args.tracking_uri)

    if args.command == "apps":
        for name in discover_apps():
            print(f"{name}: {load_app_spec(name).description}")
        return 0
    if args.command == "score":
        return _score(args)
    if args.command == "models":
        from pipelines import registry

        if args.action == "list":
            _print_table(registry.list_models())
        elif args.action == "show":
            rows = registry.show(args.name)
            _print_table(
                [
                    {
                        k: (v if k != "metrics" else {m: round(x, 4) for m, x in v.items()})
                        for k, v in r.items()
                        if k != "tags"
                    }
                    for r in rows
                ]
            )
        elif args.action == "promote":
            registry.promote(args.name, args.version)
            print(f"{args.name}: champion -> v{args.version}")
        elif args.action == "rollback":
            v = registry.rollback(args.name)
            print(f"{args.name}: champion rolled back to v{v}")
        return 0

    spec = load_app_spec(args.command)
    if args.action == "train":
        from pipelines.lifecycle import train_register_promote

        rep = train_register_promote(
            spec.name,
            _load_config(spec, args.config),
            margin=args.margin,
            auto_promote=not args.no_promote,
        )
        if not rep.version:  # a secondary rank of a multi-GPU run: rank 0 reports
            return 0
        print(
            f"{rep.model_name} v{rep.version} ({'champion' if rep.promoted else 'challenger'}); "
            f"run {rep.run_id}"
        )
        print(f"protocol: {rep.protocol}")
        _print_table([{"metric": k, "value": round(v, 4)} for k, v in rep.metrics.items()])
        for r in rep.reasons:
            print(" -", r)
        print(f"look: mlflow ui --backend-store-uri {uri}")
        return 0
    if args.action == "evaluate":
        import mlflow

        from pipelines.registry import model_name

        uri_model = args.model or f"models:/{model_name(spec.name)}@champion"
        predictor = mlflow.pyfunc.load_model(uri_model).unwrap_python_model().predictor
        result = spec.evaluate(predictor, _load_config(spec, args.config))
        print(f"protocol: {result.protocol}")
        _print_table([{"metric": k, "value": round(v, 4)} for k, v in result.metrics.items()])
        return 0
    if args.action == "score":
        from pipelines.registry import model_name

        return _score(args, default_model=f"models:/{model_name(spec.name)}@champion")
    if args.action == "distill":
        return _distill(spec, args)
    if args.action == "select":
        return _select(spec, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
