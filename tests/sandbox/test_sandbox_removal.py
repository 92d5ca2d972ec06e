"""Ending everything of a uid, for real: tasks found thread by thread, cgroup trees frozen and killed
(v1 with and without the freezer, v2 through its unified mount), trees found by name, System V IPC
objects removed.

The processes run as a spare uid, started through `sandbox.spawn` as kernels are. Skipped (with
the reason) unless root; the v1 tests need the writable v1 hierarchies, the v2 ones a v2 mount.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest

import sandbox._cgroupfs as cgroupfs
from sandbox import (
    CgroupBackend,
    CgroupV1Backend,
    CgroupV2Backend,
    Identity,
    LaunchSpec,
    Limits,
    cgroupkill,
    ipc,
    spawn,
)
from sandbox.errors import SandboxError
from sandbox.tasks import kill_tasks, live_tasks, signal_group, tasks_of

# forks, and the parent exits at once: the one live process is never the one a scan just saw.
# A refused fork (the pids limit, zombies waiting for init to reap them) is simply tried again
HOPPER = """
import os, time
while True:
    try:
        if os.fork():
            os._exit(0)
    except OSError:
        time.sleep(0.001)
"""
# the main thread exits while another runs on: /proc/PID/status says zombie
ZOMBIE_LEADER = """
import ctypes, threading, time
threading.Thread(target=lambda: time.sleep(600)).start()
ctypes.CDLL(None).pthread_exit(None)
"""


_STARTED: list[subprocess.Popen[bytes]] = []


def start(python: str, code: str, identity: Identity, cgroup: object = None) -> subprocess.Popen[bytes]:
    proc = spawn(LaunchSpec(argv=[python, "-c", textwrap.dedent(code)], env={"PATH": "/usr/bin:/bin"},
                            cwd=identity.home, identity=identity, cgroup=cgroup))  # type: ignore[arg-type]
    _STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _reap_started() -> Iterator[None]:
    """Every process `start` made is waited for after the test (killed first if it runs on), so
    that none is left unreaped: the test's kills end its tasks, and this collects the exits."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_for(condition: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def ended(identity: Identity) -> Iterator[Identity]:
    """The identity; whatever of its uid still runs after the test is killed."""
    yield identity
    with contextlib.suppress(SandboxError):
        kill_tasks(identity.uid, timeout=10)


def test_a_zombie_leader_with_a_live_thread_is_found_and_ended(ended: Identity, user_python: str) -> None:
    proc = start(user_python, ZOMBIE_LEADER, ended)
    wait_for(lambda: any(t.tgid == proc.pid and t.tid != proc.pid for t in live_tasks(ended.uid)))
    leader = next(t for t in tasks_of(ended.uid) if t.tid == proc.pid)
    assert leader.state == "Z" and not leader.alive  # what a per-process scan saw, and skipped
    assert [t.tgid for t in live_tasks(ended.uid)] == [proc.pid]
    assert kill_tasks(ended.uid) >= 1
    assert live_tasks(ended.uid) == []
    assert proc.wait(10) == -signal.SIGKILL


def test_kill_tasks_refuses_root_and_its_own_uid() -> None:
    for uid in (0, os.getuid()):
        with pytest.raises(SandboxError, match="refusing"):
            kill_tasks(uid)


def test_a_pid_of_another_uid_is_never_signalled(ended: Identity) -> None:
    # signal_group pins the process, then checks whose it is: a pid that went to a process of
    # another uid (here: root's) is left alone
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert signal_group(other.pid, ended.uid) is False
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.fixture
def v1_trees(v1: CgroupBackend, request: pytest.FixtureRequest) -> CgroupV1Backend:
    """The v1 backend with its freezer hierarchy (param True) or one without (False)."""
    assert isinstance(v1, CgroupV1Backend)
    if request.param:
        if v1.base("freezer") is None:
            pytest.skip("no writable cgroup v1 freezer hierarchy on this host")
        return v1
    mounts = {c: m for c, m in _v1_mount_points().items() if c != "freezer"}
    return CgroupV1Backend(mounts=mounts, prefix=v1.prefix, own_paths=_own_paths())


def _v1_mount_points() -> dict[str, str]:
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup":
                for opt in fields[sep + 3].split(","):
                    found.setdefault(opt, fields[4])
    return found


def _own_paths() -> dict[str, str]:
    from sandbox._cgroupfs import own_cgroup_paths

    return own_cgroup_paths()


@pytest.mark.parametrize("v1_trees", [True, False], indirect=True, ids=["freezer", "no-freezer"])
def test_a_fork_hopper_cannot_outrun_the_kill_v1(v1_trees: CgroupV1Backend, ended: Identity, user_python: str) -> None:
    user = v1_trees.create("u1", Limits(pids=1024))
    kernel = v1_trees.create("u1/k1", Limits(pids=256))
    pids_max = next(os.path.join(d, "pids.max") for d in user.directories() if os.path.exists(os.path.join(d, "pids.max")))
    start(user_python, HOPPER, ended, kernel)
    start(user_python, ZOMBIE_LEADER, ended, kernel)
    wait_for(lambda: len(cgroupkill.tasks_in(user.directories())) >= 2)
    time.sleep(0.3)  # let it hop a few hundred times
    assert cgroupkill.kill_trees(user.directories(), timeout=10) >= 2
    assert cgroupkill.tasks_in(user.directories()) == set()
    assert live_tasks(ended.uid) == []
    with open(pids_max) as f:
        assert f.read().strip() == "1024"  # put back: the tree is still the caller's
    if v1_trees.base("freezer") is not None:
        with open(os.path.join(v1_trees.base("freezer") or "", "u1", "freezer.state")) as f:
            assert f.read().strip() == "THAWED"
    user.remove()
    assert all(not os.path.exists(d) for d in user.directories())


