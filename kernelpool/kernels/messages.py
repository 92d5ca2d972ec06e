"""Reading one Jupyter message from a kernel's socket, within bounds decided before each read.

A kernel knows its connection key: it can send anything, signed, on any socket the server
connected. So every message is read frame by frame from `wire.Wire` and checked against
`ChannelLimits` before its bytes are taken: the whole message (`max_message`, all frames), the
number of frames, and everything but the content (identities, signature, header, parent header,
metadata; `_MAX_HEAD` together). The parent header says which request the message answers
(`route`); what no request waits for (and anything but a reply on shell and control) is passed
through unread, unverified and unparsed, and counts against the kernel's `FloodMeter`: past its
budget the kernel is stopped as flooding. A content that its request can still keep, up to
`max_parse` bytes, is read and parsed; a larger one is passed through the signature check in
pieces, and only its head and tail are kept (`bounded_content`): a cell may print gigabytes.
Buffers (frames after the content: the protocol does not sign them and kernelpool uses none) are
passed through too. Whatever is passed through is read no faster than the user's `Pace`, so that
it costs the server a small share of its CPU. A message id seen before is a replay (a message
signed once and sent many times), and stops the kernel. So what one message makes the server
hold is bounded by `max_parse` plus `_MAX_HEAD`, whatever its size on the wire.

Callers: `kernels.channels` (one reader per channel).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from jupyter_client.session import DELIM, Session

from kernelpool.kernels.wire import Wire

Message = dict[str, Any]

_MAX_HEAD = 1 << 20  # identities, signature, header, parent header and metadata together
_MAX_FRAMES = 256  # a Jupyter message has 6 frames and its buffers; ipykernel sends a handful
_ALWAYS_PARSE = 64 << 10  # status messages and replies: parsed even when the request keeps nothing more
_MIN_PARSED = 4096  # what a parsed message takes from its request's budget at least
_MAX_PACE_WAIT = 1.0  # seconds
_REMEMBERED_IDS = 1000  # recent message ids per kernel checked against replays (their hashes: about 100 kB)
_MIN_COST = 64 << 10  # what a message no request asked for counts at least (`FloodMeter`, `Pace`): its parsing costs

_STREAM_NAME = re.compile(rb'"name"\s*:\s*"(stdout|stderr)"')
_TEXT_START = re.compile(rb'"text"\s*:\s*"')


class Misbehaviour(Exception):
    """The kernel broke a bound or the protocol. `reason` is a metric label, `str()` the words."""

    def __init__(self, reason: str, words: str) -> None:
        super().__init__(words)
        self.reason = reason


@dataclass(frozen=True)
class ChannelLimits:
    max_message: int  # bytes of one message, all frames (kernel_max_message_bytes)
    max_parse: int  # content bytes parsed per message and per request (max_saved_execution_chars)
    flood_bytes: int  # bytes passed through unread before the kernel is stopped (kernel_flood_bytes)
    flood_rate: float  # ... that come back each second (kernel_flood_rate)


class Pace:
    """How fast the server reads what it passes through unread from one user's kernels: each
    piece is followed by a wait that keeps them at `rate` bytes a second together."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._free_at = time.monotonic()

    def delay(self, cost: int) -> float:
        now = time.monotonic()
        # at most a second behind: a kernel stopped for flooding leaves no long wait to the
        # user's other kernels
        self._free_at = min(max(self._free_at, now) + cost / self._rate, now + _MAX_PACE_WAIT)
        return self._free_at - now


class FloodMeter:
    """One kernel's traffic as the reader judges it. Bytes of messages no request asked for go
    into a bucket of `flood_bytes`, refilled at `flood_rate` a second: empty, the kernel is
    flooding. A message id seen before is a replay (ipykernel never sends one twice). `pause`
    is how long to wait after passing bytes through unread (the user's `Pace`)."""

    def __init__(self, limits: ChannelLimits, pace: Pace) -> None:
        self._limits = limits
        self._pace = pace
        self._level = float(limits.flood_bytes)
        self._at = time.monotonic()
        self._ids: set[int] = set()
        self._order: deque[int] = deque()

    def charge(self, n: int, channel: str) -> None:
        """Count `n` bytes no request asked for, before they are read; Misbehaviour when flooding."""
        now = time.monotonic()
        self._level = min(float(self._limits.flood_bytes), self._level + (now - self._at) * self._limits.flood_rate)
        self._at = now
        self._level -= n
        if self._level < 0:
            raise Misbehaviour("flood", (
                f"it flooded its {channel} channel: it sent more than {_fmt(self._limits.flood_bytes)} of messages no "
                f"request asked for (each counted as at least {_fmt(_MIN_COST)}), and that comes back at "
                f"{_fmt(int(self._limits.flood_rate))} a second (kernel_flood_bytes, kernel_flood_rate)"))

    def pause(self, n: int) -> float:
        return self._pace.delay(n)

    def new(self, msg_id: Any, channel: str) -> None:
        """Misbehaviour unless `msg_id` is a string not seen among this kernel's recent messages."""
        if not isinstance(msg_id, str) or not msg_id:
            raise Misbehaviour("malformed", f"it sent a message without a msg_id on its {channel} channel")
        key = hash(msg_id)
        if key in self._ids:
            raise Misbehaviour("replayed", f"it sent the same message twice on its {channel} channel (msg_id {msg_id[:80]!r})")
        self._ids.add(key)
        self._order.append(key)
        if len(self._order) > _REMEMBERED_IDS:
            self._ids.discard(self._order.popleft())


