"""LUNA16 FROC and CPM, following the official ``noduleCADEvaluationLUNA16.py`` exactly.

Protocol (Setio et al., MedIA 2017; the official evaluation script):

* Scans: every series UID of the evaluation list counts, also scans without candidates;
  candidates of scans not in the list are ignored.
* At most 100 candidates per scan. As the official script: when a scan has more than 100,
  the 101st highest probability ``p101`` is found and only candidates with probability
  strictly greater than ``p101`` are kept, so candidates tied with ``p101`` are all dropped
  (a scan may keep fewer than 100).
* Hit: a candidate hits a finding when its squared distance to the finding's centre is
  strictly less than ``(diameter/2)^2``; a negative diameter (-1 in
  ``annotations_excluded.csv``) means 10 mm (radius 5).
* Each nodule of ``annotations.csv``: detected when hit at least once; the TP score is the
  highest probability among its hits; its other hits are ignored (neither TP nor FP).
  A candidate that hits two nodules counts as a hit for BOTH (the official script only
  prints "This is strange: CAD mark detected two nodules" and keeps it in both match
  lists), so one candidate can detect two nodules.
* A candidate hitting no nodule but an excluded finding is ignored.
* Every other candidate is a false positive (FP).
* Curve: thresholds swept over the scores; sensitivity = detected nodules with TP score
  >= t / all nodules (missed nodules stay in the denominator); FPs per scan = FPs with
  score >= t / number of scans. The curve starts at (0, 0).
* Sensitivity at an FP rate: linear interpolation of that polyline (``np.interp``, what the
  official script does to draw and average its curve); ``interpolation="step"`` instead
  takes the best sensitivity reached at or below the rate.
* CPM: mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs per scan, read off that
  interpolated curve exactly at the seven rates (the official script samples the same
  polyline on ``np.linspace(1/8, 8, 10001)``; tests check both agree).

Differences from the script, all outside the protocol: no bootstrapping; an evaluation
without any nodule raises an error (the script would divide by zero);
``max_candidates_per_scan <= 0`` disables the cap (for analyses; the protocol value is 100).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from apps.medical.errors import AnnotationError, CandidateError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_CANDIDATES_PER_SCAN = 100
UNKNOWN_DIAMETER_MM = 10.0
CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
_XYZ = ["coordX", "coordY", "coordZ"]


@dataclass
class FROCResult:
    """FROC curve, operating points and the bookkeeping that produced them.

    ``candidates``: the input rows plus ``status`` (``tp``: the best hit of at least one
    nodule, ``duplicate``: another hit on a detected nodule, ``excluded``: hit an excluded
    finding only, ``fp``, ``over_limit``: beyond the 100 per scan, ``unlisted_scan``: scan not
    in the evaluation list). ``nodules``: the annotations of listed scans plus
    ``detected`` and ``probability`` (the TP score, NaN when missed).
    """

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    fp_rates: tuple[float, ...]
    sensitivity_at: np.ndarray
    cpm: float
    n_scans: int
    n_nodules: int
    n_detected: int
    n_false_positives: int
    interpolation: str
    candidates: pd.DataFrame = field(repr=False)
    nodules: pd.DataFrame = field(repr=False)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics dict (for MLflow): CPM, sensitivity at each FP rate, counts."""
        out = {f"{prefix}cpm": self.cpm}
        for rate, sens in zip(self.fp_rates, self.sensitivity_at, strict=True):
            out[f"{prefix}sens_at_{rate:g}_fp"] = float(sens)
        out[f"{prefix}sensitivity_max"] = float(self.n_detected / self.n_nodules)
        out[f"{prefix}fp_per_scan_max"] = float(self.n_false_positives / self.n_scans)
        out[f"{prefix}n_nodules"] = float(self.n_nodules)
        out[f"{prefix}n_scans"] = float(self.n_scans)
        return out


# ----------------------------------------------------------------------------- validation


