"""One kernel: its process (through its `AsyncKernelManager`), its state and, once it died, why.

Created by `kernels.launch.KernelLauncher`, owned by `kernels.registry.KernelRegistry`; the
execution layer moves it between idle and busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import signal
import time
from dataclasses import dataclass, field

from jupyter_client.manager import AsyncKernelManager

from kernelpool.kernels.channels import KernelChannels
from sandbox import Cgroup, Identity, Limits
from sandbox.rundir import KernelRunDir


class KernelState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"
    STOPPING = "stopping"


_TRANSITIONS: dict[KernelState, set[KernelState]] = {
    KernelState.STARTING: {KernelState.IDLE, KernelState.DEAD, KernelState.STOPPING},
    KernelState.IDLE: {KernelState.BUSY, KernelState.DEAD, KernelState.STOPPING},
    KernelState.BUSY: {KernelState.IDLE, KernelState.DEAD, KernelState.STOPPING},
    KernelState.DEAD: {KernelState.STOPPING},
    KernelState.STOPPING: set(),
}


@dataclass(eq=False)
class Kernel:
    id: str
    user: str
    manager: AsyncKernelManager
    cgroup: Cgroup | None
    memory_limit: int | None
    rundir: KernelRunDir | None = None
    limits: Limits | None = None  # the per-kernel limits it was started with
    path: str | None = None  # the notebook it serves, relative to the user's folder (None while pooled)
    channels: KernelChannels | None = None  # the server's connections to it (shell, IOPub, control), once it started
    state: KernelState = KernelState.STARTING
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    executions: int = 0
    death_cause: str | None = None
    admitted: bool = False  # holds one of its user's kernel slots (KernelRegistry._admit) until stopped
    network_of: Identity | None = None  # whose network namespace this kernel counts in (until stopped)
    spec: str = "python3"  # its kernelspec's name (kernels.specs)
    uid: int | None = None  # its user's uid when it started: a name added again after a removal has another
    # one execution at a time: the kernel runs them in order anyway, and one reader per channel
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def transition(self, new: KernelState) -> None:
        """Move to `new`; RuntimeError if the state machine has no such transition."""
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"kernel {self.id}: no transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def pid(self) -> int | None:
        prov = self.manager.provisioner
        return getattr(prov, "pid", None) if prov is not None else None

    async def is_alive(self) -> bool:
        return self.state not in (KernelState.DEAD, KernelState.STOPPING) and await self.manager.is_alive()

    async def interrupt(self) -> None:
        """SIGINT to the kernel (its spec's interrupt mode): stops the running cell."""
        await self.manager.interrupt_kernel()

    def mark_dead(self) -> str:
        """The process is gone: DEAD (unless already stopping), and why, in words."""
        cause = self.explain_death()
        with contextlib.suppress(RuntimeError):
            self.transition(KernelState.DEAD)
        return cause

    def explain_death(self) -> str:
        """Why the kernel process is gone, in words: out of memory, a signal, or an exit code."""
        if self.death_cause:
            return self.death_cause
        cause = "the kernel process died"
        process = getattr(self.manager.provisioner, "process", None)
        code = getattr(process, "returncode", None)
        if self.cgroup is not None and self.cgroup.oom_kills() > 0:
            limit = f" of {_fmt_bytes(self.memory_limit)}" if self.memory_limit else ""
            cause = f"the kernel was killed because it ran out of memory (limit{limit})"
        elif getattr(process, "exit_unknown", False):
            cause = "the kernel process ended; its exit status was lost with the fork server that started it"
        elif code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            cause = f"the kernel process was killed by {name}"
        elif code is not None:
            cause = f"the kernel process exited with code {code}"
        self.death_cause = cause
        return cause

    def process_usage(self) -> tuple[int, float]:
        """Memory (RSS, bytes) and CPU seconds of the kernel process itself; 0 where unknown."""
        import psutil

        memory, cpu = 0, 0.0
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            proc = psutil.Process(self.pid)
            memory = proc.memory_info().rss
            times = proc.cpu_times()
            cpu = times.user + times.system
        return memory, cpu


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "none"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"
