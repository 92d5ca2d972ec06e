"""One reader per kernel channel: messages are awaited once and handed to the request they answer.

jupyter_client's async channels poll the socket and then receive, per message, and its session
parses the dates of every header. With a hundred kernels on one event loop that was about a third
of the loop's time. Here each kernel has one task per channel (IOPub and shell) that awaits
`recv_multipart`, checks the signature, parses the JSON parts without touching dates, and puts the
message in the inbox of the request it answers (by the parent header's msg_id). Messages nobody
waits for (replies to silent requests, other clients' output) are dropped.

A content over `max_bytes` is not parsed: it is replaced by a note (`bounded_message`), so that
one huge output cannot hold the loop that serves every user. Used after the kernel answered its
first kernel_info (the start path reads the channels itself until then).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections import deque
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import DELIM, Session

log = logging.getLogger(__name__)

Message = dict[str, Any]

_INBOX_MAX = 1000  # messages waiting for one request (ZMQ's own receive queue holds 1000 too)

_STREAM_NAME = re.compile(rb'"name"\s*:\s*"(stdout|stderr)"')
_TEXT_START = re.compile(rb'"text"\s*:\s*"')


class Inbox:
    """The messages that answer one request, from every channel, in arrival order."""

    def __init__(self) -> None:
        self._items: deque[tuple[str, Message]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # set while the inbox has room: a full one holds its channel's reader back, so that a
        # kernel that floods its output waits in ZMQ's bounded queues, not in the server's memory
        self.room = asyncio.Event()
        self.room.set()

    def put(self, channel: str, msg: Message) -> None:
        self._items.append((channel, msg))
        if len(self._items) >= _INBOX_MAX:
            self.room.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, timeout: float) -> tuple[str, Message] | None:
        """The next message and its channel ("iopub" or "shell"); None after `timeout` seconds."""
        if not self._items:
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
        if len(self._items) <= _INBOX_MAX // 2:
            self.room.set()
        return self._items.popleft()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class KernelChannels:
    """Reads a started client's IOPub and shell sockets and routes what they carry."""

    def __init__(self, session: Session, iopub: zmq.asyncio.Socket, shell: zmq.asyncio.Socket, max_bytes: int = 0) -> None:
        self._session = session
        self._max_bytes = max_bytes  # 0: no limit
        self._inboxes: dict[str, Inbox] = {}
        self._tasks = [asyncio.create_task(self._read("iopub", iopub), name="kernel-iopub"),
                       asyncio.create_task(self._read("shell", shell), name="kernel-shell")]

    def listen(self, msg_id: str) -> Inbox:
        """An inbox for the answers to `msg_id`. Call it right after sending, with no await between."""
        inbox = self._inboxes[msg_id] = Inbox()
        return inbox

    def done(self, msg_id: str) -> None:
        inbox = self._inboxes.pop(msg_id, None)
        if inbox is not None:
            inbox.room.set()  # nobody reads it any more: a reader held back by it goes on

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._inboxes.clear()

    async def _read(self, channel: str, socket: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames: list[bytes] = await socket.recv_multipart()
            except zmq.ZMQError as exc:
                if socket.closed:
                    return
                log.warning("kernel %s channel: %s", channel, exc)
                continue
            try:
                msg = parse(self._session, frames, self._max_bytes if channel == "iopub" else 0)
            except ValueError as exc:
                log.warning("kernel %s channel: dropped a message: %s", channel, exc)
                continue
            inbox = self._inboxes.get(msg["parent_header"].get("msg_id", ""))
            if inbox is not None:
                inbox.put(channel, msg)
                await inbox.room.wait()


def parse(session: Session, frames: list[bytes], max_bytes: int = 0) -> Message:
    """One wire message as a dict shaped like jupyter_client's, without date parsing.

    Raises ValueError for an unsigned, badly signed or malformed message.
    """
    try:
        parts = frames[frames.index(DELIM) + 1:]
    except ValueError:
        raise ValueError("no delimiter") from None
    if len(parts) < 5:
        raise ValueError("fewer than 5 parts")
    if session.auth is not None:
        if not hmac.compare_digest(parts[0], session.sign(parts[1:5])):
            raise ValueError("invalid signature")
    header = json.loads(parts[1])
    parent = json.loads(parts[2])
    if max_bytes and len(parts[4]) > max_bytes:
        content = bounded_content(header.get("msg_type"), parts[4], max_bytes)
        metadata: dict[str, Any] = {}
    else:
        content, metadata = json.loads(parts[4]), json.loads(parts[3])
    return {"header": header, "msg_id": header.get("msg_id"), "msg_type": header.get("msg_type"),
            "parent_header": parent, "metadata": metadata, "content": content, "buffers": parts[5:]}


def bounded_content(kind: str | None, raw: bytes, max_bytes: int) -> dict[str, Any]:
    """What stands for a content too large to parse: a stream keeps its head and tail."""
    size = len(raw)
    note = (f"[an output message of {size} bytes was dropped unread: over the limit of "
            f"{max_bytes} bytes kept per execution (max_saved_execution_chars)]")
    if kind == "stream":
        name = _STREAM_NAME.search(raw[:200])
        text = _head_and_tail(raw, max_bytes // 8, size)
        return {"name": name.group(1).decode() if name else "stdout", "text": text if text is not None else note + "\n"}
    if kind == "error":
        return {"ename": "OutputTooLarge", "evalue": note, "traceback": [note]}
    if kind in ("display_data", "execute_result", "update_display_data"):
        return {"data": {"text/plain": note}, "metadata": {}}
    return {}


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
