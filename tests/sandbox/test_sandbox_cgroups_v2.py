"""CgroupV2Backend against a temp folder standing in for the unified hierarchy.

mkdir in a plain folder creates no interface files, so the test pre-creates what the kernel
would (cgroup.controllers at the top; memory.swap.max where swap accounting exists); the
assertions are on what the backend writes.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandbox._cgroupfs as cgroupfs
import sandbox.cgroups as cgroups
from sandbox import CgroupError, CgroupV2Backend, Limits, cgroupkill


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    return tmp_path


def tokens(path: Path) -> set[str]:
    return set(path.read_text().split())


def test_nested_user_and_kernel(tree: Path) -> None:
    backend = CgroupV2Backend(root=str(tree), prefix="kernelpool", own_path="")
    assert backend.version == 2
    assert backend.controllers == {"memory", "cpu", "pids"}
    user = backend.create("alice", Limits(memory_bytes=4 << 30, cpus=None, pids=1024))
    kernel = backend.create("alice/k-1234", Limits(memory_bytes=512 << 20, cpus=1.5, pids=256))

    base = tree / "kernelpool"
    # controllers are handed down at every level above a leaf: own cgroup, prefix, user
    for level in (tree, base, base / "alice"):
        assert tokens(level / "cgroup.subtree_control") == {"+memory", "+cpu", "+pids"}
    assert not (base / "alice" / "k-1234" / "cgroup.subtree_control").exists()

    assert (base / "alice" / "memory.max").read_text() == str(4 << 30)
    assert (base / "alice" / "cpu.max").read_text() == "max 100000"
    assert (base / "alice" / "pids.max").read_text() == "1024"
    leaf = base / "alice" / "k-1234"
    assert (leaf / "memory.max").read_text() == str(512 << 20)
    assert (leaf / "cpu.max").read_text() == "150000 100000"
    assert (leaf / "pids.max").read_text() == "256"

    assert kernel.procs_files() == [str(leaf / "cgroup.procs")]
    assert user.relpath == "alice" and kernel.limits.cpus == 1.5
    assert backend.list_children() == ["alice"]
    assert backend.list_children("alice") == ["alice/k-1234"]
    again = backend.get("alice/k-1234")
    assert again is not None and again.limits == Limits(512 << 20, 1.5, 256)
    assert backend.get("alice/k-9") is None


def test_none_means_max_and_update_is_idempotent(tree: Path) -> None:
    backend = CgroupV2Backend(root=str(tree), prefix="kp", own_path="")
    backend.create("bob/k-1", Limits(memory_bytes=1 << 30, cpus=2, pids=10))
    leaf = tree / "kp" / "bob" / "k-1"
    (leaf / "memory.swap.max").write_text("max")  # the kernel provides it with swap accounting
    backend.create("bob/k-1", Limits())
    assert (leaf / "memory.max").read_text() == "max"
    assert (leaf / "cpu.max").read_text() == "max 100000"
    assert (leaf / "pids.max").read_text() == "max"
    assert (leaf / "memory.swap.max").read_text() == "0"


def test_only_available_controllers_are_enabled(tree: Path) -> None:
    (tree / "cgroup.controllers").write_text("cpu pids\n")
    backend = CgroupV2Backend(root=str(tree), own_path="")
    assert backend.controllers == {"cpu", "pids"}
    backend.create("carol/k-1", Limits(cpus=0.5))
    assert tokens(tree / "cgroup.subtree_control") == {"+cpu", "+pids"}
    assert not (tree / "kernelpool" / "carol" / "k-1" / "memory.max").exists()
    with pytest.raises(CgroupError, match="memory controller"):
        backend.create("carol/k-2", Limits(memory_bytes=1 << 30))


def test_subtree_control_already_enabled_is_not_rewritten(tree: Path) -> None:
    (tree / "cgroup.subtree_control").write_text("cpu memory pids\n")  # as the kernel shows it
    CgroupV2Backend(root=str(tree), own_path="").create("dave", Limits())
    assert (tree / "cgroup.subtree_control").read_text() == "cpu memory pids\n"


def test_own_path_is_honoured(tree: Path) -> None:
    own = tree / "system.slice" / "kernelpool.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("memory pids cpu")
    backend = CgroupV2Backend(root=str(tree), own_path="/system.slice/kernelpool.service")
    cg = backend.create("erin/k-1", Limits(pids=5))
    assert cg.procs_files() == [str(own / "kernelpool" / "erin" / "k-1" / "cgroup.procs")]
    assert (own / "kernelpool" / "erin" / "k-1" / "pids.max").read_text() == "5"


def test_stats_from_interface_files(tree: Path) -> None:
    backend = CgroupV2Backend(root=str(tree), own_path="")
    cg = backend.create("fay/k-1", Limits())
    leaf = tree / "kernelpool" / "fay" / "k-1"
    assert cg.oom_kills() == 0 and cg.memory_current() is None and cg.pids() == []
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n")
    (leaf / "memory.current").write_text("123456\n")
    (leaf / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    assert cg.oom_kills() == 2
    assert cg.memory_current() == 123456
    assert cg.cpu_usage_seconds() == 2.5


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", ".hidden", "a b", "cgroup\nprocs"])
def test_bad_relpaths_are_refused(tree: Path, bad: str) -> None:
    with pytest.raises(CgroupError):
        CgroupV2Backend(root=str(tree), own_path="").create(bad, Limits())


def test_own_cgroup_with_processes_is_evacuated(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # v2's "no internal processes" rule: enabling controllers below a cgroup that holds
    # processes (ours, in a container) fails with EBUSY until they move to a leaf
    (tree / "cgroup.procs").write_text("101\n")
    real_write = cgroupfs.write_file
    moved: list[str] = []

    def kernel_like_write(path: str, value: str) -> None:
        if path == str(tree / "cgroup.subtree_control") and not moved:
            raise CgroupError("busy", path=path) from OSError(errno.EBUSY, "Device or resource busy")
        if path.endswith("kernelpool-server/cgroup.procs"):
            moved.append(value)
        real_write(path, value)

    monkeypatch.setattr(cgroups, "write_file", kernel_like_write)
    CgroupV2Backend(root=str(tree), own_path="").create("gus/k-1", Limits())
    assert moved == ["101"]
    assert tokens(tree / "cgroup.subtree_control") == {"+memory", "+cpu", "+pids"}


# ---- freeze and kill (sandbox.cgroupkill) on the stand-in tree ---------------------------------
# The stand-in cannot act: writing cgroup.kill or cgroup.freeze there changes nothing. So the
# tests list real child processes in cgroup.threads, set cgroup.events to what the kernel would
# report, and check what kill_trees writes, in which order, and that the children die by the
# signals it sends itself. tests/sandbox/test_sandbox_removal.py runs the same against real trees.

def standin(tree: Path, *pids: int, frozen: bool = True, kill_file: bool = True) -> Path:
    leaf = tree / "kernelpool" / "u5" / "k1"
    leaf.mkdir(parents=True)
    top = leaf.parent
    for path in (top, leaf):
        (path / "cgroup.threads").write_text("")
        (path / "cgroup.procs").write_text("")
        (path / "cgroup.freeze").write_text("0\n")
        (path / "cgroup.events").write_text(f"populated 1\nfrozen {int(frozen)}\n")
        if kill_file:
            (path / "cgroup.kill").write_text("")
    (top / "pids.max").write_text("1024\n")
    (leaf / "cgroup.threads").write_text("".join(f"{p}\n" for p in pids))
    return top


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for child in made:
        child.kill()
        child.wait()


def sleeper(children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(["sleep", "600"])
    children.append(child)
    # reaped as soon as it dies, as init would: a zombie is not a task any more
    threading.Thread(target=child.wait, daemon=True).start()
    return child


def recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    written: list[tuple[str, str]] = []
    real = cgroupfs.write_file  # the function cgroupkill imported by name

    def record(path: str, value: str) -> None:
        written.append((os.path.relpath(path, os.path.dirname(os.path.dirname(path))), value))
        real(path, value)

    monkeypatch.setattr(cgroupkill, "write_file", record)
    return written


def test_kill_trees_blocks_forks_freezes_kills_thaws_and_puts_the_limit_back(
        tree: Path, children: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    child = sleeper(children)
    top = standin(tree, child.pid)
    written = recording(monkeypatch)
    assert cgroupkill.kill_trees([str(top)], timeout=5) == 1
    assert child.wait(5) == -signal.SIGKILL
    assert written == [("u5/pids.max", "0"), ("u5/cgroup.freeze", "1"), ("u5/cgroup.kill", "1"),
                       ("u5/cgroup.freeze", "0"), ("u5/pids.max", "1024")]


def test_kill_trees_without_cgroup_kill_and_a_freeze_that_never_completes(
        tree: Path, children: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux before 5.14 has no cgroup.kill; a task in uninterruptible sleep never freezes. The
    # kill goes ahead after FREEZE_WAIT, each task pinned by a pidfd before it is signalled
    monkeypatch.setattr(cgroupkill, "FREEZE_WAIT", 0.2)
    first, second = sleeper(children), sleeper(children)
    top = standin(tree, first.pid, second.pid, frozen=False, kill_file=False)
    written = recording(monkeypatch)
    assert cgroupkill.kill_trees([str(top)], timeout=5) == 2
    assert first.wait(5) == -signal.SIGKILL and second.wait(5) == -signal.SIGKILL
    assert ("u5/cgroup.kill", "1") not in written
    assert written[-2:] == [("u5/cgroup.freeze", "0"), ("u5/pids.max", "1024")]


def test_a_task_that_left_the_tree_before_it_was_pinned_is_not_signalled(
        tree: Path, children: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    # what a pid handed to another process looks like from here: listed once, then not any more
    monkeypatch.setattr(cgroupkill, "FREEZE_WAIT", 0.05)
    stays, leaves = sleeper(children), sleeper(children)
    top = standin(tree, stays.pid, leaves.pid, frozen=False, kill_file=False)
    threads = top / "k1" / "cgroup.threads"
    real_open = os.pidfd_open

    def pin(pid: int, flags: int = 0) -> int:
        threads.write_text(f"{stays.pid}\n")  # `leaves` is gone from the tree by the time it is pinned
        return real_open(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", pin)  # what cgroupkill calls
    cgroupkill.kill_trees([str(top)], timeout=5)
    assert stays.wait(5) == -signal.SIGKILL
    assert leaves.poll() is None


def test_a_tree_with_no_task_is_left_untouched(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = standin(tree)
    written = recording(monkeypatch)
    assert cgroupkill.kill_trees([str(top)]) == 0
    assert written == []  # the common case, a kernel that shut down cleanly: no freeze, no limit change


def test_kill_trees_reports_what_it_could_not_end(tree: Path, children: list[subprocess.Popen[bytes]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a task that no signal ends (here the signals are made to do nothing; for real, a task in
    # uninterruptible sleep, as tests/test_removal.py makes one) ends in an error naming it, and
    # the tree is thawed and its limit put back
    monkeypatch.setattr(cgroupkill, "FREEZE_WAIT", 0.05)
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)
    monkeypatch.setattr(signal, "pidfd_send_signal", lambda fd, sig: None)
    child = sleeper(children)
    top = standin(tree, child.pid)
    with pytest.raises(CgroupError, match=rf"1 task\(s\) still in .*u5 after SIGKILL for 0.3 s: \[{child.pid}\]"):
        cgroupkill.kill_trees([str(top)], timeout=0.3)
    assert child.poll() is None
    assert (top / "pids.max").read_text() == "1024"
    assert (top / "cgroup.freeze").read_text() == "0"
