"""The path rules SafeRoot applies to every path it walks (sandbox/paths.py): a path must already be
normalised to be walked, so that one name never stands for two files."""

from __future__ import annotations

import pytest

from sandbox.errors import InvalidPath, PathOutsideRoot
from sandbox.paths import MAX_DEPTH, normalize_path, split_path


def test_a_normalised_path_splits_into_its_names() -> None:
    assert split_path("a/b c/d.ipynb") == ["a", "b c", "d.ipynb"]
    assert split_path("", allow_root=True) == []
    assert split_path("/".join(["d"] * MAX_DEPTH)) == ["d"] * MAX_DEPTH


def test_a_name_not_in_nfc_is_normalised_by_the_server_but_never_walked_as_given() -> None:
    decomposed = "cafe\u0301.ipynb"
    assert normalize_path(decomposed) == "caf\u00e9.ipynb"
    with pytest.raises(InvalidPath, match="not in Unicode normal form NFC"):
        split_path(decomposed)


@pytest.mark.parametrize("path, error, words", [
    ("", InvalidPath, "empty path"),
    ("/etc/passwd", PathOutsideRoot, "absolute paths are not allowed"),
    ("a/../../etc", PathOutsideRoot, "'..' is not allowed"),
    ("a//b", InvalidPath, "empty path component"),
    ("a/./b", InvalidPath, "'.' components"),
    ("a\0b", InvalidPath, "NUL byte"),
    ("x\u200by", InvalidPath, r"an invisible format character \(U\+200B ZERO WIDTH SPACE\)"),
    ("x\u2028y", InvalidPath, "a line separator"),
    ("trailing /x", InvalidPath, "begins or ends with a space"),
    ("n" * 86 + "\u00e9" * 85, InvalidPath, "longer than 255 bytes"),  # 256 bytes in UTF-8, 171 characters
    ("/".join(["d"] * (MAX_DEPTH + 1)), InvalidPath, f"more than {MAX_DEPTH} levels"),
])
def test_paths_that_could_leave_the_folder_or_pass_for_another_are_refused(path: str, error: type, words: str) -> None:
    for check in (split_path, normalize_path):
        with pytest.raises(error, match=words):
            check(path)


def test_only_strings_are_paths() -> None:
    for check in (split_path, normalize_path):
        with pytest.raises(InvalidPath, match="path must be a string"):
            check(b"a.ipynb")  # type: ignore[arg-type]
