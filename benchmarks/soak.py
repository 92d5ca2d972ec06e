"""Soak: many sessions for a while, with faults injected, then check that nothing was lost.

    python -m benchmarks.soak [--sessions 24] [--users 6] [--duration 180] [--kill-every 10]
                              [--drop-every 7] [--restart sigterm|sigkill|none] [--json FILE]
                              [--misbehave] [--tmpfs 256m]

Each session appends cells that print its own tag to its own notebook, over a real server and
the real MCP client. Meanwhile kernels are SIGKILLed at random, clients drop mid-call, and the
server is restarted halfway. At the end it checks:
- every notebook is a valid .ipynb; every cell in it belongs to that notebook's session (no
  cross-talk) and every cell whose call succeeded is there with its own output;
- after the final graceful stop: no kernel process, no cgroup, no ipc socket is left;
- the server's file descriptors and RSS did not grow past a stated bound during the second half.

`--misbehave` adds a user working against everyone else (benchmarks/misbehave.py: floods of
sessions, output, background results and bad tokens, kernels at the cap); `--tmpfs SIZE` puts the
data folder on a tmpfs of that size (root) and has that user's kernel fill it, hold it full and
free it, again and again. The others' calls must still meet their checks: every session gets
cells through, and (without a SIGKILL restart, which loses what was queued) every call that
answered ok is in the audit log.
Exit status 1 when a check fails (never because something was slow).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import anyio
import nbformat
import psutil

from benchmarks.misbehave import Misbehaver
from testkit.client import mcp_client
from testkit.server import KernelpoolServer, make_data_dir, server_env

RSS_GROWTH_BOUND = 64 * 2**20  # bytes the server may grow in the measured window
FD_GROWTH_BOUND = 32


@dataclass
class Session:
    index: int
    user: str
    notebook: str
    tag: str
    ok_cells: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    drops: int = 0
    calls: int = 0


@dataclass
class Faults:
    kernel_kills: int = 0
    client_drops: int = 0
    restarts: int = 0


def kernel_pids(kp: KernelpoolServer) -> list[int]:
    users = os.path.join(kp.data_dir, "users") + "/"
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.cwd() + "/").startswith(users) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def cgroup_dirs(prefix: str) -> list[str]:
    out = []
    for top in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct",
                "/sys/fs/cgroup"):
        if not os.path.isdir(top):
            continue
        for dirpath, dirnames, _ in os.walk(top):
            if os.path.basename(dirpath) == prefix:
                out.append(dirpath)
                dirnames[:] = []
    return sorted(set(out))


async def run_session(kp: KernelpoolServer, s: Session, stop_at: float, drop_every: float, faults: Faults,
                      restarting: asyncio.Event) -> None:
    rng = random.Random(s.index)
    n = 0
    while time.monotonic() < stop_at:
        if restarting.is_set():
            await asyncio.sleep(0.2)
            continue
        try:
            async with mcp_client(kp.url, kp.tokens[s.user], mode="legacy" if s.index % 2 else "auto") as c:
                r = await c.call_tool("use_notebook", {"notebook": s.notebook, "mode": "connect"})
                if r.is_error:
                    raise RuntimeError(r.content[0].text)
                next_drop = time.monotonic() + rng.uniform(0.5, 2) * drop_every
                while time.monotonic() < stop_at and not restarting.is_set():
                    code = f"print({s.tag!r}, {n})"
                    s.calls += 1
                    if time.monotonic() > next_drop:
                        # the client goes away mid-call
                        with anyio.move_on_after(rng.uniform(0.001, 0.05)):
                            await c.call_tool("insert_execute_code_cell", {"notebook": s.notebook, "cell_index": -1,
                                                                           "cell_source": code + "\nimport time; time.sleep(0.2)"})
                        s.drops += 1
                        faults.client_drops += 1
                        n += 1
                        break
                    began = time.monotonic()
                    r = await c.call_tool("insert_execute_code_cell",
                                          {"notebook": s.notebook, "cell_index": -1, "cell_source": code})
                    if not r.is_error and r.structured_content.get("status") == "ok":
                        s.latencies.append(time.monotonic() - began)
                        out = "".join(b.text for b in r.content if b.type == "text")
                        if out != f"{s.tag} {n}\n":
                            raise AssertionError(f"session {s.index} got {out!r} for cell {n}")
                        s.ok_cells.append(n)
                    else:
                        s.errors += 1
                    n += 1
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
        except AssertionError:
            raise
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            s.errors += 1
            await asyncio.sleep(0.5)


async def killer(kp: KernelpoolServer, stop_at: float, every: float, faults: Faults) -> None:
    rng = random.Random(7)
    while time.monotonic() < stop_at:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * every)
        pids = kernel_pids(kp)
        if pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(pids), signal.SIGKILL)
                faults.kernel_kills += 1


def sample(pid: int) -> tuple[int, int]:
    proc = psutil.Process(pid)
    return proc.memory_info().rss, proc.num_fds()


async def monitor(kp: KernelpoolServer, samples: list[tuple[float, int, int, int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(psutil.Error, AttributeError):
            rss, fds = sample(kp.pid)
            samples.append((time.monotonic(), kp.pid, rss, fds))
        await asyncio.sleep(1.0)


def check_notebooks(kp: KernelpoolServer, sessions: list[Session]) -> list[str]:
    problems = []
    for s in sessions:
        path = os.path.join(kp.data_dir, "users", s.user, s.notebook)
        try:
            nb = nbformat.read(path, as_version=4)
            nbformat.validate(nb)
        except Exception as exc:
            problems.append(f"{s.user}/{s.notebook}: not a valid notebook: {exc}")
            continue
        seen = {}
        for cell in nb.cells:
            if not cell.source.startswith(f"print({s.tag!r}, "):
                problems.append(f"{s.user}/{s.notebook}: foreign cell {cell.source[:60]!r}")
                continue
            num = int(cell.source.split(", ", 1)[1].split(")", 1)[0])
            seen[num] = cell
        for num in s.ok_cells:
            cell = seen.get(num)
            if cell is None:
                problems.append(f"{s.user}/{s.notebook}: cell {num} answered ok but is not in the file")
            elif not cell.outputs or cell.outputs[0].get("text") != f"{s.tag} {num}\n":
                problems.append(f"{s.user}/{s.notebook}: cell {num} lost its output: {cell.outputs!r}")
    return problems


async def soak(args: argparse.Namespace) -> dict:
    env = server_env(KERNELPOOL_POOL_SIZE="1", KERNELPOOL_MAX_KERNELS_PER_USER="64")
    env["KERNELPOOL_UID_MIN"], env["KERNELPOOL_UID_MAX"] = "64000", "64999"
    env["KERNELPOOL_ACCOUNT_PREFIX"] = f"kps{os.getpid() % 100000}-"
    env["KERNELPOOL_CGROUP_PREFIX"] = f"kernelpool-soak-{os.getpid()}"
    if args.misbehave:
        env |= {"KERNELPOOL_MAX_KERNELS_PER_USER": "8", "KERNELPOOL_MAX_SESSIONS_PER_USER": "20",
                "KERNELPOOL_TRUSTED_PROXIES": "127.0.0.1", "KERNELPOOL_DISK_FREE_FLOOR": "8M"}
    data_dir = make_data_dir()
    if args.tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs},mode=0711", "kp-soak", data_dir], check=True)
    kp = KernelpoolServer(data_dir, env)
    serve_args = [] if os.geteuid() == 0 else ["--insecure-no-sandbox"]
    mallory: asyncio.Task[dict] | None = None
    faults = Faults()
    samples: list[tuple[float, int, int, int]] = []
    problems: list[str] = []
    started = time.monotonic()
    try:
        users = [f"soak{i}" for i in range(args.users)]
        for u in users:
            kp.add_user(u)
        if args.misbehave:
            kp.add_user("mallory")
        kp.start(*serve_args)
        sessions = [Session(i, users[i % len(users)], f"s{i}.ipynb", f"tag-{i}-{random.randrange(10**6)}")
                    for i in range(args.sessions)]
        async with mcp_client(kp.url, kp.tokens[users[0]], mode="auto") as c:
            for s in sessions:
                async with mcp_client(kp.url, kp.tokens[s.user], mode="auto") as c:
                    await c.call_tool("use_notebook", {"notebook": s.notebook, "mode": "create"})
        stop_at = time.monotonic() + args.duration
        if args.misbehave:
            bad = Misbehaver(kp.url, kp.tokens["mallory"], bad_address="198.51.100.66", fill=bool(args.tmpfs))

            async def misbehave() -> dict:
                await bad.setup(3)
                # until a third of the run, so that a restart (which forgets sessions) comes after
                return await bad.run(args.duration / 3 if args.restart != "none" else args.duration)

            mallory = asyncio.create_task(misbehave())
        restarting = asyncio.Event()
        stop_monitor = asyncio.Event()
        mon = asyncio.create_task(monitor(kp, samples, stop_monitor))
        workers = [asyncio.create_task(run_session(kp, s, stop_at, args.drop_every, faults, restarting)) for s in sessions]
        kill_task = asyncio.create_task(killer(kp, stop_at, args.kill_every, faults))
        restart_at = time.monotonic() + args.duration / 3
        measure_from = None
        if args.restart != "none":
            await asyncio.sleep(max(0.0, restart_at - time.monotonic()))
            restarting.set()
            await asyncio.sleep(0.5)
            kp.stop(signal.SIGKILL if args.restart == "sigkill" else signal.SIGTERM)
            faults.restarts += 1
            kp.start(*serve_args)
            restarting.clear()
        await asyncio.sleep(min(20.0, args.duration / 6))
        measure_from = time.monotonic()  # after warm-up of the (new) server
        results = await asyncio.gather(*workers, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                problems.append(f"session failed: {r!r}")
        kill_task.cancel()
        stop_monitor.set()
        await asyncio.gather(kill_task, mon, return_exceptions=True)
        misbehaved: dict | str | None = None
        if mallory is not None:
            try:
                misbehaved = await mallory
            except Exception as exc:  # the misbehaving user is not checked, only reported
                misbehaved = f"{type(exc).__name__}: {exc}"
        problems += check_notebooks(kp, sessions)
        starved = [s.index for s in sessions if not s.ok_cells]
        if starved:
            problems.append(f"sessions that got no cell through: {starved}")
        if args.restart != "sigkill":
            problems += check_audit(kp, sessions)
        code = kp.stop(signal.SIGTERM)
        if code not in (0, -signal.SIGTERM):
            problems.append(f"server exited with {code} on SIGTERM")
        left = kernel_pids(kp)
        if left:
            problems.append(f"kernel processes left after a graceful stop: {left}")
        cgs = cgroup_dirs(env["KERNELPOOL_CGROUP_PREFIX"])
        if cgs:
            problems.append(f"cgroups left: {cgs}")
        for u in users:
            leftovers = kp.kernel_folders(u)
            if leftovers:
                problems.append(f"runtime files left for {u}: {leftovers[:5]}")
        window = [x for x in samples if measure_from is not None and x[0] >= measure_from and x[1] == samples[-1][1]]
        rss_growth = fd_growth = 0
        if len(window) >= 2:
            rss_growth = window[-1][2] - min(x[2] for x in window[: max(1, len(window) // 4)])
            fd_growth = window[-1][3] - min(x[3] for x in window[: max(1, len(window) // 4)])
            if rss_growth > RSS_GROWTH_BOUND:
                problems.append(f"server RSS grew {rss_growth / 2**20:.1f} MiB (bound {RSS_GROWTH_BOUND / 2**20:.0f})")
            if fd_growth > FD_GROWTH_BOUND:
                problems.append(f"server fds grew by {fd_growth} (bound {FD_GROWTH_BOUND})")
        report = {
            "sessions": args.sessions, "users": args.users, "duration_s": args.duration, "restart": args.restart,
            "calls": sum(s.calls for s in sessions), "ok_cells": sum(len(s.ok_cells) for s in sessions),
            "failed_calls": sum(s.errors for s in sessions),
            "faults": faults.__dict__, "server_rss_max_mib": round(max(x[2] for x in samples) / 2**20, 1) if samples else None,
            "server_rss_growth_mib": round(rss_growth / 2**20, 1), "server_fd_growth": fd_growth,
            "elapsed_s": round(time.monotonic() - started, 1), "problems": problems,
            "ok_call_p50_ms": round(statistics.median(lat) * 1000, 1) if (lat := [x for s in sessions for x in s.latencies]) else None,
            "misbehaving_user": misbehaved,
        }
        return report
    finally:
        kp.cleanup()
        if args.tmpfs:
            if subprocess.run(["umount", data_dir]).returncode != 0:
                subprocess.run(["umount", "-l", data_dir])
            with contextlib.suppress(OSError):
                os.rmdir(data_dir)


def check_audit(kp: KernelpoolServer, sessions: list[Session]) -> list[str]:
    """Every cell that answered ok has its call in the audit log (none lost, full disk or not)."""
    problems = []
    rows = [json.loads(line) for line in kp.cli("audit", "--json", "--limit", "10000000").stdout.splitlines()]
    for user in {s.user for s in sessions}:
        logged = sum(1 for r in rows if r["user"] == user and r["tool"] == "insert_execute_code_cell" and r["outcome"] == "ok")
        ok = sum(len(s.ok_cells) for s in sessions if s.user == user)
        if logged < ok:
            problems.append(f"audit log of {user}: {logged} ok executions logged, {ok} answered ok")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    p.add_argument("--kill-every", type=float, default=10.0, help="mean seconds between kernel SIGKILLs")
    p.add_argument("--drop-every", type=float, default=7.0, help="mean seconds between a session's client drops")
    p.add_argument("--restart", choices=["sigterm", "sigkill", "none"], default="sigkill")
    p.add_argument("--json", help="write the report here too")
    p.add_argument("--misbehave", action="store_true", help="one more user floods sessions, output, results and bad tokens")
    p.add_argument("--tmpfs", help="data folder on a tmpfs of this size (root); the misbehaving user fills it")
    args = p.parse_args()
    # a SIGTERM (a timeout, a CI stop) must still run the clean-up: users, accounts, cgroups
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # dropped clients are the point here: the client library's tracebacks about them are noise
    logging.getLogger("mcp").setLevel(logging.CRITICAL)
    report = asyncio.run(soak(args))
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
