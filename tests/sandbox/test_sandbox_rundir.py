"""A kernel's runtime folder (sandbox.rundir) with a real process of another uid as the kernel."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import Identity, LaunchError, SandboxError
from sandbox.rundir import KernelRunDir, prepare_user_run


@pytest.fixture
def run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kptest-run-")
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def as_user(identity: Identity, work: Callable[[], object]) -> int:
    """Run `work` in a child that dropped to `identity`; its exit code (0: work returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(identity.gid)
            os.setuid(identity.uid)
            work()
            code = 0
        except PermissionError:
            code = 13
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def mode(path: str) -> tuple[int, int, int]:
    info = os.lstat(path)
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def test_kernel_folder_life_cycle(run_dir: str, identity: Identity) -> None:
    uid, gid = identity.uid, identity.gid
    tmp = prepare_user_run(run_dir, 4242, gid, (uid, gid))
    user_run = os.path.dirname(tmp)
    assert mode(user_run) == (0, gid, 0o710) and mode(tmp) == (uid, gid, 0o700)
    rundir = KernelRunDir(run_dir, 4242, "abc123", uid, gid)
    rundir.create()
    assert mode(rundir.path) == (0, 0, 0o700) and mode(rundir.socket_dir) == (0, 0, 0o700)
    with open(rundir.connection_file, "w") as f:  # what jupyter_client does in pre_launch
        f.write("{}")
    rundir.share()
    assert mode(rundir.path) == (0, gid, 0o750) and mode(rundir.connection_file)[1:] == (gid, 0o640)
    # the kernel can read its file, not replace it, and not add anything beside it
    assert as_user(identity, lambda: Path(rundir.connection_file).read_text()) == 0
    assert as_user(identity, lambda: os.unlink(rundir.connection_file)) == 13
    assert as_user(identity, lambda: os.symlink("/etc/shadow", os.path.join(rundir.path, "x"))) == 13
    rundir.open_for_binding()
    assert mode(rundir.socket_dir) == (0, gid, 0o770)

    decoy_dir = tempfile.mkdtemp(prefix="kptest-decoy-")
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(os.path.join(decoy_dir, "other-users-socket"))

    def kernel() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(rundir.socket_prefix + "-1")  # the kernel's own socket
        os.symlink(os.path.join(decoy_dir, "other-users-socket"), rundir.socket_prefix + "-2")  # a planted link

    assert as_user(identity, kernel) == 0
    assert rundir.missing_sockets(["k-1", "k-2", "k-3"]) == ["k-2", "k-3"]
    with pytest.raises(SandboxError):
        rundir.check_sockets(["k-1"])  # only after lock
    rundir.lock()
    assert mode(rundir.socket_dir) == (0, gid, 0o750)
    assert as_user(identity, lambda: os.unlink(rundir.socket_prefix + "-1")) == 13
    assert as_user(identity, lambda: os.symlink("/etc", rundir.socket_prefix + "-3")) == 13
    rundir.check_sockets(["k-1"])
    with pytest.raises(LaunchError, match="k-2"):
        rundir.check_sockets(["k-1", "k-2"])
    rundir.remove()
    assert not os.path.lexists(rundir.path)
    assert stat.S_ISSOCK(os.lstat(os.path.join(decoy_dir, "other-users-socket")).st_mode)
    decoy.close()
    import shutil

    shutil.rmtree(decoy_dir)


def test_waiting_for_sockets_ends(run_dir: str, identity: Identity) -> None:
    prepare_user_run(run_dir, 4243, identity.gid, (identity.uid, identity.gid))
    rundir = KernelRunDir(run_dir, 4243, "k1", identity.uid, identity.gid)
    rundir.create()
    rundir.open_for_binding()
    asyncio.run(rundir.wait_for_sockets(["k-1"], alive=lambda: False, timeout=30))  # the kernel died: no wait
    with pytest.raises(LaunchError, match="did not create its sockets"):
        asyncio.run(rundir.wait_for_sockets(["k-1"], alive=lambda: True, timeout=0.2))
    # a socket of root's (not the kernel's uid) does not count
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(rundir.socket_prefix + "-1")
    assert rundir.missing_sockets(["k-1"]) == ["k-1"]
    s.close()
    rundir.remove()


def test_bad_kernel_ids_and_reuse_are_refused(run_dir: str, identity: Identity) -> None:
    for kid in ("", "..", ".", "a/b", "tmp"):
        with pytest.raises(SandboxError):
            KernelRunDir(run_dir, 1, kid, identity.uid, identity.gid)
    prepare_user_run(run_dir, 4244, identity.gid, (identity.uid, identity.gid))
    KernelRunDir(run_dir, 4244, "once", identity.uid, identity.gid).create()
    with pytest.raises(FileExistsError):
        KernelRunDir(run_dir, 4244, "once", identity.uid, identity.gid).create()
