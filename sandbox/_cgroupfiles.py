"""Reading and writing one cgroup file: one read, one write(2) per value, errors as CgroupError.

Below both `sandbox._cgroupfs` (cgroups of either version) and `sandbox.cgroupkill` (ending what
runs in a tree), which import it; it imports neither.
"""

from __future__ import annotations

import os

from sandbox.errors import CgroupError


def write_file(path: str, value: str) -> None:
    # one write(2) per value: cgroupfs parses each write on its own
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}", path=path) from exc


def read_file(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}", path=path) from exc
