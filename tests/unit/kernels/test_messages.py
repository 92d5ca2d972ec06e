"""Reading one Jupyter message within bounds (kernels/messages.py), from signed messages written by
hand on the other end of a real socket pair, as a hostile kernel that knows its connection key could
send them: every bound is decided from frame lengths before their bytes are taken."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jupyter_client.session import DELIM, Session

from kernelpool.kernels.channels import Inbox
from kernelpool.kernels.messages import (
    ChannelLimits,
    FloodMeter,
    Misbehaviour,
    Pace,
    _head_and_tail,
    _Sample,
    read_message,
)
from kernelpool.kernels.wire import Wire, encode

KEY = b"the-connection-key"
MiB = 1 << 20
LIMITS = ChannelLimits(max_message=16 * MiB, max_parse=4 * MiB, flood_bytes=64 * MiB, flood_rate=MiB)


class Kernel:
    """The kernel's end of the socket pair: it signs with the connection key, as ipykernel does, and
    writes in a task of its own, in order, while the reader reads (a socket buffer holds little)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session = Session(key=KEY)
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while True:
            await asyncio.get_running_loop().sock_sendall(self.sock, await self._queue.get())

    def frames(self, msg_type: str, content: dict[str, Any], parent: str = "", ident: list[bytes] | None = None) -> list[bytes]:
        msg = self.session.msg(msg_type, content, parent={"msg_id": parent} if parent else {})
        return self.session.serialize(msg, ident=ident)

    async def send(self, data: bytes | list[bytes]) -> None:
        await self._queue.put(data if isinstance(data, bytes) else encode(data))


class Reader:
    """The server's end: `read` is what one channel's reader task does for each message."""

    def __init__(self, wire: Wire, limits: ChannelLimits = LIMITS) -> None:
        self.wire = wire
        self.limits = limits
        self.session = Session(key=KEY)
        self.meter = FloodMeter(limits, Pace(1e12))
        self.waiting: dict[str, Inbox] = {}

    def request(self, msg_id: str = "req-1", budget: int | None = None) -> Inbox:
        inbox = self.waiting[msg_id] = Inbox(self.limits.max_parse if budget is None else budget)
        return inbox

    async def read(self, channel: str = "iopub") -> tuple[dict[str, Any] | None, Any, int]:
        return await asyncio.wait_for(
            read_message(self.wire, self.session, self.limits, channel, self.waiting.get, self.meter), 5)


