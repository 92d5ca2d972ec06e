"""`python -m benchmarks.isolation`: what each step of `sandbox.enter` costs a new kernel.

Forks children the way the fork server does (from a process that has `sandbox` imported and the
seccomp filter built) and times every step of `enter` on its own, in the order `enter` runs them:
joining a real cgroup, the mount and IPC namespaces, the private /tmp, account files, /dev/shm,
mqueue, /dev/pts and the hidepid /proc, the shm limits, the fresh /sys, the cgroup namespace and
cgroupfs, the hidden folders, dropping to a uid, no_new_privs, and loading the seccomp filter.
Prints median and 90th percentile per step in microseconds, and the totals of two groups of steps:
the private views (mount and cgroup namespaces, /tmp, /dev/shm, /proc, cgroupfs, seccomp) and the
IPC and name steps (IPC namespace, account files, mqueue, pts, shm limits, /sys, hidden folders).
Then, through kernelpool's
real fork server: the time from asking it for a kernel to the child reporting itself sandboxed,
with and without those steps (interleaved, so that load on a shared machine hits both alike).
Needs root and writable cgroups; makes one cgroup of its own (removed at the end) and uses a uid
that no account has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from sandbox import Identity, LaunchSpec, _libc, seccomp, views
from sandbox.accounts import id_in_use
from sandbox.cgroups import detect
from sandbox.limits import Limits
from sandbox.passwd import kernel_files

NEW_STEPS = ("mount namespace", "read mountinfo", "hide other mounts", "private /tmp", "private /dev/shm", "private /proc",
             "cgroup namespace", "private cgroupfs", "seccomp")
# SysV IPC, message queues and names (users, hosts) another user's kernel could otherwise reach;
# the mount table was read twice before these steps came, now once
BOUNDARY_STEPS = ("ipc namespace", "account files", "private /dev/mqueue", "private /dev/pts",
                  "shm limits", "private /sys", "hide folders")


def _child(procs: list[str], uid: int, program: bytes, tmpfs: int, out: int) -> None:
    times: dict[str, int] = {}
    box: dict[str, str] = {}

    def step(name: str, fn) -> None:
        t = time.perf_counter_ns()
        fn()
        times[name] = time.perf_counter_ns() - t

    def join() -> None:
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)

    def drop() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    files = kernel_files(Identity(f"kp-bench-{uid}", uid, uid, "/nonexistent"))  # rendered before the fork, as the server does
    step("join cgroup", join)
    step("mount namespace", views.enter_mount_namespace)
    step("ipc namespace", views.enter_ipc_namespace)
    step("read mountinfo", lambda: box.update(mountinfo=views.read_mountinfo()))
    # with no volume below (per other user's volume, one umount more)
    step("hide other mounts", lambda: views.hide_mounts(["/var/lib/kp-bench-none"], ["/var/lib/kp-bench-none/x"],
                                                        mountinfo=box["mountinfo"]))
    step("private /tmp", lambda: views.private_tmpfs("/tmp", tmpfs))  # noqa: S108 (in its own mount namespace)
    step("account files", lambda: views.replace_files(files, views.MASKED_FILES, box["mountinfo"]))
    step("private /dev/shm", lambda: views.private_tmpfs("/dev/shm", tmpfs))  # noqa: S108 (in its own mount namespace)
    step("private /dev/mqueue", lambda: views.private_mqueue(box["mountinfo"]))
    step("private /dev/pts", views.private_devpts)
    step("private /proc", views.private_proc)
    step("shm limits", lambda: views.limit_shm(tmpfs))
    step("private /sys", views.private_sysfs)
    step("cgroup namespace", views.enter_cgroup_namespace)
    step("private cgroupfs", lambda: views.private_cgroupfs(procs, mountinfo=box["mountinfo"]))
    step("hide folders", lambda: views.hide_dirs(views.HIDDEN_DIRS, box["mountinfo"]))
    step("drop uid", drop)
    step("no_new_privs", _libc.set_no_new_privs)
    step("seccomp", lambda: _libc.load_seccomp_filter(program))
    os.write(out, json.dumps(times).encode())


def measure(rounds: int) -> dict[str, list[int]]:
    backend = detect(prefix=f"kp-bench-isolation-{os.getpid()}")
    if backend is None:
        raise SystemExit("needs writable cgroups (run as root)")
    uid = next(u for u in range(64990, 64000, -1) if not id_in_use(u))
    program = seccomp.program()
    root = backend.create("u0", Limits(None, None, None))
    cgroup = backend.create("u0/kbench", Limits(1 << 30, None, 256))
    samples: dict[str, list[int]] = {}
    try:
        for _ in range(rounds):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.close(r)
                    _child(cgroup.procs_files(), uid, program, 64 << 20, w)
                except BaseException as exc:
                    print(f"step failed: {exc}", file=sys.stderr)
                    code = 1
                os._exit(code)
            os.close(w)
            data = b""
            while chunk := os.read(r, 65536):
                data += chunk
            os.close(r)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit("a child failed")
            for name, ns in json.loads(data).items():
                samples.setdefault(name, []).append(ns)
    finally:
        cgroup.remove()
        root.remove()
        base = backend.get("")
        if base is not None:
            base.remove()
    return samples


async def fork_server_starts(rounds: int) -> dict[str, list[float]]:
    """Seconds from `ForkServer.spawn` to the child's "sandboxed" report, per variant."""
    from kernelpool.kernels.zygote.server import ForkServer

    backend = detect(prefix=f"kp-bench-isolation-{os.getpid()}")
    if backend is None:
        raise SystemExit("needs writable cgroups (run as root)")
    uid = next(u for u in range(64990, 64000, -1) if not id_in_use(u))
    folder = tempfile.mkdtemp(prefix="kp-bench-", dir="/var/tmp")
    os.chmod(folder, 0o700)
    os.chown(folder, uid, uid)
    ident = Identity(f"kp-bench-{uid}", uid, uid, folder)
    fs = ForkServer(sys.executable)
    await fs.start()
    backend.create("u0", Limits(None, None, None))
    out: dict[str, list[float]] = {"without views and seccomp": [], "with views and seccomp": []}
    try:
        for i in range(rounds * 2):
            on = i % 2 == 1
            cg = backend.create(f"u0/k{i}", Limits(1 << 30, None, 256))
            spec = LaunchSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", os.path.join(folder, f"k{i}.json")],
                              env={"PATH": "/usr/bin:/bin"}, cwd=folder, identity=ident, cgroup=cg,
                              private_views=on, tmpfs_bytes=64 << 20, seccomp=on,
                              replaced_files=kernel_files(ident) if on else {})
            t = time.perf_counter()
            child = await fs.spawn(spec)
            out["with views and seccomp" if on else "without views and seccomp"].append(time.perf_counter() - t)
            child.kill()
            await asyncio.to_thread(child.wait, 10)
            cg.remove()
    finally:
        await fs.close()
        root = backend.get("")
        if root is not None:
            root.remove()
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.isolation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=50, help="children forked (default 50)")
    args = p.parse_args(argv)
    samples = measure(args.rounds)
    print(f"{'step':<20} {'median µs':>10} {'p90 µs':>10}")
    for name, ns in samples.items():
        q = statistics.quantiles(ns, n=10)
        print(f"{name:<20} {statistics.median(ns) / 1000:>10.0f} {q[8] / 1000:>10.0f}")
    totals = [sum(samples[s][i] for s in NEW_STEPS) for i in range(args.rounds)]
    q = statistics.quantiles(totals, n=10)
    print(f"{'added (views)':<20} {statistics.median(totals) / 1000:>10.0f} {q[8] / 1000:>10.0f}")
    totals = [sum(samples[s][i] for s in BOUNDARY_STEPS) for i in range(args.rounds)]
    q = statistics.quantiles(totals, n=10)
    print(f"{'added (ipc, names)':<20} {statistics.median(totals) / 1000:>10.0f} {q[8] / 1000:>10.0f}")
    print()
    print(f"{'fork server: spawn -> sandboxed':<34} {'median ms':>10} {'p90 ms':>10}")
    for name, secs in asyncio.run(fork_server_starts(args.rounds)).items():
        q = statistics.quantiles(secs, n=10)
        print(f"{name:<34} {statistics.median(secs) * 1000:>10.2f} {q[8] * 1000:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
