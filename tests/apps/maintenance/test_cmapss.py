"""C-MAPSS reader: exact loading of the real files, and clear errors on damaged ones."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.cmapss import CMAPSS_COLUMNS, load_cmapss, write_cmapss
from apps.maintenance.errors import MaintenanceDataError
from tests.shared import require_shared_data


def _independent_units(path: Path) -> set[str]:
    with gzip.open(path, "rt") as fh:
        return {line.split(maxsplit=1)[0] for line in fh if line.strip()}


def _independent_parse(path: Path) -> np.ndarray:
    with gzip.open(path, "rt") as fh:
        return np.array([[float(v) for v in line.split()] for line in fh if line.strip()])


@pytest.mark.shared_data
def test_fd001_loads_exactly() -> None:
    folder = require_shared_data("maintenance/cmapss")
    data = load_cmapss(folder, "FD001")
    assert list(data.train.columns) == list(CMAPSS_COLUMNS)
    assert len(CMAPSS_COLUMNS) == 26
    assert data.train.shape == (20631, 26)
    assert data.test.shape == (13096, 26)
    assert data.n_train_units == 100 and data.n_test_units == 100
    assert data.test_rul.shape == (100, 2)
    assert data.train["unit"].dtype == np.int64 and data.train["cycle"].dtype == np.int64
    # every value equal to a plain float() parse of the original text
    np.testing.assert_array_equal(
        data.train.to_numpy(np.float64), _independent_parse(folder / "train_FD001.txt.gz")
    )
    np.testing.assert_array_equal(
        data.test.to_numpy(np.float64), _independent_parse(folder / "test_FD001.txt.gz")
    )
    rul = _independent_parse(folder / "RUL_FD001.txt.gz").reshape(-1)
    np.testing.assert_array_equal(data.test_rul["rul"].to_numpy(), rul)
    np.testing.assert_array_equal(data.test_rul["unit"].to_numpy(), np.arange(1, 101))
    # each unit runs cycles 1..n
    per_unit = data.train.groupby("unit")["cycle"].agg(["min", "max", "count"])
    assert (per_unit["min"] == 1).all() and (per_unit["max"] == per_unit["count"]).all()


@pytest.mark.shared_data
def test_unit_counts_of_all_subsets_follow_the_files_not_readme() -> None:
    """readme.txt says FD004 has 248 train / 249 test units; the files have 249 / 248."""
    folder = require_shared_data("maintenance/cmapss")
    readme = (folder / "readme.txt").read_text(errors="replace")
    assert "Train trjectories: 248" in readme.split("FD004")[1][:200]  # the swapped claim
    expected = {"FD001": (100, 100), "FD002": (260, 259), "FD003": (100, 100), "FD004": (249, 248)}
    for subset, (n_train, n_test) in expected.items():
        data = load_cmapss(folder, subset)
        assert (
            len(_independent_units(folder / f"train_{subset}.txt.gz"))
            == data.n_train_units
            == n_train
        )
        assert (
            len(_independent_units(folder / f"test_{subset}.txt.gz")) == data.n_test_units == n_test
        )
        assert len(data.test_rul) == n_test


def _write_gz(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode()))


def _row(unit: int, cycle: int, fill: str = "1.0") -> str:
    return " ".join([str(unit), str(cycle)] + [fill] * 24)


def _good_subset(folder: Path, test_lines: list[str] | None = None, rul: str = "5\n") -> None:
    _write_gz(folder / "train_X.txt.gz", "\n".join([_row(1, 1), _row(1, 2), _row(2, 1)]) + "\n")
    _write_gz(folder / "test_X.txt.gz", "\n".join(test_lines or [_row(1, 1), _row(1, 2)]) + "\n")
    _write_gz(folder / "RUL_X.txt.gz", rul)


def test_small_subset_loads(tmp_path: Path) -> None:
    _good_subset(tmp_path)
    data = load_cmapss(tmp_path, "X")
    assert data.train.shape == (3, 26) and data.n_train_units == 2
    assert data.test_rul.to_dict("list") == {"unit": [1], "rul": [5]}


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([_row(1, 1), _row(1, 2) + " 7.0"], "line 2 has 27 fields"),
        (
            [_row(1, 1), _row(1, 2).replace(" 1.0", " abc", 1)],
            "line 2, column 'setting_1': value 'abc'",
        ),
        ([_row(1, 1), _row(1, 3)], "line 2, column 'cycle', unit 1: cycle 3 where 2"),
        ([_row(1, 1), _row(1, 1)], "line 2, column 'cycle', unit 1: cycle 1 where 2"),
        (
            [_row(1, 1), _row(1, 2).replace("1.0", "nan", 1)],
            "line 2, column 'setting_1': value 'nan' is not finite",
        ),
        ([_row(1, 1), "1.5 2 " + " ".join(["1.0"] * 24)], "line 2, column 'unit'"),
    ],
)
def test_damaged_test_file_names_line_and_column(
    tmp_path: Path, lines: list[str], needle: str
) -> None:
    _good_subset(tmp_path, test_lines=lines)
    with pytest.raises(MaintenanceDataError) as err:
        load_cmapss(tmp_path, "X")
    assert "test_X.txt.gz" in str(err.value)
    assert needle in str(err.value)


def test_units_must_be_contiguous_and_numbered(tmp_path: Path) -> None:
    _good_subset(tmp_path, test_lines=[_row(1, 1), _row(2, 1), _row(1, 2)])
    with pytest.raises(MaintenanceDataError, match="line 3, column 'unit': unit 1 appears again"):
        load_cmapss(tmp_path, "X")
    _good_subset(tmp_path, test_lines=[_row(1, 1), _row(3, 1)], rul="1\n2\n")
    with pytest.raises(MaintenanceDataError, match=r"numbered 1..2; missing \[2\]"):
        load_cmapss(tmp_path, "X")


def test_rul_count_and_values_checked(tmp_path: Path) -> None:
    _good_subset(tmp_path, rul="5\n6\n")
    with pytest.raises(MaintenanceDataError, match="2 RUL values but 1 test units"):
        load_cmapss(tmp_path, "X")
    _good_subset(tmp_path, rul="-3\n")
    with pytest.raises(MaintenanceDataError, match="RUL_X.txt.gz: line 1"):
        load_cmapss(tmp_path, "X")
    with pytest.raises(MaintenanceDataError, match="train_Y.txt.gz not found"):
        load_cmapss(tmp_path, "Y")


def test_writer_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = []
    for n_units in (3, 2):
        rows = []
        for u in range(1, n_units + 1):
            for c in range(1, 4 + u):
                rows.append([u, c, *np.round(rng.normal(size=24), 4)])
        frames.append(pd.DataFrame(rows, columns=list(CMAPSS_COLUMNS)))
    write_cmapss(tmp_path, "RT", frames[0], frames[1], np.array([7, 9]))
    data = load_cmapss(tmp_path, "RT")
    np.testing.assert_array_equal(data.train.to_numpy(np.float64), frames[0].to_numpy(np.float64))
    np.testing.assert_array_equal(data.test.to_numpy(np.float64), frames[1].to_numpy(np.float64))
    assert data.test_rul["rul"].tolist() == [7, 9]
    holes = frames[0].copy()
    holes.loc[2, "sensor_4"] = np.nan
    with pytest.raises(MaintenanceDataError, match="row 2, column 'sensor_4' is nan"):
        write_cmapss(tmp_path, "RT", holes, frames[1], np.array([7, 9]))
