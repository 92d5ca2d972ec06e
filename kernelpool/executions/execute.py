"""Running code in a kernel and collecting its outputs as notebook outputs (`outputs.Outputs`).

Called by `JobService` with a kernel from `KernelRegistry`, under the kernel's lock (one
execution at a time per kernel). A timeout interrupts the kernel and returns what was produced
so far; the result says how the execution ended (finished, timed out, stuck, died), and the
job service asks the registry to act on it: `execute` changes no kernel state itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from nbformat import NotebookNode

from kernelpool.executions.outputs import OutputLimits, Outputs
from kernelpool.kernels.channels import Inbox
from kernelpool.kernels.kernel import Kernel, KernelState
from kernelpool.kernels.wire import WireError

log = logging.getLogger(__name__)

Status = Literal["ok", "error", "timeout", "died", "interrupted"]
Progress = Callable[[float, str], Awaitable[None]]
Interrupt = Callable[[], Awaitable[None]]
OnOutput = Callable[[Outputs], None]  # told after each output message is taken in (the live view)

_POLL = 0.5  # seconds between liveness checks while a cell runs silently
_INTERRUPT_GRACE = 5.0


@dataclass
class ExecutionResult:
    status: Status
    execution_count: int | None = None
    outputs: list[NotebookNode] = field(default_factory=list)
    message: str | None = None
    duration: float = 0.0
    stuck: bool = False  # timed out and ignored the interrupt: the kernel is of no use any more


class _Run:
    """The reading side of one execution: iopub messages into outputs, the timeout, progress."""

    def __init__(self, kernel: Kernel, start: float, timeout: float, interrupt: Interrupt,
                 progress: Progress | None, progress_interval: float, limits: OutputLimits,
                 on_output: OnOutput | None = None) -> None:
        self.kernel = kernel
        self.on_output = on_output
        self.start = start
        self.timeout = timeout
        self.deadline = start + timeout
        self.interrupt = interrupt
        self.progress = progress
        self.progress_interval = progress_interval
        self.next_progress = start + progress_interval
        self.outputs = Outputs(limits)
        self.status: Status = "ok"
        self.message: str | None = None
        self.interrupted_at: float | None = None
        self.stuck = False
        self.replied = False
        self.execution_count: int | None = None

    async def until_idle(self, inbox: Inbox) -> None:
        """Read the request's answers until the kernel is idle again (or the run ends otherwise)."""
        while True:
            now = time.monotonic()
            if not await self._keep_time(now):
                return
            got = await inbox.get(max(self._wait(now), 0.01))
            if got is None:
                # closed: the kernel was stopped for misbehaving, or its process ended
                if inbox.closed or not await self.kernel.manager.is_alive():
                    self.status = "died"
                    return
                continue
            if self._take(*got):
                return

    async def reply(self, inbox: Inbox) -> None:
        """Wait (5 s at most) for the execute_reply if it has not come yet: it carries the count."""
        deadline = time.monotonic() + 5.0
        while not self.replied and (left := deadline - time.monotonic()) > 0:
            got = await inbox.get(left)
            if got is None:
                return
            self._take(*got)

    async def _keep_time(self, now: float) -> bool:
        """Interrupt at the timeout, give up after the grace, send progress; False: stop reading."""
        if self.interrupted_at is None and now >= self.deadline:
            await self.interrupt()
            self.interrupted_at = now
            self.status = "timeout"
            self.message = f"the execution ran past its timeout of {self.timeout:g} s and was interrupted"
        elif self.interrupted_at is not None and now - self.interrupted_at > _INTERRUPT_GRACE:
            self.stuck = True  # the code ignores SIGINT: the kernel is no use to anyone in this state
            return False
        if self.progress is not None and now >= self.next_progress:
            self.next_progress = now + self.progress_interval
            await self.progress(now - self.start, f"running for {now - self.start:.0f} s")
        return True

    def _wait(self, now: float) -> float:
        horizon = self.deadline if self.interrupted_at is None else self.interrupted_at + _INTERRUPT_GRACE
        wait = min(_POLL, horizon - now)
        if self.progress is not None:
            wait = min(wait, self.next_progress - now)
        return wait

    def _take(self, channel: str, msg: dict[str, Any]) -> bool:
        """Take one answer to our request; True when the kernel went idle after it."""
        kind = msg["msg_type"]
        if channel == "shell":
            if kind == "execute_reply":
                self.replied = True
                self.execution_count = msg["content"].get("execution_count")
            return False
        if kind == "status":
            return bool(msg["content"].get("execution_state") == "idle")
        if kind == "execute_input":
            return False
        if kind == "error" and self.status == "ok":
            self.status = "error"
        self.outputs.add(msg)
        if self.on_output is not None:
            self.on_output(self.outputs)
        return False


async def execute(
    kernel: Kernel,
    code: str,
    timeout: float,
    interrupt: Interrupt,
    limits: OutputLimits,
    *,
    progress: Progress | None = None,
    progress_interval: float = 5.0,
    store_history: bool = True,
    on_output: OnOutput | None = None,
) -> ExecutionResult:
    """Run `code` in `kernel` and report what happened; never raises for what the code does.

    The caller (`JobService`) holds `kernel.lock`, has marked the kernel busy, and acts on the
    ending through the registry: `died` (the process is gone) and `stuck` (it ignored the
    interrupt at the timeout) leave the kernel of no use. `interrupt` stops the kernel's work,
    at the timeout or when this call is cancelled.
    """
    channels = kernel.channels
    if channels is None:  # the registry hands out started kernels only
        raise RuntimeError(f"kernel {kernel.id} has no channels: it was not started")
    start = time.monotonic()
    run = _Run(kernel, start, timeout, interrupt, progress, progress_interval, limits, on_output)
    try:
        # the inbox exists before the request is sent; a kernel that does not read its requests
        # holds the send back no longer than the timeout
        msg_id, inbox = await asyncio.wait_for(channels.execute(code, store_history=store_history), timeout)
    except (TimeoutError, WireError) as exc:
        if isinstance(exc, TimeoutError) and kernel.death_cause is None:
            kernel.death_cause = f"the kernel did not take the request within its timeout of {timeout:g} s (it does not read its shell channel)"
        return ExecutionResult("died", duration=time.monotonic() - start)
    try:
        await run.until_idle(inbox)
        if run.status != "died" and not run.stuck and kernel.state is KernelState.BUSY:
            await run.reply(inbox)
    except asyncio.CancelledError:
        # the client cancelled: stop the kernel's work too, and let the cancellation go on
        await interrupt()
        raise
    finally:
        channels.done(msg_id)
    if run.status == "timeout":
        # the KeyboardInterrupt traceback is our doing, not the user's code: say so once, in `message`
        run.outputs.remove_errors("KeyboardInterrupt")
    return ExecutionResult(run.status, run.execution_count if run.replied else None, run.outputs.items, run.message,
                           time.monotonic() - start, run.stuck)
