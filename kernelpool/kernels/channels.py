"""The server's side of one kernel's channels: one reader task per channel, every message read
within bounds, handed to the request it answers.

The server connects to three of the kernel's sockets, with its own ZMTP client (`kernels.wire`;
libzmq's queues do not bound a message's bytes): shell (requests and their replies), IOPub
(outputs) and control (the shutdown request). It never asks for input and does not heartbeat
(a dead kernel is seen through its process), so it does not connect to stdin or the heartbeat:
what a kernel sends there reaches nothing of the server's.

Each channel has one task that reads one message at a time (`messages.read_message`, which
bounds what it takes), puts it in the inbox of the request it answers (by the parent header's
msg_id) and gives the event loop to every other task before the next. A request's inbox holds
at most `_INBOX_MAX` messages and about what the request may keep (max_saved_execution_chars)
in bytes; a full one holds its channel's reader back, so that a kernel
that floods waits in its own socket buffers, not in the server's memory. A kernel that breaks a
bound or the protocol (`messages.Misbehaviour`) is no longer read: its requests end at once and
`on_misbehaviour` is told (the registry stops it), once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal, overload

from jupyter_client.session import Session

from kernelpool.kernels.messages import ChannelLimits, FloodMeter, Message, Misbehaviour, Pace, read_message
from kernelpool.kernels.wire import Wire, WireError

log = logging.getLogger(__name__)

_INBOX_MAX = 1000  # messages waiting for one request
_ATTEMPT_S = 1.0  # during start-up, a kernel_info request gets this long before it is sent again
_IOPUB_S = 0.5  # after its reply, how long IOPub may take to show it is connected
_LOST_GRACE_S = 1.0  # a connection that ends while the process lives on: the kernel closed it
_SOCKET_TYPES = {"shell": "DEALER", "iopub": "SUB", "control": "DEALER"}


class Inbox:
    """The messages that answer one request, from every channel, in arrival order."""

    def __init__(self, budget: int) -> None:
        self._items: deque[tuple[str, Message, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.budget = budget  # content bytes the reader may still parse for this request
        self._max_bytes = max(budget, 1 << 20)  # held at once, about: past it the reader waits too
        self._bytes = 0
        self.closed = False  # the kernel's channels are closed: nothing more will come
        # set while the inbox has room: a full one holds its channel's reader back, so that a
        # kernel that floods its output waits in its own socket buffers, not in the server's memory
        self.room = asyncio.Event()
        self.room.set()

    def put(self, channel: str, msg: Message, *, size: int = 0) -> None:
        """Add a message that holds about `size` bytes (messages.read_message says)."""
        self._items.append((channel, msg, size))
        self._bytes += size
        if len(self._items) >= _INBOX_MAX or self._bytes >= self._max_bytes:
            self.room.clear()
        self._wake()

    def close(self) -> None:
        self.closed = True
        self.room.set()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, timeout: float) -> tuple[str, Message] | None:
        """The next message and its channel ("iopub", "shell" or "control"); None after
        `timeout` seconds, or at once when the channels are closed and nothing is left."""
        if not self._items and not self.closed:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if not self._items:
            return None
        channel, msg, size = self._items.popleft()
        self._bytes -= size
        if len(self._items) <= _INBOX_MAX // 2 and self._bytes < self._max_bytes // 2:
            self.room.set()
        return channel, msg


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class KernelChannels:
    """One kernel's shell, IOPub and control connections and their readers. Made by
    `KernelLauncher.open_channels` (`open`); used by the execution layer (`execute`) and the
    registry (`ready`, `close`)."""

    def __init__(self, session: Session, wires: dict[str, Wire], limits: ChannelLimits, pace: Pace,
                 alive: Callable[[], Awaitable[bool]], on_misbehaviour: Callable[[Misbehaviour], None]) -> None:
        self._session = session
        self._wires = wires
        self._limits = limits
        self._meter = FloodMeter(limits, pace)
        self._alive = alive
        self._on_misbehaviour = on_misbehaviour
        self._inboxes: dict[str, Inbox] = {}
        self._closing = False
        self.failure: Misbehaviour | None = None  # why the kernel is no longer read
        self.iopub_seen = asyncio.Event()  # any message on IOPub: the subscription is in place
        self._tasks = [asyncio.create_task(self._read(name, wire), name=f"kernel-{name}") for name, wire in wires.items()]

    @classmethod
    async def open(cls, session: Session, paths: dict[str, str], limits: ChannelLimits, pace: Pace,
                   alive: Callable[[], Awaitable[bool]], on_misbehaviour: Callable[[Misbehaviour], None]) -> KernelChannels:
        """Connect to the kernel's sockets at `paths` (channel -> ipc path, in its locked
        runtime folder) and start reading them; `pace` is shared by the user's kernels."""
        wires: dict[str, Wire] = {}
        try:
            for name, kind in _SOCKET_TYPES.items():
                wires[name] = await Wire.connect(paths[name], kind, subscribe=kind == "SUB")
        except BaseException:
            for wire in wires.values():
                wire.close()
            raise
        return cls(session, wires, limits, pace, alive, on_misbehaviour)

    def listen(self, msg_id: str) -> Inbox:
        """An inbox for the answers to `msg_id`; `done(msg_id)` when they no longer matter."""
        inbox = self._inboxes[msg_id] = Inbox(self._limits.max_parse)
        if self.failure is not None or self._closing:
            inbox.close()
        return inbox

    def done(self, msg_id: str) -> None:
        inbox = self._inboxes.pop(msg_id, None)
        if inbox is not None:
            inbox.room.set()  # nobody reads it any more: a reader held back by it goes on

    @overload
    async def request(self, channel: str, msg_type: str, content: dict[str, Any], *,
                      listen: Literal[True] = True) -> tuple[str, Inbox]: ...
    @overload
    async def request(self, channel: str, msg_type: str, content: dict[str, Any], *,
                      listen: Literal[False]) -> tuple[str, None]: ...
    @overload
    async def request(self, channel: str, msg_type: str, content: dict[str, Any], *,
                      listen: bool) -> tuple[str, Inbox | None]: ...

    async def request(self, channel: str, msg_type: str, content: dict[str, Any], *,
                      listen: bool = True) -> tuple[str, Inbox | None]:
        """Send a request; its msg_id and, with `listen`, the inbox of its answers (made before
        the send, so that none is missed). Raises WireError if the connection is gone."""
        msg = self._session.msg(msg_type, content)
        msg_id: str = msg["header"]["msg_id"]
        inbox = self.listen(msg_id) if listen else None
        try:
            await self._wires[channel].send(self._session.serialize(msg))
        except (OSError, WireError) as exc:
            self.done(msg_id)
            raise WireError(f"could not send to the kernel's {channel} channel: {exc}") from exc
        return msg_id, inbox

    @overload
    async def execute(self, code: str, *, silent: bool = False, store_history: bool = True,
                      listen: Literal[True] = True) -> tuple[str, Inbox]: ...
    @overload
    async def execute(self, code: str, *, silent: bool = False, store_history: bool = True,
                      listen: Literal[False]) -> tuple[str, None]: ...

    async def execute(self, code: str, *, silent: bool = False, store_history: bool = True,
                      listen: bool = True) -> tuple[str, Inbox | None]:
        """An execute_request (no input is ever allowed); its msg_id and the inbox of its answers."""
        return await self.request("shell", "execute_request", {
            "code": code, "silent": silent, "store_history": store_history, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}, listen=listen)

    async def ready(self, timeout: float) -> dict[str, Any]:
        """Once the kernel answered kernel_info and IOPub is connected: its kernel_info reply.
        RuntimeError if it dies, misbehaves or `timeout` seconds pass first (the start path)."""
        deadline = time.monotonic() + timeout
        while True:
            msg_id, inbox = await self.request("shell", "kernel_info_request", {})
            try:
                reply = await _reply(inbox, "kernel_info_reply", min(deadline, time.monotonic() + _ATTEMPT_S))
            finally:
                self.done(msg_id)
            if reply is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.iopub_seen.wait(), max(0.0, min(deadline - time.monotonic(), _IOPUB_S)))
                if self.iopub_seen.is_set():
                    return dict(reply["content"])
            if self.failure is not None:
                raise RuntimeError(f"the kernel was stopped: {self.failure}")
            if not await self._alive():
                raise RuntimeError("Kernel died before replying to kernel_info")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")

    async def request_shutdown(self) -> None:
        """Ask the kernel to shut down (control channel), without waiting for its answer."""
        with contextlib.suppress(OSError, WireError, TimeoutError):
            await asyncio.wait_for(self.request("control", "shutdown_request", {"restart": False}, listen=False), 1.0)

    async def close(self) -> None:
        """Stop reading and close the connections; waiting requests end."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for wire in self._wires.values():
            wire.close()
        for inbox in self._inboxes.values():
            inbox.close()
        self._inboxes.clear()

    async def _read(self, channel: str, wire: Wire) -> None:
        try:
            while True:
                msg, waiting, size = await read_message(wire, self._session, self._limits, channel,
                                                        self._inboxes.get, self._meter)
                if channel == "iopub":
                    self.iopub_seen.set()
                if msg is not None and isinstance(waiting, Inbox):
                    waiting.put(channel, msg, size=size)
                    await waiting.room.wait()
                await asyncio.sleep(0)  # one message at a time: every other task gets the loop between two
        except Misbehaviour as exc:
            self._fail(exc)
        except (WireError, OSError) as exc:
            if not self._closing:
                await self._lost(channel, exc)

    async def _lost(self, channel: str, exc: Exception) -> None:
        """A connection ended: the process died (its requests end, and the registry finds out
        why), or the kernel closed it and lives on, which is misbehaviour too."""
        deadline = time.monotonic() + _LOST_GRACE_S
        while time.monotonic() < deadline:
            if not await self._alive():
                for inbox in self._inboxes.values():
                    inbox.close()
                return
            await asyncio.sleep(0.1)
        self._fail(Misbehaviour("closed", f"it closed its {channel} channel's connection to the server ({exc})"))

    def _fail(self, exc: Misbehaviour) -> None:
        if self.failure is not None or self._closing:
            return
        self.failure = exc
        log.warning("kernel misbehaved: %s", exc)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()  # nothing more is read from this kernel
        for inbox in self._inboxes.values():
            inbox.close()
        self._on_misbehaviour(exc)


async def _reply(inbox: Inbox, kind: str, until: float) -> Message | None:
    while (left := until - time.monotonic()) > 0:
        got = await inbox.get(left)
        if got is None:
            return None
        channel, msg = got
        if channel == "shell" and msg["msg_type"] == kind:
            return msg
    return None
