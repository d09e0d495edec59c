"""``bench.fraud_bench --refit``: where the refit run's figures land in the results."""

from __future__ import annotations

from bench.fraud_bench import KEYS, refit_keys


def test_without_refit_the_usual_keys():
    assert refit_keys("pr_auc", "ulb_ap", refit=False) == [("pr_auc", "ulb_ap")]


def test_refit_records_step_one_under_the_usual_key_and_refit_beside_it():
    got = refit_keys("baseline/pr_auc", KEYS["ulb"]["baseline/pr_auc"], refit=True)
    assert got == [
        ("no_refit/baseline/pr_auc", "ulb_ap_lightgbm"),
        ("baseline/pr_auc", "ulb_ap_lightgbm_refit"),
    ]
    keys = [k for metric, key in KEYS["handbook"].items() for _, k in refit_keys(metric, key, True)]
    assert len(set(keys)) == 2 * len(KEYS["handbook"])


def test_seeds_record_the_mean_of_real_per_seed_runs(tmp_path, monkeypatch):
    """``--seeds``: one real fit per seed (the demo config, one epoch); the recorded mean and
    sd are those of the per-seed figures, the seeds give different models, and the paired
    backbone - LightGBM difference is computed from the same runs."""
    import json
    import statistics

    from bench.fraud_bench import main

    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    argv = ["--only", "handbook", "--handbook-config", "demo", "--epochs", "1"]
    assert main([*argv, "--seeds", "0", "1", "--threads", "1"]) == 0
    res = json.loads((tmp_path / "fraud.json").read_text())
    ap = res["handbook_ap_seeds_mean"]
    per_seed = [r["metrics"]["pr_auc"] for r in ap["details"]["runs"]]
    assert ap["details"]["seeds"] == [0, 1] and ap["details"]["per_seed"] == per_seed
    assert per_seed[0] != per_seed[1]  # the seed reaches the model
    assert ap["value"] == statistics.fmean(per_seed)
    assert ap["details"]["sd"] == statistics.stdev(per_seed)
    lgb = [r["metrics"]["baseline/pr_auc"] for r in ap["details"]["runs"]]
    assert res["handbook_ap_lightgbm_seeds_mean"]["value"] == statistics.fmean(lgb)
    paired = ap["details"]["backbone_minus_lightgbm_pr_auc"]
    assert paired["mean"] == statistics.fmean([a - b for a, b in zip(per_seed, lgb, strict=True)])
    assert paired["backbone_wins"] == sum(a > b for a, b in zip(per_seed, lgb, strict=True))
    assert "handbook_ap" not in res  # the single-run headline keys are left alone
