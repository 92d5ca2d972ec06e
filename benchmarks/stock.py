"""The stock baseline: bare `jupyter_client` kernels in the benchmark's own process.

Same kernel command line as kernelpool's (ipykernel, history in memory), ipc transport, no
sandbox, no MCP, no notebook file: what any Jupyter front end pays at least.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import tempfile
import time
from typing import Any

from jupyter_client.manager import AsyncKernelManager

# kernelpool passes the same option: a history database shared by many kernels locks up
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]


class StockKernel:
    """One ipykernel started by `AsyncKernelManager` over ipc, and its client."""

    def __init__(self, folder: str, name: str) -> None:
        self.manager = AsyncKernelManager(
            kernel_name="python3", transport="ipc", ip=os.path.join(folder, name),
            connection_file=os.path.join(folder, f"{name}.json"),
        )
        self.manager.shutdown_wait_time = 2.0
        self.client: Any = None
        self.lock = asyncio.Lock()  # one execution at a time, as in any front end

    @property
    def pid(self) -> int | None:
        prov = self.manager.provisioner
        return getattr(prov, "pid", None) if prov is not None else None

    async def start(self, timeout: float = 120) -> float:
        """Start and wait until ready; returns the seconds it took."""
        t0 = time.perf_counter()
        await self.manager.start_kernel(extra_arguments=KERNEL_ARGS, cwd=os.path.dirname(self.manager.connection_file))
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=timeout)
        return time.perf_counter() - t0

    async def execute(self, code: str, timeout: float = 60) -> tuple[str, str]:
        """Run `code`; returns (reply status, stream text) once the reply and idle have both arrived."""
        async with self.lock:
            c = self.client
            msg_id = c.execute(code, store_history=True, allow_stdin=False)
            deadline = time.monotonic() + timeout
            text: list[str] = []
            status: str | None = None
            idle = False
            while status is None or not idle:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply in {timeout} s")
                if not idle:
                    try:
                        msg = await c.get_iopub_msg(timeout=left)
                    except queue.Empty:
                        continue
                    if msg["parent_header"].get("msg_id") != msg_id:
                        continue
                    kind = msg["msg_type"]
                    if kind == "stream":
                        text.append(msg["content"]["text"])
                    elif kind == "execute_result":
                        text.append(msg["content"]["data"].get("text/plain", ""))
                    elif kind == "status" and msg["content"]["execution_state"] == "idle":
                        idle = True
                else:
                    try:
                        reply = await c.get_shell_msg(timeout=left)
                    except queue.Empty:
                        continue
                    if reply["parent_header"].get("msg_id") == msg_id:
                        status = reply["content"]["status"]
            return status, "".join(text)

    async def stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        with contextlib.suppress(Exception):
            await self.manager.shutdown_kernel(now=False)


class StockKernels:
    """N stock kernels in a temporary folder; `async with` stops them all and removes it."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="kpb-stock-", dir="/tmp")
        self.kernels: list[StockKernel] = []
        self._next = 0

    def new(self) -> StockKernel:
        k = StockKernel(self.folder, f"k{self._next}")
        self._next += 1
        self.kernels.append(k)
        return k

    async def start_many(self, n: int, at_once: int) -> float:
        """Start n kernels, at most `at_once` starting together; seconds until all are ready."""
        sem = asyncio.Semaphore(at_once)
        kernels = [self.new() for _ in range(n)]

        async def one(k: StockKernel) -> None:
            async with sem:
                await k.start()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in kernels))
        return time.perf_counter() - t0

    def pids(self) -> list[int]:
        return [k.pid for k in self.kernels if k.pid]

    async def stop_all(self) -> None:
        await asyncio.gather(*(k.stop() for k in self.kernels), return_exceptions=True)
        self.kernels.clear()

    async def __aenter__(self) -> StockKernels:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()
        shutil.rmtree(self.folder, ignore_errors=True)
