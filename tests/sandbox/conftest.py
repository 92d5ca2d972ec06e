"""Fixtures for the sandbox tests: real accounts, real cgroups, always cleaned up.

Test accounts are named kptest-* with uids in 61000-61999; cgroups go below a prefix unique
to this test run, removed in teardown even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator

import pytest

from sandbox import CgroupBackend, CgroupV1Backend, Identity, accounts, detect

UID_RANGE = range(61000, 62000)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (setuid, chown, cgroup writes); run the suite as root, as CI does")


def _process_uids() -> set[int]:
    """The real uids of every process on the host, zombies included.

    A uid without a passwd entry can still own processes: an earlier test's killed children
    stay visible as zombies until init reaps them (seen taking seconds in CI), and a test
    that reused that uid would see them through hidepid.
    """
    uids: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(FileNotFoundError):  # exited meanwhile
                uids.add(os.stat(f"/proc/{entry}").st_uid)
    return uids


def free_uid(avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A uid (also free as a gid) in the test range that no account and no process uses."""
    running = _process_uids()
    for uid in UID_RANGE:
        if uid not in avoid and uid not in running and not accounts.id_in_use(uid):
            return uid
    pytest.skip("no free uid in 61000-61999 for a test identity")


def _world_usable(path: str) -> bool:
    # as root os.access says yes to everything: look at the mode bits of every folder instead
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    folder = os.path.dirname(path)
    while True:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return False
        if folder == "/":
            return True
        folder = os.path.dirname(folder)


@pytest.fixture
def root_only() -> None:
    """Skips the test (saying why) unless we are root."""
    require_root()


@pytest.fixture
def spare_uid(root_only: None) -> int:
    """A free uid in the test range; root only, since tests use it to chown."""
    return free_uid()


@pytest.fixture
def spare_uids(root_only: None) -> tuple[int, int]:
    """Two distinct free uids in the test range."""
    first = free_uid()
    return first, free_uid(avoid={first})


@pytest.fixture(scope="session")
def user_python() -> str:
    """A python an unprivileged uid can execute (the dev venv's lives under /root, mode 0700)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _world_usable(candidate):
            return candidate
    pytest.skip("no python executable that other uids can run")


@pytest.fixture
def identity() -> Iterator[Identity]:
    """An unprivileged identity (no passwd entry needed to run as it) with its own 0700 home.

    The home is directly in /tmp: pytest's tmp_path sits below a root-only 0700 folder.
    """
    require_root()
    uid = free_uid()
    home = tempfile.mkdtemp(prefix="kptest-home-")
    try:
        os.chown(home, uid, uid)
        os.chmod(home, 0o700)
        yield Identity(name=f"kptest-{uid}", uid=uid, gid=uid, home=home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def make_account() -> Iterator[list[Identity]]:
    """Accounts created by the test through this list are removed afterwards, pass or fail."""
    created: list[Identity] = []
    yield created
    for ident in created:
        accounts.remove_account(ident.name)


@pytest.fixture
def v1() -> Iterator[CgroupBackend]:
    """A real cgroup v1 backend under a prefix unique to this test; removed afterwards."""
    require_root()
    backend = detect(prefix=f"kptest-{os.getpid()}-{secrets.token_hex(3)}")
    if not isinstance(backend, CgroupV1Backend):
        pytest.skip(f"needs writable cgroup v1 memory/cpu/pids hierarchies (detect() gave {backend!r})")
    try:
        yield backend
    finally:
        top = backend.get("")
        if top is not None:
            top.remove()
