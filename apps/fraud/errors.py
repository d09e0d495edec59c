"""Errors of the fraud app.

Both are ``ValueError`` subclasses so callers that only know the standard library still
catch them; the messages name the file, column and rows (data) or key (config) at fault.
"""

from __future__ import annotations


class FraudDataError(ValueError):
    """Transactions that do not match their schema: a missing or mistyped column, a
    non-binary label, an unparseable time, a NaN amount, an impossible split."""


class FraudConfigError(ValueError):
    """A schema or feature configuration that cannot be used as written."""
