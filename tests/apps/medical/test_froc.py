"""LUNA16 FROC rules, one hand-made case per rule, with exact expected numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from apps.medical.errors import CandidateError
from apps.medical.froc import (
    FP_RATES,
    evaluate_froc,
    froc_curve,
    limit_candidates_per_scan,
    match_candidates,
    plot_froc,
    read_candidates,
    sensitivity_at_fp_rates,
    write_candidates,
)

COLS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


def nodules(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=COLS)


def cands(*rows) -> pd.DataFrame:
    return pd.DataFrame(
        list(rows), columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    )


def status(result) -> list[str]:
    return result.candidates["status"].tolist()


def test_hit_requires_squared_distance_strictly_below_radius_squared():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 10.0))  # radius 5, radius^2 = 25
    on_sphere = cands(("s1", 3.0, 4.0, 0.0, 0.9))  # d^2 = 25 exactly: not a hit
    inside = cands(("s1", 3.0, 3.9, 0.0, 0.9))  # d^2 = 24.21: hit
    r_on = evaluate_froc(on_sphere, ann, ["s1"])
    assert status(r_on) == ["fp"] and r_on.n_detected == 0 and r_on.n_false_positives == 1
    r_in = evaluate_froc(inside, ann, ["s1"])
    assert status(r_in) == ["tp"] and r_in.n_detected == 1 and r_in.n_false_positives == 0


def test_negative_diameter_means_10_mm():
    ann = nodules(("s1", 10.0, 10.0, 10.0, -1.0))
    c = cands(("s1", 14.9, 10.0, 10.0, 0.8), ("s1", 10.0, 15.0, 10.0, 0.7))  # 4.9 mm, 5.0 mm
    r = evaluate_froc(c, ann, ["s1"])
    assert status(r) == ["tp", "fp"]
    exc_only = evaluate_froc(c, nodules(("s1", 100.0, 0, 0, 5.0)), ["s1"], excluded=ann)
    assert status(exc_only) == ["excluded", "fp"]


def test_best_hit_is_tp_other_hits_ignored():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 8.0))
    c = cands(("s1", 1.0, 0, 0, 0.3), ("s1", 0, 1.0, 0, 0.9), ("s1", 0, 0, 1.0, 0.5))
    r = evaluate_froc(c, ann, ["s1"])
    assert status(r) == ["duplicate", "tp", "duplicate"]
    assert r.n_false_positives == 0 and r.n_detected == 1
    assert r.nodules["probability"].tolist() == [0.9]
    np.testing.assert_array_equal(r.fps_per_scan, [0.0, 0.0])
    np.testing.assert_array_equal(r.sensitivity, [0.0, 1.0])
    np.testing.assert_array_equal(r.thresholds, [np.inf, 0.9])
    assert r.cpm == 1.0


def test_hit_on_excluded_finding_is_ignored_but_nodule_hit_wins():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0))
    exc = nodules(("s1", 50.0, 0.0, 0.0, 4.0), ("s1", 1.0, 0.0, 0.0, 6.0))
    c = cands(
        ("s1", 51.0, 0.0, 0.0, 0.95),  # excluded finding only: ignored
        ("s1", 0.5, 0.0, 0.0, 0.6),  # nodule and excluded: the nodule's TP
        ("s1", -20.0, 0.0, 0.0, 0.4),  # nothing: FP
    )
    r = evaluate_froc(c, ann, ["s1"], excluded=exc)
    assert status(r) == ["excluded", "tp", "fp"]
    assert r.n_false_positives == 1 and r.n_detected == 1
    # without the exclusion list the first candidate is an FP
    r2 = evaluate_froc(c, ann, ["s1"])
    assert status(r2) == ["fp", "tp", "fp"] and r2.n_false_positives == 2


def test_fps_are_divided_by_all_listed_scans():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0))
    c = cands(("s1", 0.0, 0.0, 0.0, 0.9), ("s1", 40.0, 0, 0, 0.5), ("s1", 80.0, 0, 0, 0.4))
    r = evaluate_froc(c, ann, ["s1", "s2", "s3", "s4"])  # s2..s4 have no candidates
    assert r.n_scans == 4
    np.testing.assert_array_equal(r.fps_per_scan, [0.0, 0.0, 0.25, 0.5])
    np.testing.assert_array_equal(r.sensitivity, [0.0, 1.0, 1.0, 1.0])
    # a duplicated uid in the list does not count twice
    assert evaluate_froc(c, ann, ["s1", "s2", "s2"]).n_scans == 2


def test_missed_nodules_stay_in_denominator():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0), ("s1", 100.0, 0, 0, 6.0), ("s2", 0.0, 0, 0, 6.0))
    c = cands(("s1", 0.0, 0.0, 0.0, 0.9))
    r = evaluate_froc(c, ann, ["s1", "s2"])
    assert r.n_nodules == 3 and r.n_detected == 1
    assert r.nodules["detected"].tolist() == [True, False, False]
    np.testing.assert_allclose(r.sensitivity_at, np.full(7, 1 / 3))
    assert r.cpm == pytest.approx(1 / 3, abs=1e-15)


def test_at_most_100_candidates_per_scan_ties_at_cut_dropped():
    # 101 candidates: the nodule's hit has the lowest score, so the cap drops it
    fp = [("s1", 1000.0 + 20 * i, 0.0, 0.0, 0.5 + i / 1000) for i in range(100)]
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0))
    r = evaluate_froc(cands(*fp, ("s1", 0.0, 0.0, 0.0, 0.1)), ann, ["s1"])
    assert r.n_detected == 0 and r.n_false_positives == 100
    assert status(r)[-1] == "over_limit"
    # with the cap disabled (0) the nodule is found
    r_all = evaluate_froc(
        cands(*fp, ("s1", 0.0, 0.0, 0.0, 0.1)), ann, ["s1"], max_candidates_per_scan=0
    )
    assert r_all.n_detected == 1
    # official tie rule: keep scores strictly above the 101st highest
    probs = np.array([0.9] * 98 + [0.5, 0.5, 0.5, 0.1])
    keep = limit_candidates_per_scan(probs, 100)
    assert keep.sum() == 98 and not keep[98:].any()
    assert limit_candidates_per_scan(probs[:100], 100).all()  # exactly 100: all kept


def test_candidate_hitting_two_nodules_detects_both():
    # official script semantics: the mark is in both nodules' match lists
    ann = nodules(("s1", 0.0, 0.0, 0.0, 10.0), ("s1", 4.0, 0.0, 0.0, 10.0))
    r = evaluate_froc(cands(("s1", 2.0, 0.0, 0.0, 0.7)), ann, ["s1"])
    assert r.n_detected == 2 and r.n_false_positives == 0
    assert r.nodules["probability"].tolist() == [0.7, 0.7]
    assert r.cpm == 1.0


def test_unlisted_scans_are_ignored_and_nodules_outside_list_dropped():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0), ("zz", 0.0, 0.0, 0.0, 6.0))
    c = cands(("s1", 0.0, 0.0, 0.0, 0.9), ("zz", 50.0, 0, 0, 0.99))
    r = evaluate_froc(c, ann, ["s1"])
    assert status(r) == ["tp", "unlisted_scan"]
    assert r.n_nodules == 1 and r.n_false_positives == 0


def test_curve_and_cpm_linear_versus_step():
    # 1 scan, 2 nodules: TP at 0.9; at 0.5 a TP and an FP tie -> a diagonal segment
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0), ("s1", 100.0, 0.0, 0.0, 6.0))
    c = cands(("s1", 0.0, 0, 0, 0.9), ("s1", 100.0, 0, 0, 0.5), ("s1", 50.0, 0, 0, 0.5))
    lin = evaluate_froc(c, ann, ["s1"])
    np.testing.assert_array_equal(lin.fps_per_scan, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(lin.sensitivity, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(lin.thresholds, [np.inf, 0.9, 0.5])
    np.testing.assert_allclose(lin.sensitivity_at, [0.5625, 0.625, 0.75, 1, 1, 1, 1])
    assert lin.cpm == pytest.approx(5.9375 / 7, abs=1e-15)
    step = evaluate_froc(c, ann, ["s1"], interpolation="step")
    np.testing.assert_allclose(step.sensitivity_at, [0.5, 0.5, 0.5, 1, 1, 1, 1])
    assert step.cpm == pytest.approx(5.5 / 7, abs=1e-15)
    # vertical segment (TPs only between two FP counts): the top value at that rate
    fps, sens, _ = froc_curve(np.array([0.9, 0.7]), np.array([0.8, 0.6]), n_nodules=2, n_scans=2)
    np.testing.assert_array_equal(fps, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(sens, [0.0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(
        sensitivity_at_fp_rates(fps, sens, FP_RATES), [0.5, 0.5, 1, 1, 1, 1, 1]
    )


def _official_curve(gt, prob, n_images, n_nodules):
    """The official computeFROC (sklearn roc_curve) on the same FROC vectors."""
    fpr, tpr, _ = roc_curve(gt, prob)
    detected = int(np.sum(gt))
    fps = fpr * (len(gt) - detected) / n_images
    sens = tpr * detected / n_nodules
    return fps, sens


def test_matches_official_roc_based_computation_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(25):
        n_scans = int(rng.integers(1, 6))
        uids = [f"s{i}" for i in range(n_scans)]
        ann = nodules(
            *[
                (str(rng.choice(uids)), *rng.uniform(0, 200, 3), float(rng.uniform(4, 20)))
                for _ in range(8)
            ]
        )
        rows = []
        for _ in range(int(rng.integers(5, 60))):
            prob = float(np.round(rng.uniform(), 2))  # rounding makes ties
            if rng.random() < 0.4:  # near a nodule
                nod = ann.iloc[int(rng.integers(len(ann)))]
                xyz = nod[["coordX", "coordY", "coordZ"]].to_numpy(float) + rng.normal(0, 3, 3)
                rows.append((nod["seriesuid"], *xyz, prob))
            else:
                rows.append((str(rng.choice(uids)), *rng.uniform(0, 200, 3), prob))
        r = evaluate_froc(cands(*rows), ann, uids)
        if r.n_detected == 0 or r.n_false_positives == 0:
            continue
        labels = np.r_[np.ones(r.n_detected), np.zeros(r.n_false_positives)]
        scores = np.r_[
            r.nodules.loc[r.nodules["detected"], "probability"],
            r.candidates.loc[r.candidates["status"] == "fp", "probability"],
        ]
        fps, sens = _official_curve(labels, scores, n_scans, r.n_nodules)
        grid = np.linspace(0.125, 8, 10001)
        np.testing.assert_allclose(
            sensitivity_at_fp_rates(r.fps_per_scan, r.sensitivity, grid),
            np.interp(grid, fps, sens),
            atol=1e-12,
        )
        np.testing.assert_allclose(r.sensitivity_at, np.interp(FP_RATES, fps, sens), atol=1e-12)


def test_errors_and_metrics_dict(tmp_path):
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0))
    bad = cands(("s1", 0.0, "abc", 0.0, 0.9))
    with pytest.raises(CandidateError, match="row 0 column coordY"):
        evaluate_froc(bad, ann, ["s1"])
    with pytest.raises(CandidateError, match="missing column"):
        evaluate_froc(pd.DataFrame({"seriesuid": ["s1"]}), ann, ["s1"])
    r = evaluate_froc(cands(("s1", 0.0, 0.0, 0.0, 0.9)), ann, ["s1"])
    m = r.metrics("val/")
    assert m["val/cpm"] == 1.0 and m["val/sens_at_0.125_fp"] == 1.0 and m["val/n_scans"] == 1.0
    path = write_candidates(cands(("s1", 1.5, -2.25, 3.0, 0.75)), tmp_path / "sub" / "cands.csv")
    back = read_candidates(path)
    assert back.iloc[0].tolist() == ["s1", 1.5, -2.25, 3.0, 0.75]
    assert not list((tmp_path / "sub").glob(".*tmp"))
    path.write_text(path.read_text() + "s2,1,2,x,0.5\n")
    with pytest.raises(CandidateError, match="cands.csv: row 3 column coordZ: 'x'"):
        read_candidates(path)


def test_match_candidates_returns_per_nodule_scores():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0), ("s1", 30.0, 0.0, 0.0, 6.0))
    c, n = match_candidates(cands(("s1", 30.0, 1.0, 0.0, 0.4)), ann, ["s1"])
    assert c["status"].tolist() == ["tp"]
    assert n["detected"].tolist() == [False, True]
    assert np.isnan(n["probability"].iloc[0]) and n["probability"].iloc[1] == 0.4


def test_plot_froc_returns_log_x_figure():
    ann = nodules(("s1", 0.0, 0.0, 0.0, 6.0), ("s1", 100.0, 0.0, 0.0, 6.0))
    c = cands(("s1", 0.0, 0, 0, 0.9), ("s1", 50.0, 0, 0, 0.5))
    r = evaluate_froc(c, ann, ["s1"])
    fig = plot_froc([r, r], labels=["a", "b"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlim() == pytest.approx((0.125, 8.0))
    assert len(ax.lines) == 4  # a curve and its 7 CPM points per result
    np.testing.assert_allclose(ax.lines[1].get_ydata(), r.sensitivity_at)