class Waiting(Protocol):
    """What a request waiting for answers tells the reader (`channels.Inbox`)."""

    budget: int  # content bytes it may still have parsed


class _Sample:
    """The head and the tail of a content passed through in pieces."""

    def __init__(self, head: int, tail: int) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self._head_max, self._tail_max = head, tail

    def add(self, piece: bytes) -> None:
        if len(self.head) < self._head_max:
            self.head += piece[:self._head_max - len(self.head)]
        self.tail += piece[-self._tail_max:]
        if len(self.tail) > 2 * self._tail_max:
            del self.tail[:-self._tail_max]


async def read_message(wire: Wire, session: Session, limits: ChannelLimits, channel: str,
                       route: Callable[[str], Waiting | None],
                       meter: FloodMeter) -> tuple[Message | None, Waiting | None, int]:
    """The next message on `wire`, the request waiting for it and about how many bytes the
    message holds; (None, None, 0) if nobody waits (it was passed through unread). Raises
    Misbehaviour, or WireError when the connection ends."""
    frames, total, head = 0, 0, 0

    async def frame(limit: int, what: str) -> tuple[int, int]:
        nonlocal frames, total
        flags, size = await wire.frame_head()
        frames += 1
        total += size
        if wire.is_command(flags):
            raise Misbehaviour("malformed", f"it sent a ZMTP command on its {channel} channel after the handshake")
        if frames > _MAX_FRAMES:
            raise Misbehaviour("malformed", f"it sent a message of more than {_MAX_FRAMES} frames on its {channel} channel")
        if total > limits.max_message:
            raise Misbehaviour("too_large", (
                f"it sent a message of more than {_fmt(limits.max_message)} on its {channel} channel "
                f"(a frame of {_fmt(size)} came after {_fmt(total - size)}); the limit is kernel_max_message_bytes"))
        if size > limit:
            raise Misbehaviour("malformed", f"it sent a message whose {what} is {_fmt(size)} on its {channel} channel")
        return flags, size

    async def small(what: str, *, last: bool = False) -> bytearray:
        nonlocal head
        flags, size = await frame(_MAX_HEAD - head, what)
        head += size
        if wire.more(flags) == last:
            raise Misbehaviour("malformed", f"it sent a message cut short on its {channel} channel")
        return await wire.read(size)

    while bytes(await small("identities")) != DELIM:
        pass
    signature = await small("signature")
    parts = [await small("header"), await small("parent header"), await small("metadata")]
    header, parent = _json(parts[0], channel, "header"), _json(parts[1], channel, "parent header")
    if not isinstance(header, dict) or not isinstance(parent, dict):
        raise Misbehaviour("malformed", f"it sent a message whose header is not a JSON object on its {channel} channel")
    meter.new(header.get("msg_id"), channel)
    # on shell and control the server asks for replies, nothing else
    asked = channel == "iopub" or str(header.get("msg_type", "")).endswith("_reply")
    waiting = route(str(parent.get("msg_id", ""))) if asked else None
    flags, size = await frame(limits.max_message, "content")

    async def buffers() -> None:  # the frames after the content, passed through at the user's pace
        more = flags
        while wire.more(more):
            more, length = await frame(limits.max_message, "buffers")
            if waiting is None:
                meter.charge(length, channel)
            await wire.skip(length, pause=meter.pause)

    if waiting is None:
        meter.charge(max(total, _MIN_COST), channel)  # before its bytes are read
        await wire.skip(size, pause=meter.pause)
        await buffers()
        await asyncio.sleep(meter.pause(max(0, _MIN_COST - size)))  # a small message costs its parsing
        return None, None, 0
    mac = session.auth.copy() if session.auth is not None else None
    if mac is not None:
        for part in parts:
            mac.update(part)
    content, metadata, held = await _content(wire, size, waiting, header, parts[2], limits, meter, channel, mac)
    await buffers()
    if mac is not None and not hmac.compare_digest(bytes(signature), mac.hexdigest().encode()):
        raise Misbehaviour("malformed", f"it sent a message with a wrong signature on its {channel} channel")
    if not (isinstance(header, dict) and isinstance(content, dict) and isinstance(metadata, dict)):
        raise Misbehaviour("malformed", f"it sent a message whose header or content is not a JSON object on its {channel} channel")
    return ({"header": header, "msg_id": header.get("msg_id"), "msg_type": header.get("msg_type"),
             "parent_header": parent, "metadata": metadata, "content": content, "buffers": []}, waiting, held + head)


