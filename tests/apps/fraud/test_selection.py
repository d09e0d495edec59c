"""Prequential model selection (apps/fraud/selection.py): folds never reach the test split,
candidates are real configs, the winner is the best mean fold metric, and ``keel fraud
select`` logs every fold to a real sqlite MLflow store and writes the winner's config."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from apps.fraud.config import FraudConfig, demo_config, load_config
from apps.fraud.errors import FraudConfigError, FraudDataError
from apps.fraud.schema import TS
from apps.fraud.selection import _summary, fold_configs, select
from apps.fraud.splits import time_fraction_split
from apps.fraud.training import load_data, protocol_split
from core.configio import load_candidates

torch.set_num_threads(1)


def test_handbook_folds_assess_the_weeks_before_the_test_split_and_never_its_days():
    cfg = load_config("handbook")  # 7 train days from 2018-07-25, 7 delay, 7 test
    folds = fold_configs(cfg, n_folds=3)
    starts = [date.fromisoformat(f.config.protocol.train_start) for f in folds]
    assert starts == [date(2018, 7, 11), date(2018, 7, 4), date(2018, 6, 27)]
    # assessed weeks tile backwards from the test split's first delay day (08-01, exclusive)
    assert [f.assesses for f in folds] == [
        "days 2018-07-25..2018-07-31",
        "days 2018-07-18..2018-07-24",
        "days 2018-07-11..2018-07-17",
    ]
    # everything else of the recipe is the base config's
    for f in folds:
        assert f.config.model == cfg.model and f.config.head == cfg.head
        assert f.config.protocol.test_days == cfg.protocol.test_days


def test_handbook_fold_rows_end_before_the_test_splits_delay_block():
    cfg = demo_config()  # 14 train days from 2018-05-01 (last 3 validate), 7 delay, 7 test
    data = load_data(cfg)
    first_delay_day = data.split.bounds["delay"][0]
    assert first_delay_day == date(2018, 5, 15)
    for fold in fold_configs(cfg, n_folds=2):
        fd = load_data(fold.config)
        s = fd.split
        for part in (s.train, s.valid, s.test):
            assert len(part) and fd.days[part].max() < first_delay_day
        # assessment is after the fold's delay block, training before it
        assert fd.days[s.train].max() < s.bounds["delay"][0] <= fd.days[s.test].min()
    # fold 0 assesses exactly the test split's training week that precedes the delay block
    f0 = load_data(fold_configs(cfg, 1)[0].config).split
    assert f0.bounds["test"] == (date(2018, 5, 8), date(2018, 5, 15))


def _ulb_like(hours: int = 48) -> pl.DataFrame:
    ts = [datetime(2013, 9, 1) + timedelta(minutes=10 * i) for i in range(hours * 6)]
    return pl.DataFrame({TS: ts})


def test_time_fraction_folds_tile_the_training_range_and_stop_at_its_end():
    cfg = load_config("ulb")
    folds = fold_configs(cfg, n_folds=3, assess_frac=0.1)
    got = [(f.config.protocol.train_frac, f.config.protocol.test_end_frac) for f in folds]
    assert got == [(0.6, 0.7), (0.5, 0.6), (0.4, 0.5)]
    frame = _ulb_like()
    main = time_fraction_split(frame, train_frac=0.7, valid_frac=0.2)
    cut = frame[TS].to_numpy()[main.test.min()]
    t = frame[TS].to_numpy()
    covered = []
    for f in folds:
        s = protocol_split(frame, None, f.config)  # schema unused by time_fraction
        assert t[s.test].max() < cut and t[s.train].max() < t[s.valid].min()
        assert t[s.valid].max() < t[s.test].min()
        covered.append(s.test)
    # the assessed slices are disjoint and adjacent: together the 40-70 % of the range
    allrows = np.sort(np.concatenate(covered))
    assert len(np.unique(allrows)) == len(allrows)
    assert np.array_equal(allrows, np.arange(allrows.min(), allrows.max() + 1))
    assert t[allrows.max()] < cut
    with pytest.raises(FraudConfigError, match="fold 6 would train on the first 0%"):
        fold_configs(cfg, n_folds=7, assess_frac=0.1)


def test_time_fraction_split_test_end_and_bad_fractions():
    frame = _ulb_like()
    full = time_fraction_split(frame, train_frac=0.7, valid_frac=0.2)
    part = time_fraction_split(frame, train_frac=0.7, valid_frac=0.2, test_end_frac=0.85)
    assert np.array_equal(full.train, part.train) and np.array_equal(full.valid, part.valid)
    assert 0 < len(part.test) < len(full.test) and np.array_equal(
        part.test, full.test[: len(part.test)]
    )
    assert "up to 85% of it tests" in part.protocol and "the rest tests" in full.protocol
    with pytest.raises(FraudDataError, match="train_frac < test_end_frac"):
        time_fraction_split(frame, train_frac=0.7, test_end_frac=0.7)


def test_overrides_rebuild_the_config_and_reject_unknown_fields():
    cfg = demo_config()
    new = cfg.with_overrides({"model.dropout": 0.3, "optim.lr": 3e-4, "trainer.max_epochs": 2})
    assert isinstance(new, FraudConfig) and new.model.dropout == 0.3 and new.optim.lr == 3e-4
    assert new.trainer.max_epochs == 2 and cfg.model.dropout == 0.1  # the base is untouched
    with pytest.raises(KeyError, match="no field 'droput' in model"):
        cfg.with_overrides({"model.droput": 0.3})
    with pytest.raises(KeyError, match="'modle' is not a config section"):
        cfg.with_overrides({"modle.dropout": 0.3})
    with pytest.raises(Exception, match="weight_average"):  # the config's own checks run
        cfg.with_overrides({"head.weight_average": "median"})


def test_candidates_file_is_validated(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("metric: pr_auc\nfolds: 2\ncandidates:\n  a: {}\n  b: {optim.lr: 0.1}\n  c:\n")
    g = load_candidates(good)
    assert list(g["candidates"]) == ["a", "b", "c"] and g["candidates"]["c"] == {}
    assert g["folds"] == 2 and g["metric"] == "pr_auc"
    for text, msg in [
        ("candidates: []\n", "'candidates' mapping"),
        ("candidates: {}\n", "'candidates' is empty"),
        ("candidates: {a: 3}\n", "candidate 'a': expected a mapping"),
        ("folds: 0\ncandidates: {a: {}}\n", "folds must be an integer >= 1"),
        ("fold: 2\ncandidates: {a: {}}\n", "unknown top-level key"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_candidates(bad)


def test_summary_means_sds_and_folds_won():
    rows = [
        {"candidate": c, "fold": f, "metrics": {"pr_auc": v}}
        for c, vals in {"a": [0.5, 0.9], "b": [0.7, 0.6]}.items()
        for f, v in enumerate(vals)
    ]
    s = _summary(["a", "b"], {"a": {}, "b": {"x": 1}}, rows, "pr_auc")
    assert s[0]["mean_pr_auc"] == pytest.approx(0.7) and s[1]["mean_pr_auc"] == pytest.approx(0.65)
    assert s[0]["sd_pr_auc"] == pytest.approx(np.std([0.5, 0.9], ddof=1))
    assert [x["folds_won"] for x in s] == [1, 1] and s[1]["overrides"] == {"x": 1}
    rows[3]["metrics"]["pr_auc"] = float("nan")  # e.g. an assessed block without frauds
    with pytest.raises(FraudDataError, match="candidate 'b', fold 1: no finite pr_auc"):
        _summary(["a", "b"], {"a": {}, "b": {}}, rows, "pr_auc")


def test_select_rejects_bad_metric_and_candidates():
    cfg = demo_config()
    with pytest.raises(FraudConfigError, match="metric must be one of"):
        select(cfg, {"a": {}}, metric="accuracy")
    with pytest.raises(FraudConfigError, match="candidate 'b'"):
        select(cfg, {"a": {}, "b": {"model.nope": 1}})
    assert "card_precision_at_20" in str(
        pytest.raises(
            FraudConfigError, select, load_config("ulb"), {"a": {}}, metric="card_precision_at_20"
        ).value
    )


@pytest.mark.slow
def test_keel_fraud_select_logs_folds_and_writes_the_winner(tmp_path, capsys, sqlite_store):
    from pipelines.cli import main

    small = {"trainer.max_epochs": 1, "model.n_layers": 1, "model.n_dense_layers": 1}
    base = demo_config().with_overrides({**small, "model.d_model": 16, "head.history_len": 4})
    base_yaml = tmp_path / "base.yaml"
    base.to_yaml(base_yaml)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "metric: pr_auc\nfolds: 2\ncandidates:\n  shipped: {}\n"
        "  wide_lr: {optim.lr: 0.01, model.dropout: 0.3}\n"
    )
    uri = sqlite_store(tmp_path)
    out = tmp_path / "chosen" / "best.yaml"
    argv = ["--tracking-uri", uri, "fraud", "select", "--config", str(base_yaml)]
    assert main([*argv, "--candidates", str(grid), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prequential model selection on synthetic: 2 folds" in printed
    assert "[1/4] shipped fold" in printed and "[4/4] wide_lr fold" in printed  # progress

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["keel-fraud"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    m = run.data.metrics
    means = [m["select/0/mean_pr_auc"], m["select/1/mean_pr_auc"]]
    for i in (0, 1):
        folds = [m[f"select/{i}/fold{f}_pr_auc"] for f in (0, 1)]
        assert 0 < min(folds) and max(folds) <= 1
        assert means[i] == pytest.approx(np.mean(folds))
    assert means[0] != means[1]  # two recipes, two different sets of models
    winner = ["shipped", "wide_lr"][int(np.argmax(means))]
    assert run.data.tags["keel.selected"] == winner
    assert f"selected: {winner}" in printed

    result = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/selection/result.json")
    rows = result["rows"]
    assert [(r["candidate"], r["fold"]) for r in rows] == [
        ("shipped", 0),
        ("shipped", 1),
        ("wide_lr", 0),
        ("wide_lr", 1),
    ]
    # LightGBM runs once per fold (with the first candidate): it does not depend on the recipe
    assert ["baseline/pr_auc" in r["metrics"] for r in rows] == [True, True, False, False]
    assert all(r["assess_frauds"] > 0 and r["valid_frauds"] > 0 for r in rows)
    # the written config is the base with the winner's overrides, and it loads
    chosen = FraudConfig.from_yaml(out)
    want = base.with_overrides(
        {} if winner == "shipped" else {"optim.lr": 0.01, "model.dropout": 0.3}
    )
    assert chosen.to_dict() == want.to_dict()
    assert not list(out.parent.glob(".*.tmp"))


def test_every_shipped_candidates_file_applies_to_its_base_config():
    """Each ``configs/*_candidates.yaml`` names real config keys of the recipe it varies
    (``ulb_*`` -> ulb.yaml, ``handbook_*`` -> handbook.yaml), so a selection run cannot
    fail, or silently vary nothing, after a config change."""
    from pathlib import Path

    configs_dir = Path(__file__).resolve().parents[3] / "apps" / "fraud" / "configs"
    files = sorted(configs_dir.glob("*_candidates.yaml"))
    assert len(files) >= 5
    for path in files:
        base = load_config(path.name.split("_")[0])
        spec = load_candidates(path)
        configs = [base.with_overrides(o) for o in spec["candidates"].values()]
        assert len(configs) >= 2, path
