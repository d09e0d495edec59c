"""``data.extra_train_subsets``: other subsets' training units join training only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.maintenance.cmapss import load_cmapss
from apps.maintenance.config import DataConfig, load_config
from apps.maintenance.data import EXTRA_UNIT_OFFSET, prepare_data
from apps.maintenance.errors import MaintenanceDataError
from tests.shared import require_shared_data


def _cfg(extra: list[str]):
    cfg = load_config("fd001")
    cfg.data.data_dir = str(require_shared_data("maintenance/cmapss"))
    cfg.data.extra_train_subsets = extra
    return cfg


@pytest.mark.shared_data
def test_fd003_units_join_training_and_nothing_else_moves() -> None:
    alone, both = prepare_data(_cfg([])), prepare_data(_cfg(["FD003"]))
    for split in ("policy", "lead", "test"):  # held-out and test units: exactly FD001's
        pd.testing.assert_frame_equal(getattr(alone, split), getattr(both, split))
    n_alone = len(alone.train)
    pd.testing.assert_frame_equal(both.train.iloc[:n_alone].reset_index(drop=True), alone.train)
    extra = both.train.iloc[n_alone:]
    fd003 = load_cmapss(_cfg([]).data.cmapss_dir(), "FD003").train
    assert extra["unit"].nunique() == 100 and len(extra) == len(fd003)
    assert extra["unit"].min() == EXTRA_UNIT_OFFSET + 1
    fd001_units = set(alone.train["unit"]) | set(alone.policy["unit"]) | set(alone.lead["unit"])
    assert not set(extra["unit"]) & fd001_units
    np.testing.assert_array_equal(extra["sensor_11"].to_numpy(), fd003["sensor_11"].to_numpy())
    # the extra units' targets are their own run-to-failure RUL: 0 at each last cycle
    last = extra.groupby("unit")["rul_uncapped"].min()
    assert (last == 0).all()
    # the normaliser is fitted on the training units, extras included: sensors constant in
    # FD001 but not in FD003 become features
    assert set(alone.feature_names) < set(both.feature_names)
    assert "training units of FD003" in both.source


def test_mismatched_or_circular_extras_are_refused() -> None:
    with pytest.raises(MaintenanceDataError, match="the subset itself"):
        DataConfig(subset="FD001", extra_train_subsets=["FD001"])
    with pytest.raises(MaintenanceDataError, match="needs data.kind='cmapss'"):
        DataConfig(
            kind="sensor_table",
            table_path="t",
            schema_path="s",
            events_path="e",
            extra_train_subsets=["FD003"],
        )


@pytest.mark.shared_data
def test_an_extra_subset_in_other_operating_conditions_is_refused() -> None:
    with pytest.raises(MaintenanceDataError, match="FD002 runs in 6 operating condition"):
        prepare_data(_cfg(["FD002"]))
