"""The kernel client kernelpool uses: jupyter_client's async client with a faster readiness check.

`kernels.launch.KernelLauncher` makes its managers build this class (`client_class`). Measured
on a kernel that is ready in ~40 ms after fork, jupyter_client's `wait_for_ready` answered
after ~250–400 ms:

- ZMQ's reconnect interval (100 ms): the client connects before the kernel has bound its ipc
  sockets, and the retry only comes 100 ms later. We retry every 10 ms.
- After the kernel_info reply, `wait_for_ready` "flushes" IOPub until it has been silent for
  200 ms, always. We only need to know IOPub is connected: any message on it (ipykernel ≥ 7
  greets each new subscriber with `iopub_welcome`; older ones send the request's status) says
  so. Readers of IOPub filter by parent msg_id anyway (see execution.py).

It also bounds what one IOPub message can cost the server: checking the signature of and
parsing a 25 MB output takes ~175 ms of the one event loop that serves every user. A message
whose content is larger than `max_message_bytes` is not parsed: its content is replaced by a note
(`_BoundedIOPubChannel`). Its signature is not checked either: only the kernel's own user can
reach its ipc sockets, and that kernel holds the key anyway.
"""

from __future__ import annotations

import json
import re
import time
from queue import Empty
from typing import Any, cast

import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from traitlets import Type

_RECONNECT_IVL_MS = 10
_ATTEMPT_S = 1.0  # a kernel_info request gets this long before it is sent again
_IOPUB_S = 0.5  # after the reply, how long IOPub may take to show it is connected


_STREAM_NAME = re.compile(rb'"name"\s*:\s*"(stdout|stderr)"')


_TEXT_START = re.compile(rb'"text"\s*:\s*"')


def _json_piece(raw: bytes) -> str | None:
    try:
        value = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _head_and_tail(content: bytes, keep: int, size: int) -> str | None:
    """The first and last `keep` bytes of a stream message's text, decoded without parsing the
    rest (ipykernel batches a fast writer's output into one message: a loop that prints 200 MB
    can send 40 MB at once). None when the content does not look like ipykernel's."""
    found = _TEXT_START.search(content[:200])
    end = content.rstrip().rfind(b'"')
    if found is None or end <= found.end() + 2 * keep:
        return None
    start = found.end()
    head = tail = None
    for trim in range(13):  # a cut inside an escape (\uXXXX\uXXXX) or a UTF-8 character
        head = head if head is not None else _json_piece(content[start:start + keep - trim])
        if tail is None:
            at = end - keep + trim
            backslashes = len(content[:at]) - len(content[:at].rstrip(b"\\"))
            if backslashes % 2 == 0:  # not the second half of an escape
                tail = _json_piece(content[at:end])
    if head is None or tail is None:
        return None
    return (f"{head}\n[... about {size - 2 * keep} bytes of output dropped unread: one message over the "
            f"limit kept per execution (max_saved_execution_chars) ...]\n{tail}")


class _BoundedIOPubChannel(AsyncZMQSocketChannel):  # type: ignore[misc]
    max_bytes = 0  # content larger than this is replaced by a note, unparsed (0 = no limit)

    async def _recv(self, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        assert self.socket is not None
        frames: list[bytes] = await self.socket.recv_multipart(**kwargs)
        _, parts = self.session.feed_identities(frames)
        smsg = cast(list[bytes], parts)  # recv_multipart copies: bytes, not Frames
        # [signature, header, parent_header, metadata, content, buffers...]
        if not self.max_bytes or len(smsg) < 5 or len(smsg[4]) <= self.max_bytes:
            return self.session.deserialize(smsg)  # type: ignore[no-any-return]
        header = json.loads(smsg[1])
        content_size = len(smsg[4])
        note = (f"[an output message of {content_size} bytes was dropped unread: over the limit of "
                f"{self.max_bytes} bytes kept per execution (max_saved_execution_chars)]")
        kind = header.get("msg_type")
        if kind == "stream":
            name = _STREAM_NAME.search(smsg[4][:200])
            text = _head_and_tail(smsg[4], self.max_bytes // 8, content_size)
            content: dict[str, Any] = {"name": name.group(1).decode() if name else "stdout",
                                       "text": text if text is not None else note + "\n"}
        elif kind == "error":
            content = {"ename": "OutputTooLarge", "evalue": note, "traceback": [note]}
        elif kind in ("display_data", "execute_result", "update_display_data"):
            content = {"data": {"text/plain": note}, "metadata": {}}
        else:
            content = {}
        return {"header": header, "msg_id": header.get("msg_id"), "msg_type": kind,
                "parent_header": json.loads(smsg[2]), "metadata": {}, "content": content, "buffers": []}


class KernelpoolClient(AsyncKernelClient):  # type: ignore[misc]
    iopub_channel_class = Type(_BoundedIOPubChannel)
    max_message_bytes = 0  # set by the registry before start_channels: see _BoundedIOPubChannel

    def start_channels(self, *args: Any, **kwargs: Any) -> None:
        # default for every socket this client's context creates from now on
        self.context.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        # no heartbeat thread: a dead kernel is seen through its process (the provisioner's
        # poll), and a thread per kernel costs every request the GIL with hundreds of kernels
        kwargs.setdefault("hb", False)
        super().start_channels(*args, **kwargs)
        self.iopub_channel.max_bytes = self.max_message_bytes

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
