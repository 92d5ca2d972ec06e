"""The kernel client kernelpool uses: jupyter_client's async client with a faster readiness check.

`kernels.launch.KernelLauncher` makes its managers build this class (`client_class`). Measured
on a kernel that is ready in ~40 ms after fork, jupyter_client's `wait_for_ready` answered
after ~250–400 ms:

- ZMQ's reconnect interval (100 ms): the client connects before the kernel has bound its ipc
  sockets, and the retry only comes 100 ms later. We retry every 10 ms.
- After the kernel_info reply, `wait_for_ready` "flushes" IOPub until it has been silent for
  200 ms, always. We only need to know IOPub is connected: any message on it (ipykernel ≥ 7
  greets each new subscriber with `iopub_welcome`; older ones send the request's status) says
  so. Later messages are routed by parent msg_id anyway (`channels.KernelChannels`).

Once the kernel answers, its channels are read by `channels.KernelChannels` (one task per
channel, which also bounds what one huge message can cost the server), not through this client.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient

_RECONNECT_IVL_MS = 10
_ATTEMPT_S = 1.0  # a kernel_info request gets this long before it is sent again
_IOPUB_S = 0.5  # after the reply, how long IOPub may take to show it is connected


class KernelpoolClient(AsyncKernelClient):  # type: ignore[misc]
    def start_channels(self, *args: Any, **kwargs: Any) -> None:
        # default for every socket this client's context creates from now on
        self.context.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        # no heartbeat thread: a dead kernel is seen through its process (the provisioner's
        # poll), and a thread per kernel costs every request the GIL with hundreds of kernels
        kwargs.setdefault("hb", False)
        super().start_channels(*args, **kwargs)

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        """Return once the kernel answered kernel_info and IOPub is connected; raise RuntimeError
        if it dies or `timeout` seconds pass first (the registry's start path calls this)."""
        deadline = time.monotonic() + (float("inf") if timeout is None else timeout)
        iopub_seen = False
        while True:
            msg_id = self.kernel_info()
            attempt_end = min(deadline, time.monotonic() + _ATTEMPT_S)
            reply = await self._reply_to(msg_id, attempt_end)
            if reply is not None:
                iopub_end = min(deadline, time.monotonic() + _IOPUB_S)
                iopub_seen = iopub_seen or await self._any_iopub(iopub_end)
                if iopub_seen:
                    self._handle_kernel_info_reply(reply)
                    return
            if not await self._async_is_alive():
                raise RuntimeError("Kernel died before replying to kernel_info")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")

    async def _reply_to(self, msg_id: str, until: float) -> dict[str, Any] | None:
        while (left := until - time.monotonic()) > 0:
            try:
                msg = await self.shell_channel.get_msg(timeout=left)
            except Empty:
                return None
            if msg["msg_type"] == "kernel_info_reply" and msg["parent_header"].get("msg_id") == msg_id:
                return dict(msg)
        return None

    async def _any_iopub(self, until: float) -> bool:
        try:
            await self.iopub_channel.get_msg(timeout=max(0.0, until - time.monotonic()))
        except Empty:
            return False
        return True
