"""The per-user pip wrapper every kernel loads: which shell lines it takes over, and how it names a failure."""

from __future__ import annotations

import pytest

from kernelpool.kernels.pip_extension import _PIP_COMMAND, diagnose


@pytest.mark.parametrize(("line", "args"), [
    ("pip install x", "install x"),
    ("pip3 install -U x==1.0", "install -U x==1.0"),
    ("/opt/venv/bin/pip uninstall -y x", "uninstall -y x"),
    ("python -m pip install x", "install x"),
    ("python3.11 -m pip list", "list"),
    ("pip", ""),
    ("pipx install x", None),
    ("echo pip install x", None),
    ("python -m pipdeptree", None),
])
def test_shell_lines_that_run_pip_go_through_the_wrapper(line: str, args: str | None) -> None:
    match = _PIP_COMMAND.match(line)
    assert (match.group(1).strip() if match else None) == args


def test_pip_failures_are_named() -> None:
    disk = diagnose("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "/tmp")
    assert disk is not None and "your folder is full" in disk and "MB free" in disk
    net = diagnose("WARNING: Retrying ... NewConnectionError(... [Errno 101] Network is unreachable')", "/tmp")
    assert net is not None and "cannot reach the package index" in net
    assert diagnose("ERROR: No matching distribution found for nosuchpackage", "/tmp") is None