async def _content(wire: Wire, size: int, waiting: Waiting, header: Any, metadata: bytearray, limits: ChannelLimits,
                   meter: FloodMeter, channel: str, mac: Any) -> tuple[Any, Any, int]:
    """The content and metadata of a message a request waits for, and the bytes they hold:
    parsed while the request may still keep that much, else passed through the signature check,
    keeping the head and tail of a stream's text."""
    if size <= max(min(limits.max_parse, waiting.budget), _ALWAYS_PARSE):
        raw = await wire.read(size)
        if mac is not None:
            mac.update(raw)
        if waiting.budget <= 0:  # the request keeps no more: many small messages are read at the pace too
            await asyncio.sleep(meter.pause(max(size, _MIN_COST)))
        waiting.budget -= max(size, _MIN_PARSED)
        return _json(raw, channel, "content"), _json(metadata, channel, "metadata"), size
    kind = header.get("msg_type") if isinstance(header, dict) else None
    # a stream keeps its head and tail even past its request's budget (the end of a long output is
    # what people look for); the request's inbox bounds how many such messages wait at once
    keep = limits.max_parse // 8 if kind == "stream" else 0
    sample = _Sample(keep + 256, keep + 64)

    def sink(piece: bytes) -> None:
        if mac is not None:
            mac.update(piece)
        if keep:
            sample.add(piece)

    await wire.skip(size, sink, pause=meter.pause)  # output its request keeps no more of: at the user's pace
    waiting.budget -= 2 * keep
    return bounded_content(kind, bytes(sample.head), bytes(sample.tail), size, limits.max_parse, keep), {}, 2 * keep


def _json(raw: bytes | bytearray, channel: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise Misbehaviour("malformed", f"it sent a message whose {what} is not JSON on its {channel} channel") from None


def bounded_content(kind: str | None, head: bytes, tail: bytes, size: int, max_parse: int, keep: int) -> dict[str, Any]:
    """What stands for a content too large to parse, from its first and last bytes: a stream
    keeps `keep` bytes of its text's head and tail (when it has room), other outputs become a note."""
    note = (f"[an output message of {size} bytes was dropped unread: over the limit of "
            f"{max_parse} bytes kept per execution (max_saved_execution_chars)]")
    if kind == "stream":
        name = _STREAM_NAME.search(head[:200])
        text = _head_and_tail(head, tail, keep, size) if keep > 0 else None
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


def _head_and_tail(head: bytes, tail: bytes, keep: int, size: int) -> str | None:
    """The first and last `keep` bytes of a stream message's text, decoded from the first and
    last bytes of its content (ipykernel batches a fast writer's output into one message: a
    loop that prints 200 MB can send 40 MB at once). None when it does not look like ipykernel's."""
    found = _TEXT_START.search(head[:200])
    end = tail.rstrip().rfind(b'"')
    if found is None or end < keep or size < len(head) + len(tail):
        return None
    start = found.end()
    first = last = None
    for trim in range(13):  # a cut inside an escape (\uXXXX\uXXXX) or a UTF-8 character
        first = first if first is not None else _json_piece(head[start:start + keep - trim])
        if last is None:
            at = end - keep + trim
            backslashes = len(tail[:at]) - len(tail[:at].rstrip(b"\\"))
            if backslashes % 2 == 0:  # not the second half of an escape
                last = _json_piece(tail[at:end])
    if first is None or last is None:
        return None
    return (f"{first}\n[... about {size - 2 * keep} bytes of output dropped unread: one message over the "
            f"limit kept per execution (max_saved_execution_chars) ...]\n{last}")


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"

