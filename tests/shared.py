"""Access to the real datasets in ``../shared/data`` for tests.

Tests that need them skip with a reason when the folder is absent, except where
``KEEL_REQUIRE_SHARED_DATA=1`` (CI sets it): there absence is a failure, so CI can never
pass by silently skipping the real-data checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("KEEL_DATA_DIR")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def require_shared_data(relative: str = "") -> Path:
    """Return ``shared_data_dir() / relative``; skip (or fail under CI) when it is absent."""
    path = shared_data_dir() / relative
    if path.exists():
        return path
    msg = f"real dataset not found at {path} (set KEEL_DATA_DIR to its folder)"
    if os.environ.get("KEEL_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(msg + "; KEEL_REQUIRE_SHARED_DATA=1 makes this a failure", pytrace=False)
    pytest.skip(msg)