@pytest.fixture
def v2_real() -> Iterator[CgroupV2Backend]:
    """A real v2 tree: the unified mount of a hybrid host (no controllers needed for freeze and
    kill), or /sys/fs/cgroup on a v2 host. Removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            break
    else:
        pytest.skip("no cgroup v2 mount on this host")
    backend = CgroupV2Backend(root=root, prefix=f"kptest-v2-{os.getpid()}-{secrets.token_hex(3)}")
    probe = backend.create("probe", Limits())
    has_kill = os.path.exists(os.path.join(probe.directories()[0], "cgroup.kill"))
    probe.remove()
    if not has_kill:
        pytest.skip("this kernel's cgroup v2 has no cgroup.kill (Linux 5.14+)")
    try:
        yield backend
    finally:
        top = backend.get("")
        if top is not None:
            top.remove()


def test_a_fork_hopper_and_a_zombie_leader_end_through_cgroup_kill_v2(v2_real: CgroupV2Backend, ended: Identity,
                                                                      user_python: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    user = v2_real.create("u1", Limits())
    kernel = v2_real.create("u1/k1", Limits())
    start(user_python, HOPPER, ended, kernel)
    zombie = start(user_python, ZOMBIE_LEADER, ended, kernel)
    wait_for(lambda: any(t.tgid == zombie.pid and t.tid != zombie.pid for t in live_tasks(ended.uid)))
    time.sleep(0.3)
    written: list[tuple[str, str]] = []
    real_write = cgroupfs.write_file  # the function cgroupkill imported by name

    def record(path: str, value: str) -> None:
        written.append((os.path.basename(path), value))
        real_write(path, value)

    monkeypatch.setattr(cgroupkill, "write_file", record)
    assert cgroupkill.kill_trees(user.directories(), timeout=10) >= 2
    assert ("cgroup.kill", "1") in written and ("cgroup.freeze", "1") in written and written[-1] != ("cgroup.freeze", "1")
    assert live_tasks(ended.uid) == []
    assert zombie.wait(10) == -signal.SIGKILL
    user.remove()


def test_find_trees_finds_a_users_cgroups_in_every_hierarchy(v1: CgroupBackend) -> None:
    mine = v1.create("u7", Limits())
    v1.create("u7/k1", Limits())
    v1.create("u77/k1", Limits())  # a longer name that merely starts the same
    found = cgroupkill.find_trees(v1.prefix, "u7")
    assert found == sorted(mine.directories())
    assert cgroupkill.find_trees(v1.prefix, "u8") == []


def test_find_trees_reads_cgroup_mounts_only(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(tmp_path, "cg")
    for path in ("unified/system.slice/kp.service/kernelpool/u5/k1", "memory/kernelpool/u5",
                 "memory/other/kernelpool/u5", "memory/kernelpool/u5x", "elsewhere/kernelpool/u5"):
        os.makedirs(os.path.join(root, path))
    info = os.path.join(tmp_path, "mountinfo")
    with open(info, "w") as f:
        f.write(f"30 1 0:26 / {root}/unified rw - cgroup2 cgroup2 rw\n"
                f"31 1 0:27 / {root}/memory rw - cgroup cgroup rw,memory\n"
                f"32 1 0:28 / {root}/elsewhere rw - tmpfs tmpfs rw\n")  # not a cgroup mount
    assert cgroupkill.find_trees("kernelpool", "u5", root=root, mountinfo=info) == sorted([
        f"{root}/memory/kernelpool/u5", f"{root}/memory/other/kernelpool/u5",
        f"{root}/unified/system.slice/kp.service/kernelpool/u5"])


def test_system_v_ipc_objects_of_a_uid_are_removed(ended: Identity) -> None:
    ipcmk = shutil.which("ipcmk")
    if ipcmk is None:
        pytest.skip("ipcmk (util-linux) not installed")
    made = spawn(LaunchSpec(argv=[ipcmk, "-M", "65536", "-Q", "-S", "2"], env={"PATH": "/usr/bin:/bin"},
                            cwd=ended.home, identity=ended))
    assert made.wait(10) == 0
    theirs = ipc.owned_by(ended.uid)
    assert sorted(o.kind for o in theirs) == ["msg", "sem", "shm"]
    root_made = subprocess.run([ipcmk, "-M", "4096"], capture_output=True, text=True, check=True).stdout
    root_id = int(root_made.split()[-1])
    try:
        assert ipc.remove_owned_by(ended.uid) == 3
        assert ipc.owned_by(ended.uid) == []
        assert any(o.kind == "shm" and o.id == root_id for o in ipc.objects())  # another uid's stays
    finally:
        subprocess.run(["ipcrm", "-m", str(root_id)], check=False)
    with pytest.raises(SandboxError, match="refusing"):
        ipc.remove_owned_by(0)
