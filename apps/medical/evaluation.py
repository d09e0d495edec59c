"""LUNA16 evaluation of a predictor on held-out scans (exact FROC via :mod:`froc`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from apps.medical.candidates import concat_candidates
from apps.medical.data import Truth
from apps.medical.froc import FROCResult, evaluate_froc
from apps.medical.preprocess import Scan

PROTOCOL = (
    "LUNA16 FROC (Setio et al. 2017; official noduleCADEvaluationLUNA16.py logic in "
    "apps/medical/froc.py): all listed held-out scans count, <= 100 candidates per scan, a hit "
    "is a candidate strictly inside a nodule's radius, hits on annotations_excluded are ignored, "
    "sensitivity read off the linearly interpolated FROC at 1 and 4 FPs/scan, CPM = mean "
    "sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs/scan. Held-out scans: {split}."
)


def froc_metrics(result: FROCResult) -> dict[str, float]:
    """``cpm``, ``sensitivity_at_1fp``, ``sensitivity_at_4fp`` plus the full FROC dict."""
    m = result.metrics()
    m["sensitivity_at_1fp"] = m["sens_at_1_fp"]
    m["sensitivity_at_4fp"] = m["sens_at_4_fp"]
    return m


def evaluate_scans(
    detect: Any, scans: Sequence[Scan], truth: Truth
) -> tuple[FROCResult, pd.DataFrame]:
    """Run ``detect(scan) -> candidates`` on every scan and score them under LUNA16."""
    frames = [detect(s) for s in scans]
    cands = concat_candidates(frames)
    result = evaluate_froc(cands, truth.annotations, truth.seriesuids, truth.excluded)
    return result, cands
