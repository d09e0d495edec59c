"""NASA C-MAPSS turbofan run-to-failure data (Saxena et al., PHM08): reader and writer.

Files (gzipped, whitespace-separated, no header): ``train_<subset>.txt.gz`` (full trajectories
to failure), ``test_<subset>.txt.gz`` (trajectories cut some time before failure) and
``RUL_<subset>.txt.gz`` (true RUL after each test unit's last cycle, one line per test unit, in
unit order). 26 columns: unit, cycle, 3 operating settings, 21 sensors.

The reader checks what the rest of the app relies on, so a damaged or foreign file fails here
with the file and row named, not later as a wrong metric: 26 numeric fields per row, integral
unit and cycle numbers, each unit's rows contiguous with cycles 1, 2, ..., n, units numbered
1..N, and exactly one non-negative RUL per test unit.
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from apps.maintenance._io import atomic_write_bytes, data_root
from apps.maintenance.errors import MaintenanceDataError

SETTING_COLUMNS: tuple[str, ...] = ("setting_1", "setting_2", "setting_3")
SENSOR_COLUMNS: tuple[str, ...] = tuple(f"sensor_{i}" for i in range(1, 22))
CMAPSS_COLUMNS: tuple[str, ...] = ("unit", "cycle", *SETTING_COLUMNS, *SENSOR_COLUMNS)
SUBSETS: tuple[str, ...] = ("FD001", "FD002", "FD003", "FD004")
# Operating conditions per subset (readme.txt): FD002 and FD004 run in six.
N_CONDITIONS: dict[str, int] = {"FD001": 1, "FD002": 6, "FD003": 1, "FD004": 6}

_SUBSET_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class CMAPSSData:
    """One C-MAPSS subset.

    ``train``/``test``: frames with :data:`CMAPSS_COLUMNS` (``unit``/``cycle`` int64, the rest
    float64), sorted by unit then cycle. ``test_rul``: columns ``unit`` and ``rul`` (int64), the
    true RUL after the last observed cycle of each test unit (uncapped, as NASA ships it).
    """

    subset: str
    train: pd.DataFrame
    test: pd.DataFrame
    test_rul: pd.DataFrame
    data_dir: Path

    @property
    def n_train_units(self) -> int:
        return int(self.train["unit"].nunique())

    @property
    def n_test_units(self) -> int:
        return int(self.test["unit"].nunique())


def default_cmapss_dir() -> Path:
    """``<data root>/maintenance/cmapss`` (data root: ``$KEEL_DATA_DIR`` or ``../shared/data``)."""
    return data_root() / "maintenance" / "cmapss"


def load_cmapss(data_dir: str | Path | None = None, subset: str = "FD001") -> CMAPSSData:
    """Read and check one subset (``FD001``..``FD004``, or any name written by :func:`write_cmapss`).

    ``data_dir`` is the folder holding the ``*.txt.gz`` files; ``None`` uses
    :func:`default_cmapss_dir`.
    """
    if not _SUBSET_RE.match(subset):
        raise MaintenanceDataError(f"C-MAPSS subset {subset!r}: expected a name like 'FD001'")
    folder = Path(data_dir) if data_dir is not None else default_cmapss_dir()
    train = _read_trajectories(_find(folder, f"train_{subset}"))
    test = _read_trajectories(_find(folder, f"test_{subset}"))
    rul_path = _find(folder, f"RUL_{subset}")
    rul = _read_rul(rul_path)
    test_units = np.sort(test["unit"].unique())
    if len(rul) != len(test_units):
        raise MaintenanceDataError(
            f"{rul_path}: {len(rul)} RUL values but {len(test_units)} test units in "
            f"test_{subset}; expected one RUL line per test unit"
        )
    test_rul = pd.DataFrame({"unit": test_units.astype(np.int64), "rul": rul})
    return CMAPSSData(subset=subset, train=train, test=test, test_rul=test_rul, data_dir=folder)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.txt.gz", f"{stem}.txt"):
        if (folder / name).exists():
            return folder / name
    raise MaintenanceDataError(f"C-MAPSS file {folder / (stem + '.txt.gz')} not found")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise MaintenanceDataError(f"{path}: not a readable gzip file ({err})") from err
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as err:
        raise MaintenanceDataError(
            f"{path}: byte {err.start} is not ASCII; expected whitespace-separated numbers"
        ) from err


def _read_trajectories(path: Path) -> pd.DataFrame:
    text = _read_text(path)
    try:  # fast path: the C parser; anything odd falls through to the line-by-line checker
        arr = pd.read_csv(
            io.StringIO(text),
            sep=r"\s+",
            header=None,
            dtype=np.float64,
            float_precision="round_trip",
        ).to_numpy()
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        arr = None
    if arr is None or arr.shape[1] != len(CMAPSS_COLUMNS) or not np.isfinite(arr).all():
        arr = _parse_lines(path, text)

    def line_of(row: int) -> int:  # blank lines shift numbering; only computed for an error
        return [i + 1 for i, line in enumerate(text.splitlines()) if line.split()][row]

    for j, name in enumerate(("unit", "cycle")):
        col = arr[:, j]
        bad = (col != np.round(col)) | (col < 1)
        if bad.any():
            r = int(np.argmax(bad))
            raise MaintenanceDataError(
                f"{path}: line {line_of(r)}, column {name!r}: {col[r]!r} is not a positive integer"
            )
    frame = pd.DataFrame(arr, columns=list(CMAPSS_COLUMNS))
    frame["unit"] = frame["unit"].astype(np.int64)
    frame["cycle"] = frame["cycle"].astype(np.int64)
    _check_layout(frame, path, line_of)
    return frame


def _parse_lines(path: Path, text: str) -> np.ndarray:
    """Slow, exact parse used only to name the first bad line and column."""
    lines = text.splitlines()
    values: list[list[str]] = []
    for i, line in enumerate(lines):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(CMAPSS_COLUMNS):
            raise MaintenanceDataError(
                f"{path}: line {i + 1} has {len(fields)} fields; expected {len(CMAPSS_COLUMNS)} "
                "(unit, cycle, 3 settings, 21 sensors)"
            )
        values.append(fields)
    if not values:
        raise MaintenanceDataError(f"{path}: no data rows")
    line_numbers = np.array([i + 1 for i, line in enumerate(lines) if line.split()])
    raw = np.asarray(values)
    try:
        arr = raw.astype(np.float64)
    except ValueError:
        for j, name in enumerate(CMAPSS_COLUMNS):
            bad = pd.to_numeric(pd.Series(raw[:, j]), errors="coerce").isna().to_numpy()
            if bad.any():
                r = int(np.argmax(bad))
                raise MaintenanceDataError(
                    f"{path}: line {line_numbers[r]}, column {name!r}: value {str(raw[r, j])!r} is not a number"
                ) from None
        raise
    nonfinite = ~np.isfinite(arr)
    if nonfinite.any():
        r, j = np.argwhere(nonfinite)[0]
        raise MaintenanceDataError(
            f"{path}: line {line_numbers[r]}, column {CMAPSS_COLUMNS[j]!r}: value {str(raw[r, j])!r} is not finite"
        )
    return arr


def _check_layout(frame: pd.DataFrame, path: Path, line_of: Callable[[int], int]) -> None:
    """Each unit's rows contiguous, cycles 1..n in order, units numbered 1..N."""
    unit = frame["unit"].to_numpy()
    cycle = frame["cycle"].to_numpy()
    starts = np.r_[True, unit[1:] != unit[:-1]]
    block_units = unit[starts]
    if len(np.unique(block_units)) != len(block_units):
        seen: set[int] = set()
        for r in np.flatnonzero(starts):
            if unit[r] in seen:
                raise MaintenanceDataError(
                    f"{path}: line {line_of(r)}, column 'unit': unit {unit[r]} appears again "
                    "after other units; expected each unit's rows to be contiguous"
                )
            seen.add(int(unit[r]))
    expected = (
        np.arange(len(unit)) - np.maximum.accumulate(np.where(starts, np.arange(len(unit)), 0)) + 1
    )
    bad = cycle != expected
    if bad.any():
        r = int(np.argmax(bad))
        raise MaintenanceDataError(
            f"{path}: line {line_of(r)}, column 'cycle', unit {unit[r]}: cycle {cycle[r]} where "
            f"{expected[r]} was expected (cycles must run 1, 2, ... without gaps, duplicates or reordering)"
        )
    units = np.sort(block_units)
    if not np.array_equal(units, np.arange(1, len(units) + 1)):
        missing = sorted(set(range(1, int(units.max()) + 1)) - set(units.tolist()))
        raise MaintenanceDataError(
            f"{path}: column 'unit': units must be numbered 1..{len(units)}; missing {missing[:10]}"
        )


