"""`python -m benchmarks.isolation`: what each step of `sandbox.enter` costs a new kernel.

Forks children the way the fork server does (from a process that has `sandbox` imported and the
seccomp filter built) and times every step of `enter` on its own, in the order `enter` runs them:
joining a real cgroup, the mount namespace, the private /tmp and /dev/shm, the hidepid /proc, the
cgroup namespace and cgroupfs, dropping to a uid, no_new_privs, and loading the seccomp filter.
Prints median and 90th percentile per step in microseconds, and the total of the steps issue 10
added. Needs root and writable cgroups; makes one cgroup of its own (removed at the end) and uses
a uid that no account has.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from sandbox import _libc, seccomp, views
from sandbox.accounts import id_in_use
from sandbox.cgroups import detect
from sandbox.limits import Limits

NEW_STEPS = ("mount namespace", "private /tmp", "private /dev/shm", "private /proc", "cgroup namespace",
             "private cgroupfs", "seccomp")


def _child(procs: list[str], uid: int, program: bytes, tmpfs: int, out: int) -> None:
    times: dict[str, int] = {}

    def step(name: str, fn) -> None:  # type: ignore[no-untyped-def]
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

    step("join cgroup", join)
    step("mount namespace", views.enter_mount_namespace)
    step("private /tmp", lambda: views.private_tmpfs("/tmp", tmpfs))
    step("private /dev/shm", lambda: views.private_tmpfs("/dev/shm", tmpfs))
    step("private /proc", views.private_proc)
    step("cgroup namespace", views.enter_cgroup_namespace)
    step("private cgroupfs", lambda: views.private_cgroupfs(procs))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.isolation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=50, help="children forked (default 50)")
    args = p.parse_args(argv)
    samples = measure(args.rounds)
    print(f"{'step':<18} {'median µs':>10} {'p90 µs':>10}")
    for name, ns in samples.items():
        q = statistics.quantiles(ns, n=10)
        print(f"{name:<18} {statistics.median(ns) / 1000:>10.0f} {q[8] / 1000:>10.0f}")
    totals = [sum(samples[s][i] for s in NEW_STEPS) for i in range(args.rounds)]
    q = statistics.quantiles(totals, n=10)
    print(f"{'added (issue 10)':<18} {statistics.median(totals) / 1000:>10.0f} {q[8] / 1000:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
