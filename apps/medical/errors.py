"""Errors of the medical app.

Every refusal is a ``ValueError`` subclass whose message names the file, slice, row or
column at fault and what was expected, so a user can fix the input without a debugger.
Messages never carry patient names or IDs: files are named relative to their series
folder, and DICOM patient tags are never read into a message.
"""

from __future__ import annotations


class MedicalDataError(ValueError):
    """Base class for bad input to the medical app."""


class DicomSeriesError(MedicalDataError):
    """A DICOM CT series that cannot be turned into one regular 3-D volume."""


class AnnotationError(MedicalDataError):
    """A malformed LIDC reader XML or LUNA16-style CSV."""


class CandidateError(MedicalDataError):
    """A malformed probability map or candidate/submission table."""