def validate_candidates(
    candidates: pd.DataFrame, source: str = "candidates", first_row: int = 0
) -> pd.DataFrame:
    """A clean copy of a LUNA16 submission frame, or a :class:`CandidateError` naming the row
    (frame position + ``first_row``; 2 for a CSV with a header, so the row is the file line)."""
    missing = [c for c in CANDIDATE_COLUMNS if c not in candidates.columns]
    if missing:
        raise CandidateError(
            f"{source}: missing column(s) {missing}; expected {','.join(CANDIDATE_COLUMNS)}"
        )
    out = candidates[CANDIDATE_COLUMNS].reset_index(drop=True).copy()
    out["seriesuid"] = out["seriesuid"].astype(str)
    for col in CANDIDATE_COLUMNS[1:]:
        values = pd.to_numeric(out[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            i = int(bad[0])
            raise CandidateError(
                f"{source}: row {i + first_row} column {col}: {candidates[col].iloc[i]!r} is not "
                "a finite number"
            )
        out[col] = values
    return out


def read_candidates(path: str | Path) -> pd.DataFrame:
    """Read a LUNA16 submission CSV (``seriesuid,coordX,coordY,coordZ,probability``)."""
    path = Path(path)
    if not path.is_file():
        raise CandidateError(f"{path} does not exist; expected a LUNA16 submission CSV")
    frame = pd.read_csv(path, dtype={"seriesuid": str})
    return validate_candidates(frame, source=path.name, first_row=2)


def write_candidates(candidates: pd.DataFrame, path: str | Path) -> Path:
    """Write a submission CSV atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    frame = validate_candidates(candidates)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            frame.to_csv(fh, index=False, float_format="%.6f")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _findings(frame: pd.DataFrame | None, name: str) -> pd.DataFrame:
    if frame is None:
        return pd.DataFrame(
            {c: pd.Series(dtype=float) for c in ["seriesuid", *_XYZ, "diameter_mm"]}
        )
    missing = [c for c in ["seriesuid", *_XYZ, "diameter_mm"] if c not in frame.columns]
    if missing:
        raise AnnotationError(f"{name}: missing column(s) {missing}")
    out = frame.reset_index(drop=True).copy()
    out["seriesuid"] = out["seriesuid"].astype(str)
    for col in [*_XYZ, "diameter_mm"]:
        values = pd.to_numeric(out[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise AnnotationError(f"{name}: row {int(bad[0])} column {col} is not a finite number")
        out[col] = values
    return out


# ----------------------------------------------------------------------------- matching


def limit_candidates_per_scan(
    probabilities: np.ndarray, limit: int = MAX_CANDIDATES_PER_SCAN
) -> np.ndarray:
    """Boolean keep-mask for one scan's candidates, the official way.

    With more than ``limit`` candidates, keep only those scoring strictly above the
    ``(limit+1)``-th highest score: ties at the cut are all dropped, as in the official script.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if limit <= 0 or len(probabilities) <= limit:
        return np.ones(len(probabilities), dtype=bool)
    cut = np.sort(probabilities)[::-1][limit]
    return probabilities > cut


def _radius_sq(diameters: np.ndarray) -> np.ndarray:
    d = np.where(diameters < 0.0, UNKNOWN_DIAMETER_MM, diameters)
    return (d / 2.0) ** 2


def _hits(cand_xyz: np.ndarray, find_xyz: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """[n_findings, n_candidates] bool: squared distance strictly below radius^2."""
    dx = find_xyz[:, None, 0] - cand_xyz[None, :, 0]
    dy = find_xyz[:, None, 1] - cand_xyz[None, :, 1]
    dz = find_xyz[:, None, 2] - cand_xyz[None, :, 2]
    return dx * dx + dy * dy + dz * dz < r2[:, None]


def match_candidates(
    candidates: pd.DataFrame,
    annotations: pd.DataFrame,
    seriesuids: Sequence[str],
    excluded: pd.DataFrame | None = None,
    max_candidates_per_scan: int = MAX_CANDIDATES_PER_SCAN,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Label candidates and nodules by the LUNA16 rules (see the module docstring).

    Returns ``(candidates + status, nodules + detected/probability)``.
    """
    cands = validate_candidates(candidates)
    nods = _findings(annotations, "annotations")
    excl = _findings(excluded, "annotations_excluded")
    listed = list(dict.fromkeys(str(s) for s in seriesuids))
    listed_set = set(listed)

    status = np.full(len(cands), "unlisted_scan", dtype=object)
    nods = nods[nods["seriesuid"].isin(listed_set)].reset_index(drop=True)
    detected = np.zeros(len(nods), dtype=bool)
    tp_prob = np.full(len(nods), np.nan)

    cand_groups = cands.groupby("seriesuid", sort=False).indices
    nod_groups = nods.groupby("seriesuid", sort=False).indices
    excl_groups = excl.groupby("seriesuid", sort=False).indices
    cand_xyz_all = cands[_XYZ].to_numpy(dtype=np.float64)
    prob_all = cands["probability"].to_numpy(dtype=np.float64)
    nod_xyz_all = nods[_XYZ].to_numpy(dtype=np.float64)
    nod_r2_all = _radius_sq(nods["diameter_mm"].to_numpy(dtype=np.float64))
    exc_xyz_all = excl[_XYZ].to_numpy(dtype=np.float64)
    exc_r2_all = _radius_sq(excl["diameter_mm"].to_numpy(dtype=np.float64))

    for uid in listed:
        c_idx = np.asarray(cand_groups.get(uid, []), dtype=np.int64)
        if len(c_idx) == 0:
            continue
        keep = limit_candidates_per_scan(prob_all[c_idx], max_candidates_per_scan)
        status[c_idx[~keep]] = "over_limit"
        c_idx = c_idx[keep]
        xyz, prob = cand_xyz_all[c_idx], prob_all[c_idx]
        free = np.ones(len(c_idx), dtype=bool)  # not yet claimed by a nodule or exclusion
        is_tp = np.zeros(len(c_idx), dtype=bool)
        n_idx = np.asarray(nod_groups.get(uid, []), dtype=np.int64)
        if len(n_idx):
            hits = _hits(xyz, nod_xyz_all[n_idx], nod_r2_all[n_idx])
            for row, nodule in enumerate(n_idx):
                matched = np.flatnonzero(hits[row])
                if len(matched) == 0:
                    continue
                best = matched[np.argmax(prob[matched])]  # first of equal maxima, as official
                detected[nodule] = True
                tp_prob[nodule] = prob[best]
                is_tp[best] = True
                free[matched] = False
        e_idx = np.asarray(excl_groups.get(uid, []), dtype=np.int64)
        on_excluded = np.zeros(len(c_idx), dtype=bool)
        if len(e_idx):
            on_excluded = _hits(xyz, exc_xyz_all[e_idx], exc_r2_all[e_idx]).any(axis=0) & free
        local = np.where(
            is_tp, "tp", np.where(~free, "duplicate", np.where(on_excluded, "excluded", "fp"))
        )
        status[c_idx] = local

    out_c = cands.assign(status=status)
    out_n = nods.assign(detected=detected, probability=tp_prob)
    return out_c, out_n


# ----------------------------------------------------------------------------- curve


def froc_curve(
    tp_scores: np.ndarray, fp_scores: np.ndarray, n_nodules: int, n_scans: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fps_per_scan, sensitivity, thresholds)`` from the TP score of each detected nodule
    and the score of each FP; one point per distinct score (descending), starting at
    ``(0, 0)`` with threshold +inf. Missed nodules count only through ``n_nodules``."""
    if n_nodules <= 0:
        raise AnnotationError("no nodules in the evaluated scans; FROC sensitivity is undefined")
    if n_scans <= 0:
        raise AnnotationError("no scans to evaluate; FPs per scan is undefined")
    tp_scores = np.asarray(tp_scores, dtype=np.float64)
    fp_scores = np.asarray(fp_scores, dtype=np.float64)
    thresholds = np.unique(np.concatenate([tp_scores, fp_scores]))[::-1]
    # count of scores >= t for each threshold t (descending)
    tp_at = len(tp_scores) - np.searchsorted(np.sort(tp_scores), thresholds, side="left")
    fp_at = len(fp_scores) - np.searchsorted(np.sort(fp_scores), thresholds, side="left")
    fps = np.concatenate([[0.0], fp_at / n_scans])
    sens = np.concatenate([[0.0], tp_at / n_nodules])
    return fps, sens, np.concatenate([[np.inf], thresholds])


def sensitivity_at_fp_rates(
    fps_per_scan: np.ndarray,
    sensitivity: np.ndarray,
    fp_rates: Sequence[float] = FP_RATES,
    interpolation: str = "linear",
) -> np.ndarray:
    """Sensitivity at given FP rates on a FROC curve.

    ``"linear"``: ``np.interp`` on the polyline, as the official script (held constant past
    the last point; on a vertical segment the top value). ``"step"``: the highest sensitivity
    among curve points with FPs per scan <= rate (an achievable operating point).
    """
    fps = np.asarray(fps_per_scan, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    rates = np.asarray(fp_rates, dtype=np.float64)
    if interpolation == "linear":
        return np.interp(rates, fps, sens)
    if interpolation == "step":
        return np.array([sens[fps <= r].max() if np.any(fps <= r) else 0.0 for r in rates])
    raise CandidateError(f"interpolation={interpolation!r}; expected 'linear' or 'step'")


def evaluate_froc(
    candidates: pd.DataFrame,
    annotations: pd.DataFrame,
    seriesuids: Sequence[str],
    excluded: pd.DataFrame | None = None,
    max_candidates_per_scan: int = MAX_CANDIDATES_PER_SCAN,
    fp_rates: Sequence[float] = FP_RATES,
    interpolation: str = "linear",
) -> FROCResult:
    """LUNA16 FROC + CPM of a submission (protocol in the module docstring).

    ``candidates``: ``seriesuid, coordX, coordY, coordZ, probability`` (world mm);
    ``annotations`` / ``excluded``: LUNA16 frames; ``seriesuids``: ALL evaluated scans.
    """
    cands, nods = match_candidates(
        candidates, annotations, seriesuids, excluded, max_candidates_per_scan
    )
    n_scans = len(dict.fromkeys(str(s) for s in seriesuids))
    tp_scores = nods.loc[nods["detected"], "probability"].to_numpy()
    fp_scores = cands.loc[cands["status"] == "fp", "probability"].to_numpy()
    fps, sens, thr = froc_curve(tp_scores, fp_scores, len(nods), n_scans)
    at = sensitivity_at_fp_rates(fps, sens, fp_rates, interpolation)
    return FROCResult(
        fps_per_scan=fps,
        sensitivity=sens,
        thresholds=thr,
        fp_rates=tuple(float(r) for r in fp_rates),
        sensitivity_at=at,
        cpm=float(np.mean(at)),
        n_scans=n_scans,
        n_nodules=len(nods),
        n_detected=int(nods["detected"].sum()),
        n_false_positives=len(fp_scores),
        interpolation=interpolation,
        candidates=cands,
        nodules=nods,
    )


def cpm(
    candidates: pd.DataFrame,
    annotations: pd.DataFrame,
    seriesuids: Sequence[str],
    excluded: pd.DataFrame | None = None,
) -> float:
    """Competition performance metric: mean sensitivity at 1/8..8 FPs per scan (LUNA16)."""
    return evaluate_froc(candidates, annotations, seriesuids, excluded).cpm


def plot_froc(
    results: FROCResult | Sequence[FROCResult],
    labels: Sequence[str] | None = None,
    title: str = "FROC (LUNA16)",
) -> Figure:
    """FROC curves on a log2 x-axis from 1/8 to 8 FPs per scan, with the CPM points marked.

    Uses the Agg canvas directly (no pyplot state), so it is safe in servers and tests.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    items = [results] if isinstance(results, FROCResult) else list(results)
    labels = list(labels) if labels is not None else [f"run {i}" for i in range(len(items))]
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    grid = np.geomspace(FP_RATES[0], FP_RATES[-1], 400)
    for res, label in zip(items, labels, strict=True):
        y = sensitivity_at_fp_rates(res.fps_per_scan, res.sensitivity, grid, res.interpolation)
        (line,) = ax.plot(grid, y, lw=2, label=f"{label} (CPM {res.cpm:.3f})")
        ax.plot(res.fp_rates, res.sensitivity_at, "o", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlim(FP_RATES[0], FP_RATES[-1])
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(FixedLocator(FP_RATES))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.4)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
