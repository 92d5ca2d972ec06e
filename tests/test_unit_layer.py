"""The unit layer (tests/unit) is what a contributor runs first: from a copy of the source tree, as
an unprivileged uid (nobody, when this suite runs as root), with no wheel built, it passes within
its time limit. The copy holds only the source, the unit tests and the test configuration."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from testkit.server import ROOT

LIMIT_S = 30.0  # the whole `pytest tests/unit`, interpreter start included
COPIED = ("kernelpool", "sandbox", "testkit", "pyproject.toml", "tests/__init__.py", "tests/conftest.py", "tests/unit")


@pytest.fixture
def source_copy() -> Iterator[str]:
    """The checkout's source and unit tests in a folder every uid may read, and none but root write."""
    folder = tempfile.mkdtemp(prefix="kp-unit-", dir="/var/tmp")
    os.chmod(folder, 0o755)
    try:
        for name in COPIED:
            src, dst = os.path.join(ROOT, name), os.path.join(folder, name)
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            if os.path.isdir(src):
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(src, dst)
        for path, dirs, files in os.walk(folder):
            for name in dirs:
                os.chmod(os.path.join(path, name), 0o755)
            for name in files:
                os.chmod(os.path.join(path, name), 0o644)
        yield folder
    finally:
        shutil.rmtree(folder)


def test_the_unit_layer_passes_unprivileged_from_the_source_tree_in_time(source_copy: str) -> None:
    uid = gid = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": source_copy}  # no PYTHONPATH: nothing but the copy
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/unit", "-q", "-p", "no:cacheprovider", "-x"],
                         cwd=source_copy, env=env, user=uid, group=gid, extra_groups=[] if uid is not None else None,
                         capture_output=True, text=True, timeout=5 * LIMIT_S)
    took = time.monotonic() - start
    report = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, report
    summary = re.search(r"^(\d+) passed in [\d.]+s", out.stdout, re.M)
    assert summary and int(summary.group(1)) >= 100, report
    assert not re.search(r"skipped|xfail|error", out.stdout.splitlines()[-1]), report
    assert took < LIMIT_S, f"pytest tests/unit took {took:.1f} s (at most {LIMIT_S:g}): {out.stdout.splitlines()[-1]}"
