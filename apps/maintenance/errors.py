"""Errors of the maintenance app.

Every reader and validator raises :class:`MaintenanceDataError` for bad input, with a message
that names the file (or frame), the column, the asset and the row, and what was expected. It
subclasses ``ValueError`` so callers that only know the standard library still catch it.
"""

from __future__ import annotations

from typing import Any


class MaintenanceDataError(ValueError):
    """Bad maintenance data or configuration; the message says where and what was expected."""


class AlarmBudgetError(MaintenanceDataError):
    """No alarm policy in the searched grid meets the false-alarm budget on validation units."""


def show(value: Any) -> str:
    """A value for a message as the user wrote it: text quoted, numbers plain (no numpy reprs)."""
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        value = item()
    return repr(value) if isinstance(value, str) else str(value)
