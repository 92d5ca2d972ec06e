"""The unit layer tests the checkout it runs in: the source tree, not a wheel installed in the venv."""

from __future__ import annotations

import os

import kernelpool
import sandbox
from tests.unit.conftest import ROOT


def test_the_code_under_test_is_this_checkouts() -> None:
    assert os.path.dirname(os.path.abspath(kernelpool.__file__)) == os.path.join(ROOT, "kernelpool")
    assert os.path.dirname(os.path.abspath(sandbox.__file__)) == os.path.join(ROOT, "sandbox")
