"""File names built from input data (series UIDs, asset ids, card ids) that stay in their folder.

Input-derived text becomes a file name in a few places (DICOM SR files per series, per-asset
outputs). A hostile or merely odd value (``../../x``, ``a/b``, ``/etc/passwd``, ``..``) must not
write outside the output folder, so every such name goes through this one module:
``safe_name`` sanitises text into one harmless path component, ``safe_child`` refuses any name
whose resolved path is not a direct child of the folder (symlinks included).
"""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import KeelInputError

_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")


class UnsafePathError(KeelInputError):
    """A name derived from input would resolve outside its output folder."""


def safe_name(text: object, suffix: str = "", max_len: int = 120) -> str:
    """``text`` as one file name: only ``[0-9A-Za-z._-]``, no leading dot, at most ``max_len``.

    Every other character (separators, NUL, spaces, non-ASCII) becomes ``_``, and leading dots
    are stripped, so the result can be neither ``..`` nor a hidden file. Distinct inputs may
    map to the same name; callers that need uniqueness keep the original id in the file.
    """
    name = _UNSAFE.sub("_", str(text)).lstrip(".") or "unnamed"
    return name[:max_len] + suffix


def safe_child(root: str | Path, name: str) -> Path:
    """``root / name`` if that is a direct child of ``root`` after resolving links; else raise.

    Refuses (``UnsafePathError``) empty names, ``.``/``..``, names with a path separator or
    NUL, absolute names, and an existing symlink that points out of ``root``. Use
    ``safe_child(root, safe_name(text))`` to sanitise first and still get the check.
    """
    text = str(name)
    base = Path(root).resolve()
    bad = (
        text in {"", ".", ".."}
        or "/" in text
        or "\\" in text
        or "\x00" in text
        or Path(text).is_absolute()
    )
    if not bad:
        path = (base / text).resolve()
        bad = path.parent != base
    if bad:
        raise UnsafePathError(f"output name {text!r} would leave the output folder {base}")
    return base / text
