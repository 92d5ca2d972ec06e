"""CgroupV2Backend against a temp folder standing in for the unified hierarchy.

mkdir in a plain folder creates no interface files, so the test pre-creates what the kernel
would (cgroup.controllers at the top; memory.swap.max where swap accounting exists); the
assertions are on what the backend writes.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import sandbox._cgroupfs as cgroupfs
import sandbox.cgroups as cgroups
from sandbox import CgroupError, CgroupV2Backend, Limits


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
