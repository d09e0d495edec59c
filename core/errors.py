"""Errors raised by core on bad input. All subclass ``ValueError`` so callers can catch broadly."""

from __future__ import annotations


class KeelInputError(ValueError):
    """Input of the wrong shape, dtype or value range reached a core module."""