@pytest.fixture
async def ends() -> AsyncIterator[tuple[Kernel, Reader]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    kernel = Kernel(theirs)
    try:
        yield kernel, Reader(Wire(ours))
    finally:
        kernel.writer.cancel()
        ours.close()
        theirs.close()


async def test_a_signed_answer_reaches_the_request_it_answers(ends: tuple[Kernel, Reader]) -> None:
    kernel, reader = ends
    inbox = reader.request("req-1")
    await kernel.send(kernel.frames("stream", {"name": "stdout", "text": "hello"}, parent="req-1", ident=[b"k1", b"k2"]))
    msg, waiting, size = await reader.read()
    assert waiting is inbox and msg is not None and size > 0
    assert (msg["msg_type"], msg["content"], msg["parent_header"]["msg_id"]) == ("stream", {"name": "stdout", "text": "hello"}, "req-1")
    assert inbox.budget == LIMITS.max_parse - 4096, "a parsed message takes its size, 4 KiB at least, from the budget"


async def test_what_no_request_waits_for_is_passed_through_unread(ends: tuple[Kernel, Reader]) -> None:
    kernel, reader = ends
    inbox = reader.request("req-1")
    await kernel.send(kernel.frames("stream", {"name": "stdout", "text": "x" * 100_000}, parent="someone-else"))
    # on shell the server asks for replies only: a request-shaped message is not taken even for a waiting request
    await kernel.send(kernel.frames("execute_request", {"code": "1"}, parent="req-1"))
    await kernel.send(kernel.frames("execute_reply", {"status": "ok"}, parent="req-1"))
    assert await reader.read("iopub") == (None, None, 0)
    assert await reader.read("shell") == (None, None, 0)
    msg, waiting, _ = await reader.read("shell")
    assert waiting is inbox and msg is not None and msg["content"] == {"status": "ok"}, "and the stream stays in step"


async def test_a_wrong_signature_stops_the_kernel(ends: tuple[Kernel, Reader]) -> None:
    kernel, reader = ends
    reader.request("req-1")
    frames = kernel.frames("stream", {"name": "stdout", "text": "forged"}, parent="req-1")
    at = frames.index(DELIM) + 1
    frames[at] = b"0" * len(frames[at])
    await kernel.send(frames)
    with pytest.raises(Misbehaviour, match="wrong signature") as caught:
        await reader.read()
    assert caught.value.reason == "malformed"


async def test_a_large_output_past_the_budget_is_checked_and_kept_as_head_and_tail(ends: tuple[Kernel, Reader]) -> None:
    kernel, reader = ends
    reader.limits = ChannelLimits(max_message=16 * MiB, max_parse=100_000, flood_bytes=64 * MiB, flood_rate=MiB)
    reader.request("req-1")
    text = "start" + "y" * 2_000_000 + "end"
    await kernel.send(kernel.frames("stream", {"name": "stderr", "text": text}, parent="req-1"))
    msg, _, held = await reader.read()
    assert msg is not None and msg["content"]["name"] == "stderr"
    kept = msg["content"]["text"]
    assert kept.startswith("start") and kept.endswith("end") and "bytes of output dropped unread" in kept
    assert len(kept) < 30_000 and held < 30_000 + (1 << 20)
    forged = kernel.frames("stream", {"name": "stdout", "text": text}, parent="req-1")
    forged[-1] = forged[-1].replace(b"yyyy", b"zzzz", 1)  # changed after signing: passed through, yet checked
    await kernel.send(forged)
    with pytest.raises(Misbehaviour, match="wrong signature"):
        await reader.read()


async def test_a_replayed_message_stops_the_kernel(ends: tuple[Kernel, Reader]) -> None:
    kernel, reader = ends
    reader.request("req-1")
    frames = kernel.frames("stream", {"name": "stdout", "text": "once"}, parent="req-1")
    await kernel.send(frames)
    await kernel.send(frames)
    assert (await reader.read())[0] is not None
    with pytest.raises(Misbehaviour, match="sent the same message twice") as caught:
        await reader.read()
    assert caught.value.reason == "replayed"


async def test_a_message_over_the_limit_is_refused_from_its_length(ends: tuple[Kernel, Reader]) -> None:
    """The content's frame says 1 GiB: the kernel is stopped before a byte of it is read (none is sent)."""
    kernel, reader = ends
    reader.request("req-1")
    frames = kernel.frames("stream", {"name": "stdout", "text": ""}, parent="req-1")
    head = encode(frames[:-1] + [b""])[:-2]  # every frame up to the metadata, which says MORE
    await kernel.send(head + b"\x02" + struct.pack(">Q", 1 << 30))
    with pytest.raises(Misbehaviour, match="a message of more than 16 MiB on its iopub channel") as caught:
        await reader.read()
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize("frames, words", [
    ([b"id"] * 300 + [DELIM], "more than 256 frames"),
    ([DELIM, b"sig", b"h" * (2 * MiB)], "whose header is 2 MiB"),
    ([DELIM, b"sig", b"not json", b"{}", b"{}", b"{}"], "whose header is not JSON"),
    ([DELIM, b"sig", b"[]", b"{}", b"{}", b"{}"], "header is not a JSON object"),
])
async def test_malformed_messages_stop_the_kernel(ends: tuple[Kernel, Reader], frames: list[bytes], words: str) -> None:
    kernel, reader = ends
    await kernel.send(frames)
    with pytest.raises(Misbehaviour, match=words) as caught:
        await reader.read()
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize("data, words", [
    (encode([DELIM, b"sig"]), "cut short"),  # the signature frame claims to be the last
    (b"\x04\x05HELLO", "a ZMTP command"),
])
async def test_a_broken_frame_sequence_stops_the_kernel(ends: tuple[Kernel, Reader], data: bytes, words: str) -> None:
    kernel, reader = ends
    await kernel.send(data)
    with pytest.raises(Misbehaviour, match=words):
        await reader.read()


async def test_a_kernel_that_floods_what_nobody_asked_for_is_stopped(ends: tuple[Kernel, Reader]) -> None:
    kernel, reader = ends
    reader.limits = ChannelLimits(max_message=16 * MiB, max_parse=4 * MiB, flood_bytes=MiB, flood_rate=0)
    reader.meter = FloodMeter(reader.limits, Pace(1e12))
    sent = 0
    with pytest.raises(Misbehaviour, match="flooded its iopub channel") as caught:
        for _ in range(100):
            await kernel.send(kernel.frames("status", {"execution_state": "busy"}))  # tiny: each costs 64 KiB at least
            sent += 1
            await reader.read()
    assert caught.value.reason == "flood" and sent == 16 + 1, "1 MiB of budget at 64 KiB a message"


async def test_the_flood_budget_comes_back_with_time(ends: tuple[Kernel, Reader]) -> None:
    kernel, reader = ends
    reader.limits = ChannelLimits(max_message=16 * MiB, max_parse=4 * MiB, flood_bytes=MiB, flood_rate=16 * MiB)
    reader.meter = FloodMeter(reader.limits, Pace(1e12))
    passed = 0
    for _ in range(4):
        for _ in range(15):
            await kernel.send(kernel.frames("status", {"execution_state": "busy"}))
            passed += (await reader.read())[0] is None
        await asyncio.sleep(0.07)  # about 1 MiB back at 16 MiB a second
    assert passed == 60, "60 messages of 64 KiB through a budget of 1 MiB, refilled as they came"


def test_an_oversized_stream_message_keeps_head_and_tail_unparsed() -> None:
    body = "".join(("é\"\\\n" if i % 7 == 0 else "abc\u2603") for i in range(100_000)) + "THE END\n"
    raw = json.dumps({"name": "stdout", "text": body}, ensure_ascii=False).encode()
    for keep in (1000, 1001, 1002, 1003, 1005, 5003):  # cuts land inside escapes and UTF-8 characters
        sample = _Sample(keep + 256, keep + 64)  # as the reader keeps it: pieces of any size pass through
        at = 0
        for size in (1, 700, 65536, 13, 4096) * 200:
            sample.add(raw[at:at + size])
            at += size
        sample.add(raw[at:])
        assert bytes(sample.head) == raw[:keep + 256] and bytes(sample.tail)[-(keep + 64):] == raw[-(keep + 64):]
        text = _head_and_tail(bytes(sample.head), bytes(sample.tail), keep, len(raw))
        assert text is not None
        head, _, rest = text.partition("\n[... about ")
        assert "bytes of output dropped unread" in rest
        tail = rest.split(" ...]\n", 1)[1]
        assert body.startswith(head) and len(head) > keep // 4
        assert body.endswith(tail) and tail.endswith("THE END\n")
    assert _head_and_tail(b'{"data": {}}', b'{"data": {}}', 10, 12) is None
