"""Input-derived file names stay inside their output folder."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import KeelInputError
from core.safepath import UnsafePathError, safe_child, safe_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.3.6.1.4.1.14519", "1.3.6.1.4.1.14519"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("..", "unnamed"),
        ("", "unnamed"),
        ("/abs/path", "_abs_path"),
        ("a\\b\x00c", "a_b_c"),
        ("engine 7/ünit", "engine_7__nit"),
        (".hidden", "hidden"),
    ],
)
def test_safe_name_gives_one_harmless_component(text, expected):
    assert safe_name(text) == expected
    assert safe_name(text, ".dcm") == expected + ".dcm"


def test_safe_name_truncates_before_the_suffix():
    assert safe_name("x" * 500, ".dcm") == "x" * 120 + ".dcm"


@pytest.mark.parametrize(
    "name", ["../evil", "..", ".", "", "a/b", "/etc/passwd", "a\\b", "x\x00y", "sub/../../x"]
)
def test_safe_child_refuses_names_that_leave_or_are_not_one_component(tmp_path, name):
    with pytest.raises(UnsafePathError, match="would leave the output folder"):
        safe_child(tmp_path, name)
    assert issubclass(UnsafePathError, KeelInputError) and issubclass(UnsafePathError, ValueError)


def test_safe_child_accepts_plain_names_and_refuses_a_symlink_out(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert safe_child(root, "a.dcm") == root.resolve() / "a.dcm"
    assert safe_child(root, "..x") == root.resolve() / "..x"  # dots inside a name are fine
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePathError):
        safe_child(root, "link")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_sanitised_lands_directly_in_root(tmp_path_factory, text):
    root = tmp_path_factory.getbasetemp() / "safe_root"
    root.mkdir(exist_ok=True)
    path = safe_child(root, safe_name(text, ".out"))
    assert path.parent == root.resolve()
    assert path.resolve().parent == root.resolve()
