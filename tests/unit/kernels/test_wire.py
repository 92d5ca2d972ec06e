"""The server's ZMTP client (kernels/wire.py) against bytes written by hand on the other end of a real
unix socket pair: frames as ZMTP 3.0 lays them out, a length read before its body, the handshake,
and a peer that breaks the protocol or goes away."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator

import pytest

from kernelpool.kernels.wire import CHUNK, Wire, WireError, encode

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
READY = b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Wire, socket.socket]]:
    """Our Wire on one end of a socket pair; the other end, for the test to write as a kernel would."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        yield Wire(ours), theirs
    finally:
        ours.close()
        theirs.close()


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


def test_frames_are_laid_out_as_zmtp_says() -> None:
    assert encode([b"ab"]) == b"\x00\x02ab"
    assert encode([b"", b"x"]) == b"\x01\x00\x00\x01x", "every frame but the last has MORE"
    long = b"z" * 256
    assert encode([long]) == b"\x02" + struct.pack(">Q", 256) + long, "over 255 bytes: LONG, 8-byte length"


async def test_frames_are_read_back_whatever_the_pieces_they_arrive_in(pair: tuple[Wire, socket.socket]) -> None:
    wire, theirs = pair
    frames = [b"", b"short", b"y" * 300, b"x" * (3 * CHUNK + 17)]
    data = encode(frames)
    writer = asyncio.create_task(send(theirs, data))
    got = []
    while True:
        flags, size = await wire.frame_head()
        got.append(bytes(await wire.read(size)))
        if not wire.more(flags):
            break
    await writer
    assert got == frames and wire.received == len(data)


async def test_skip_passes_a_body_through_in_pieces_and_keeps_none(pair: tuple[Wire, socket.socket]) -> None:
    wire, theirs = pair
    body = os.urandom(5 * CHUNK + 3)
    writer = asyncio.create_task(send(theirs, encode([body, b"next"])))
    flags, size = await wire.frame_head()
    assert wire.more(flags) and size == len(body)
    pieces: list[bytes] = []
    paused: list[int] = []

    def pause(n: int) -> float:
        paused.append(n)
        return 0.0

    await wire.skip(size, pieces.append, pause=pause)
    assert b"".join(pieces) == body and max(len(p) for p in pieces) <= CHUNK
    assert sum(paused) == size, "every byte passed through is accounted to the pace"
    _, size = await wire.frame_head()
    assert bytes(await wire.read(size)) == b"next"
    await writer


async def test_a_length_is_known_before_its_body_arrives(pair: tuple[Wire, socket.socket]) -> None:
    """The reader decides from a frame's length alone: the 1 TiB body is never sent."""
    wire, theirs = pair
    await send(theirs, b"\x02" + struct.pack(">Q", 1 << 40))
    flags, size = await asyncio.wait_for(wire.frame_head(), 2)
    assert size == 1 << 40 and not wire.more(flags)


@pytest.mark.parametrize("data", [b"\x08\x01x", b"\x80\x00", b"\x41\x00"])
async def test_a_frame_with_unknown_flags_is_refused(pair: tuple[Wire, socket.socket], data: bytes) -> None:
    wire, theirs = pair
    await send(theirs, data)
    with pytest.raises(WireError, match="unknown flags"):
        await wire.frame_head()


async def test_a_peer_that_goes_away_mid_frame_ends_the_read(pair: tuple[Wire, socket.socket]) -> None:
    wire, theirs = pair
    await send(theirs, b"\x00\x10" + b"only half")
    _, size = await wire.frame_head()
    theirs.close()
    with pytest.raises(WireError, match="closed the connection"):
        await wire.read(size)


async def serve_once(path: str, answer: bytes) -> asyncio.Task[bytes]:
    """A unix socket at `path` (a kernel's, as the server sees it) that takes one connection, sends
    `answer` and returns everything it received until our side closed."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def one() -> bytes:
        conn, _ = await loop.sock_accept(listener)
        listener.close()
        with conn:
            await loop.sock_sendall(conn, answer)
            received = b""
            while chunk := await loop.sock_recv(conn, 4096):
                received += chunk
            return received

    return loop.create_task(one())


async def test_the_handshake_and_the_subscription() -> None:
    folder = tempfile.mkdtemp(prefix="kp-wire-")
    path = os.path.join(folder, "iopub")
    try:
        peer = await serve_once(path, GREETING + READY)
        wire = await Wire.connect(path, "SUB", subscribe=True)
        wire.close()
        sent = await peer
        assert sent.startswith(GREETING), "our greeting: ZMTP 3.0, NULL mechanism, as a client"
        assert b"\x05READY\x0bSocket-Type\x00\x00\x00\x03SUB" in sent
        assert sent.endswith(b"\x00\x01\x01"), "subscribed to every topic, the 3.0 way: a message of one byte 1"
    finally:
        os.unlink(path)
        os.rmdir(folder)


@pytest.mark.parametrize("answer", [
    GREETING.replace(b"NULL", b"PLAI"),  # another security mechanism
    GREETING[:10] + b"\x02" + GREETING[11:],  # ZMTP 2
    GREETING + b"\x04\x06\x05HELLO",  # a command that is not READY
])
async def test_a_socket_that_does_not_greet_as_a_kernel_is_refused(answer: bytes) -> None:
    folder = tempfile.mkdtemp(prefix="kp-wire-")
    path = os.path.join(folder, "shell")
    try:
        peer = await serve_once(path, answer)
        with pytest.raises(WireError):
            await asyncio.wait_for(Wire.connect(path, "DEALER"), 5)
        assert (await asyncio.wait_for(peer, 5)).startswith(GREETING), "and the connection is closed"
    finally:
        os.unlink(path)
        os.rmdir(folder)
