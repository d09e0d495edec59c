"""bench.medical_prep_bench on the committed DICOM sample (CPU: the torch path runs there)."""

from __future__ import annotations

import re

from bench.medical_prep_bench import main


def test_prep_bench_compares_the_two_paths(capsys):
    assert main(["--data", "data_samples/medical", "--config", "demo", "--cpu-scans", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"on cpu: (\d+) scans .* lung-voxel disagreement ([0-9.e+-]+)", out)
    assert m, out
    assert int(m.group(1)) >= 2  # every training series of the sample
    assert float(m.group(2)) < 1e-3
