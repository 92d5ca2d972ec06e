"""The real cgroup v1 hierarchies: limits written, OOM kill, fork bomb bounded, cleanup.

Skipped (with the reason) unless root with writable memory/cpu/pids v1 hierarchies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

from sandbox import CgroupBackend, CgroupV1Backend, Identity, LaunchSpec, Limits, spawn


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def run(python: str, code: str, identity: Identity, cgroup: object, timeout: float = 30) -> tuple[int, str]:
    r, w = os.pipe()
    try:
        proc = spawn(
            LaunchSpec(
                argv=[python, "-c", textwrap.dedent(code)],
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
                cwd=identity.home,
                identity=identity,
                cgroup=cgroup,  # type: ignore[arg-type]
                stdout=w,
                stderr=w,
            )
        )
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as out:
        text = out.read().decode()
    return proc.wait(timeout=timeout), text


def test_limits_are_written_below_our_own_cgroup(v1: CgroupBackend) -> None:
    assert isinstance(v1, CgroupV1Backend)
    v1.create("alice", Limits(memory_bytes=256 << 20, pids=64))
    kernel = v1.create("alice/k-1", Limits(memory_bytes=64 << 20, cpus=1.5, pids=16))
    mem, cpu, pids = (os.path.join(v1.base(c) or "", "alice", "k-1") for c in ("memory", "cpu", "pids"))
    with open("/proc/self/cgroup") as f:
        own_memory = next(line.split(":", 2)[2].strip() for line in f if ":memory:" in line)
    assert mem.startswith(os.path.join("/sys/fs/cgroup/memory", own_memory.lstrip("/"), v1.prefix))
    assert read(os.path.join(mem, "memory.limit_in_bytes")) == str(64 << 20)
    if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
        assert read(os.path.join(mem, "memory.memsw.limit_in_bytes")) == str(64 << 20)
    assert read(os.path.join(mem, "memory.use_hierarchy")) == "1"
    assert read(os.path.join(cpu, "cpu.cfs_period_us")) == "100000"
    assert read(os.path.join(cpu, "cpu.cfs_quota_us")) == "150000"
    assert read(os.path.join(pids, "pids.max")) == "16"
    assert set(kernel.procs_files()) >= {os.path.join(d, "cgroup.procs") for d in (mem, cpu, pids)}
    assert v1.list_children() == ["alice"] and v1.list_children("alice") == ["alice/k-1"]
    got = v1.get("alice/k-1")
    assert got is not None and got.limits == Limits(64 << 20, 1.5, 16)

    # updating in place, both directions (memsw must stay >= memory at every step)
    v1.create("alice/k-1", Limits(memory_bytes=128 << 20))
    assert read(os.path.join(mem, "memory.limit_in_bytes")) == str(128 << 20)
    v1.create("alice/k-1", Limits(memory_bytes=32 << 20))
    assert read(os.path.join(mem, "memory.limit_in_bytes")) == str(32 << 20)
    v1.create("alice/k-1", Limits())
    assert int(read(os.path.join(mem, "memory.limit_in_bytes"))) > 1 << 60
    assert read(os.path.join(cpu, "cpu.cfs_quota_us")) == "-1"
    assert read(os.path.join(pids, "pids.max")) == "max"


def test_kernel_cpu_quota_is_capped_by_the_users(v1: CgroupBackend) -> None:
    v1.create("bob", Limits(cpus=1.0))
    v1.create("bob/k-1", Limits(cpus=2.0))  # v1 would refuse it (EINVAL); v2 caps it
    assert read(os.path.join(v1.base("cpu") or "", "bob", "k-1", "cpu.cfs_quota_us")) == "100000"  # type: ignore[attr-defined]


def test_memory_hog_is_oom_killed(v1: CgroupBackend, identity: Identity, user_python: str) -> None:
    cg = v1.create("carol/k-1", Limits(memory_bytes=64 << 20))
    code, out = run(user_python, "data = b'x' * (200 << 20)\nprint('survived', len(data))", identity, cg)
    assert code == -signal.SIGKILL, out
    assert "survived" not in out
    assert cg.oom_kills() >= 1


def test_fork_bomb_is_bounded_by_pids(v1: CgroupBackend, identity: Identity, user_python: str) -> None:
    cg = v1.create("dave/k-1", Limits(pids=16))
    code, out = run(
        user_python,
        """
        import os, time
        forked = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    os.close(1)  # let the test's pipe reach EOF while we linger
                    os.close(2)
                    time.sleep(60)
                    os._exit(0)
                forked += 1
        except OSError as exc:
            print("fork failed", forked, exc.errno)
        else:
            print("unbounded", forked)
        """,
        identity,
        cg,
    )
    assert code == 0, out
    assert out.startswith("fork failed"), out
    forked = int(out.split()[2])
    assert forked < 16
    assert len(cg.pids()) == forked  # the sleeping children, kept inside the cgroup
    cg.remove()  # kills them all
    assert v1.get("dave/k-1") is None
    assert all(not os.path.exists(d) for d in cg.directories())


def test_cpu_quota_throttles(v1: CgroupBackend, identity: Identity, user_python: str) -> None:
    cg = v1.create("erin/k-1", Limits(cpus=0.2))
    code, out = run(
        user_python,
        "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass",
        identity,
        cg,
    )
    assert code == 0, out
    used = cg.cpu_usage_seconds()
    assert used is not None and 0 < used < 0.45, used  # unthrottled it would be about 1.0


def test_remove_kills_and_cleans_up(v1: CgroupBackend) -> None:
    cg = v1.create("fay/k-1", Limits(memory_bytes=256 << 20))
    proc = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: cg.add_pid(os.getpid()))
    try:
        assert cg.pids() == [proc.pid]
        assert (cg.memory_current() or 0) > 0
        user = v1.get("fay")
        assert user is not None
        start = time.monotonic()
        user.remove()  # children first, killing what runs in them
        assert time.monotonic() - start < 3
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert v1.get("fay") is None and v1.get("fay/k-1") is None
        assert all(not os.path.exists(d) for d in cg.directories())
        user.remove()  # idempotent
        cg.remove()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
