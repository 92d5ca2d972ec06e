"""The path rules for notebooks a client names: normalised, or refused with PathRefused."""

from __future__ import annotations

import pytest

from kernelpool.errors import PathRefused
from kernelpool.notebooks.paths import check_notebook_path


@pytest.mark.parametrize("path, norm", [("a.ipynb", "a.ipynb"), ("./x//y/b.ipynb", "x/y/b.ipynb"),
                                        ("cafe\u0301.ipynb", "caf\u00e9.ipynb"), ("a b/c d.ipynb", "a b/c d.ipynb")])
def test_notebook_paths_normalise(path: str, norm: str) -> None:
    assert check_notebook_path(path) == norm


@pytest.mark.parametrize("path", ["", "/abs.ipynb", "../up.ipynb", "a/../../b.ipynb", "nul\x00.ipynb", "x.txt",
                                  "bad\udc80.ipynb", "a/..", ".", "rtl\u202e.ipynb", " lead.ipynb", "dir /a.ipynb",
                                  "new\nline.ipynb", "/".join(["d"] * 32) + "/x.ipynb", "x" * 250 + ".ipynb"])
def test_notebook_paths_refused(path: str) -> None:
    with pytest.raises(PathRefused):
        check_notebook_path(path)
