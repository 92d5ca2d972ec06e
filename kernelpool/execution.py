"""Running code in a kernel and collecting its outputs as notebook outputs.

Called by the tool layer with a kernel from `KernelRegistry`. One execution at a time per
kernel (`Kernel.lock`). A timeout interrupts the kernel and returns what was produced so far;
a kernel that dies mid-cell ends the execution with the cause in words.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from nbformat import NotebookNode
from nbformat.v4 import output_from_msg

from kernelpool.kernels import Kernel, KernelRegistry, KernelState

log = logging.getLogger(__name__)

Status = Literal["ok", "error", "timeout", "died", "interrupted"]
Progress = Callable[[float, str], Awaitable[None]]

_POLL = 0.5  # seconds between liveness checks while a cell runs silently
_INTERRUPT_GRACE = 5.0


@dataclass
class ExecutionResult:
    status: Status
    execution_count: int | None = None
    outputs: list[NotebookNode] = field(default_factory=list)
    message: str | None = None
    duration: float = 0.0


class _Outputs:
    """Accumulates iopub messages into notebook outputs the way JupyterLab does."""

    def __init__(self) -> None:
        self.items: list[NotebookNode] = []
        self._clear_pending = False
        self._display_ids: dict[str, list[int]] = {}

    def add(self, msg: dict[str, Any]) -> None:
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                self._clear()
            return
        if kind == "update_display_data":
            display_id = content.get("transient", {}).get("display_id")
            for i in self._display_ids.get(display_id, []):
                out = self.items[i]
                out["data"] = content.get("data", {})
                out["metadata"] = content.get("metadata", {})
            return
        if kind not in ("stream", "display_data", "execute_result", "error"):
            return
        if self._clear_pending:
            self._clear()
        out = output_from_msg(msg)
        if kind == "stream" and self.items and self.items[-1].output_type == "stream" and self.items[-1].name == out.name:
            self.items[-1].text += out.text
            return
        display_id = content.get("transient", {}).get("display_id")
        if display_id:
            self._display_ids.setdefault(display_id, []).append(len(self.items))
        self.items.append(out)

    def _clear(self) -> None:
        self.items = []
        self._display_ids = {}
        self._clear_pending = False


async def execute(
    registry: KernelRegistry,
    kernel: Kernel,
    code: str,
    timeout: float,
    progress: Progress | None = None,
    progress_interval: float = 5.0,
    store_history: bool = True,
) -> ExecutionResult:
    """Run `code` in `kernel`; never raises for what the code does, only reports it."""
    async with kernel.lock:
        client = kernel.client
        assert client is not None
        if not await kernel.is_alive():
            cause = await registry.mark_dead(kernel)
            return ExecutionResult("died", message=cause)
        kernel.transition(KernelState.BUSY)
        kernel.executions += 1
        start = time.monotonic()
        deadline = start + timeout
        next_progress = start + progress_interval
        outputs = _Outputs()
        msg_id = client.execute(code, store_history=store_history, allow_stdin=False, stop_on_error=True)
        status: Status = "ok"
        message: str | None = None
        interrupted_at: float | None = None
        try:
            while True:
                now = time.monotonic()
                if interrupted_at is None and now >= deadline:
                    await registry.interrupt(kernel)
                    interrupted_at = now
                    status, message = "timeout", f"the execution ran past its timeout of {timeout:g} s and was interrupted"
                elif interrupted_at is not None and now - interrupted_at > _INTERRUPT_GRACE:
                    # the code ignores SIGINT: the kernel is no use to anyone in this state
                    message = (f"the execution ran past its timeout of {timeout:g} s and did not stop when "
                               "interrupted; the kernel was shut down (its variables are lost)")
                    await registry.shutdown(kernel.user, kernel.notebook or "")
                    break
                if progress is not None and now >= next_progress:
                    next_progress = now + progress_interval
                    await progress(now - start, f"running for {now - start:.0f} s")
                horizon = deadline if interrupted_at is None else interrupted_at + _INTERRUPT_GRACE
                wait = min(_POLL, horizon - now)
                if progress is not None:
                    wait = min(wait, next_progress - now)
                try:
                    msg = await client.get_iopub_msg(timeout=max(wait, 0.01))
                except queue.Empty:
                    if not await kernel.manager.is_alive():
                        status, message = "died", await registry.mark_dead(kernel)
                        break
                    continue
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "status":
                    if msg["content"].get("execution_state") == "idle":
                        break
                    continue
                if kind == "execute_input":
                    continue
                if kind == "error" and status == "ok":
                    status = "error"
                outputs.add(msg)
        except asyncio.CancelledError:
            # the client cancelled: stop the kernel's work too, and let the cancellation go on
            await registry.interrupt(kernel)
            _back_to_idle(kernel)
            raise
        count = None
        if status != "died" and kernel.state is KernelState.BUSY:
            count = await _reply_count(client, msg_id)
        _back_to_idle(kernel)
        if status == "timeout" and any(o.output_type == "error" and o.ename == "KeyboardInterrupt" for o in outputs.items):
            # the KeyboardInterrupt traceback is our doing, not the user's code: say so once, in `message`
            outputs.items = [o for o in outputs.items if not (o.output_type == "error" and o.ename == "KeyboardInterrupt")]
        return ExecutionResult(status, count, outputs.items, message, time.monotonic() - start)


def _back_to_idle(kernel: Kernel) -> None:
    if kernel.state is KernelState.BUSY:
        kernel.transition(KernelState.IDLE)


async def _reply_count(client: Any, msg_id: str) -> int | None:
    """The execute_reply's execution_count; skips replies to earlier, abandoned requests."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            reply = await client.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            return reply["content"].get("execution_count")
    return None
