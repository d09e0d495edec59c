"""bench.medical_bench's training-only extra series leave the held-out and validation series
of a run without them untouched."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pydicom")  # the phantoms' UIDs

from apps.medical.config import MedicalConfig
from bench.medical_bench import EXTRA_TRAIN_FILE, extra_train_uids, prepare


def _cfg(n: int, extra: int) -> MedicalConfig:
    cfg = MedicalConfig.named("synthetic_bench")
    cfg.data.generate = {"n_series": n, "size": "small", "seed": 7, "extra_train_series": extra}
    return cfg


def test_extras_are_new_phantoms_after_the_same_first_ones(tmp_path):
    base, more = tmp_path / "base", tmp_path / "more"
    prepare(base, _cfg(3, 0), workers=1)
    prepare(more, _cfg(3, 2), workers=1)
    uids = (base / "seriesuids.csv").read_text()
    assert (more / "seriesuids.csv").read_text() == uids  # same split input
    extras = extra_train_uids(more, _cfg(3, 2))
    assert len(extras) == 2 and not set(extras) & set(uids.split())
    first = uids.split()[0]
    a = np.load(base / "npz" / f"{first}.npz")
    b = np.load(more / "npz" / f"{first}.npz")
    assert np.array_equal(a["hu"], b["hu"])
    ann = pd.read_csv(more / "annotations.csv")
    assert set(extras) <= set(ann["seriesuid"])  # the extras' nodules are annotated
    assert (base / EXTRA_TRAIN_FILE).read_text() == ""


def test_a_folder_with_another_extra_count_is_refused(tmp_path):
    prepare(tmp_path, _cfg(2, 1), workers=1)
    with pytest.raises(SystemExit, match="holds 1 extra training series"):
        extra_train_uids(tmp_path, _cfg(2, 0))
