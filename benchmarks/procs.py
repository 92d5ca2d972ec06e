"""Processes and memory: the server's RSS over time, its kernels' PSS, and leftovers.

A server's kernels are found two ways and merged: the processes in the server's cgroup tree
(`<server's memory cgroup>/<cgroup prefix>/...`, where the sandbox puts them) and the server's
descendants whose command line runs ipykernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from typing import Any

import psutil

_MEMORY_ROOT = "/sys/fs/cgroup/memory"


def memory_cgroup_of(pid: int) -> str | None:
    """The absolute path of `pid`'s cgroup v1 memory folder, or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return os.path.join(_MEMORY_ROOT, path.lstrip("/"))
    except OSError:
        return None
    return None


def cgroup_tree_pids(root: str) -> set[int]:
    pids: set[int] = set()
    if not os.path.isdir(root):
        return pids
    for folder, _, files in os.walk(root):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError), open(os.path.join(folder, "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
    return pids


def cgroup_tree_dirs(root: str) -> list[str]:
    return [folder for folder, _, _ in os.walk(root)] if os.path.isdir(root) else []


def _is_kernel(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "ipykernel" in " ".join(proc.cmdline())
    return False


def kernel_processes(server_pid: int | None, cgroup_root: str | None) -> list[psutil.Process]:
    """The kernel processes of a server: in its cgroup tree, or its ipykernel descendants."""
    pids: set[int] = set()
    if cgroup_root:
        pids |= cgroup_tree_pids(cgroup_root)
    if server_pid:
        with contextlib.suppress(psutil.Error):
            pids |= {c.pid for c in psutil.Process(server_pid).children(recursive=True) if _is_kernel(c)}
    procs = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    return procs


def memory_of(procs: Iterable[psutil.Process]) -> dict[str, Any]:
    """Total and per-process PSS/USS/RSS in MB (processes that vanish meanwhile are skipped)."""
    pss = uss = rss = 0
    n = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            pss += info.pss
            uss += info.uss
            rss += info.rss
            n += 1
    mb = 1 << 20
    return {
        "processes": n,
        "pss_total_mb": round(pss / mb, 1),
        "pss_per_kernel_mb": round(pss / mb / n, 1) if n else None,
        "uss_per_kernel_mb": round(uss / mb / n, 1) if n else None,
        "rss_per_kernel_mb": round(rss / mb / n, 1) if n else None,
    }


class RssSampler:
    """Samples one process's RSS every `interval` seconds in the background; keeps the max."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.samples: list[int] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.samples.append(self._proc.memory_info().rss)
            await asyncio.sleep(self._interval)

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        mb = 1 << 20
        return {
            "samples": len(self.samples),
            "max_mb": round(max(self.samples) / mb, 1) if self.samples else None,
            "last_mb": round(self.samples[-1] / mb, 1) if self.samples else None,
        }
