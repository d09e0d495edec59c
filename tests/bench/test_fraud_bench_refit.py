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