def _read_rul(path: Path) -> np.ndarray:
    text = _read_text(path)
    out: list[int] = []
    for i, line in enumerate(text.splitlines()):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise MaintenanceDataError(
                f"{path}: line {i + 1} has {len(fields)} fields; expected one RUL value"
            )
        try:
            value = float(fields[0])
        except ValueError:
            raise MaintenanceDataError(
                f"{path}: line {i + 1}: RUL {fields[0]!r} is not a number"
            ) from None
        if not np.isfinite(value) or value < 0 or value != round(value):
            raise MaintenanceDataError(
                f"{path}: line {i + 1}: RUL {fields[0]!r} is not a non-negative integer"
            )
        out.append(int(value))
    if not out:
        raise MaintenanceDataError(f"{path}: no RUL values")
    return np.asarray(out, dtype=np.int64)


def write_cmapss(
    out_dir: str | Path,
    subset: str,
    train: pd.DataFrame,
    test: pd.DataFrame,
    test_rul: np.ndarray | pd.Series,
) -> list[Path]:
    """Write a subset in the NASA layout (gzipped text, 26 columns), atomically.

    ``train``/``test`` need the columns :data:`CMAPSS_COLUMNS`; units must be numbered 1..N
    with cycles 1..n (what :func:`load_cmapss` checks on the way back in).
    """
    if not _SUBSET_RE.match(subset):
        raise MaintenanceDataError(f"C-MAPSS subset {subset!r}: expected a name like 'FD001'")
    out = Path(out_dir)
    written = []
    for stem, frame in ((f"train_{subset}", train), (f"test_{subset}", test)):
        missing = [c for c in CMAPSS_COLUMNS if c not in frame.columns]
        if missing:
            raise MaintenanceDataError(f"write_cmapss({stem}): missing columns {missing}")
        values = frame[list(CMAPSS_COLUMNS)].to_numpy(np.float64)
        if not np.isfinite(values).all():
            r, c = np.argwhere(~np.isfinite(values))[0]
            raise MaintenanceDataError(
                f"write_cmapss({stem}): row {r}, column {CMAPSS_COLUMNS[c]!r} is {values[r, c]}; "
                "the C-MAPSS text layout has no missing values"
            )
        buf = io.StringIO()
        body = frame[list(CMAPSS_COLUMNS)].copy()
        body["unit"] = body["unit"].astype(np.int64)
        body["cycle"] = body["cycle"].astype(np.int64)
        body.to_csv(buf, sep=" ", header=False, index=False, float_format="%.4f")
        written.append(
            atomic_write_bytes(
                out / f"{stem}.txt.gz", gzip.compress(buf.getvalue().encode(), mtime=0)
            )
        )
    rul_text = "".join(f"{int(v)}\n" for v in np.asarray(test_rul))
    written.append(
        atomic_write_bytes(out / f"RUL_{subset}.txt.gz", gzip.compress(rul_text.encode(), mtime=0))
    )
    return written
