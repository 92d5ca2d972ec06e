"""ZMTP 3.0, ZeroMQ's wire protocol, client side over a unix socket: how the server speaks to a
kernel's ipc sockets, reading only as much as it decides to.

libzmq bounds one frame (ZMQ_MAXMSGSIZE) but not one message: its receive queue counts whole
messages (RCVHWM), and a message of many frames is held whole before the application sees any
of it. Measured here (libzmq 4.3.5): a peer that sends one message of 2,000 frames of 512 KiB,
one buffer sent again and again, grew a receiver with RCVHWM 10 and MAXMSGSIZE 1 MiB by 1 GB,
none of it received yet. So the server does not receive through libzmq at all: it reads each
kernel's byte stream itself, frame by frame, and decides from a frame's length, before reading
its body, whether to keep it, pass it through or stop (`kernels.messages`). While the server
does not read, what the kernel sends waits in the socket's buffer (SO_RCVBUF, kept small) and
then in the kernel's own memory, which its cgroup bounds.

Only what ipykernel's libzmq speaks to a connecting client is implemented: the NULL security
mechanism at version 3.0 (libzmq 4.x answers a 3.0 peer in kind; subscriptions are then
messages), no command after the handshake. Callers: `kernels.channels`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

CHUNK = 64 * 1024  # the most one read takes from a socket; also its receive buffer
_YIELD_EVERY = 256 << 10  # bytes passed through before other tasks get the event loop

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
_MAX_COMMAND = 4096  # the peer's READY: its socket type and identity


class WireError(Exception):
    """The peer broke the protocol or closed the connection; `str()` says how, in words."""


def _command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name + b"".join(
        bytes([len(k)]) + k + struct.pack(">I", len(v)) + v for k, v in properties.items())
    return bytes([_COMMAND]) + bytes([len(body)]) + body


def encode(frames: list[bytes]) -> bytes:
    """One message as ZMTP frames."""
    out = []
    for i, frame in enumerate(frames):
        more = _MORE if i < len(frames) - 1 else 0
        if len(frame) > 255:
            out.append(struct.pack(">BQ", more | _LONG, len(frame)))
        else:
            out.append(bytes([more, len(frame)]))
        out.append(frame)
    return b"".join(out)


class Wire:
    """One connection to one socket of a kernel. Reads are pulled by one reader task; sends
    may come from any task (they are serialised)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._pos = 0
        self._send_lock = asyncio.Lock()
        self.received = 0  # bytes read from the socket so far

    @classmethod
    async def connect(cls, path: str, socket_type: str, *, subscribe: bool = False) -> Wire:
        """Connect to the kernel's socket at `path` (in its locked runtime folder) as a
        `socket_type` ("DEALER" or "SUB") and complete the handshake."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)  # noqa: FBT003 (the socket module takes no keyword)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHUNK)
            await asyncio.get_running_loop().sock_connect(sock, path)
            wire = cls(sock)
            await wire._handshake(socket_type)
            if subscribe:
                await wire.send([b"\x01"])  # subscribe to every topic, the 3.0 way
        except BaseException:
            sock.close()
            raise
        return wire

    async def _handshake(self, socket_type: str) -> None:
        await self._loop.sock_sendall(self._sock, _GREETING + _command(b"READY", {b"Socket-Type": socket_type.encode()}))
        await self._need(64)
        greeting = bytes(self._buf[self._pos:self._pos + 64])
        self._pos += 64
        if greeting[0] != 0xFF or greeting[9] & 1 != 1 or greeting[10] < 3 or greeting[12:32].rstrip(b"\x00") != b"NULL":
            raise WireError("the kernel's socket did not greet as ZMTP 3 with the NULL mechanism")
        flags, size = await self.frame_head()
        if not flags & _COMMAND or size > _MAX_COMMAND:
            raise WireError("the kernel's socket did not send READY")
        body = await self.read(size)
        if not body.startswith(b"\x05READY"):
            raise WireError("the kernel's socket did not send READY")

    def close(self) -> None:
        self._sock.close()

    async def send(self, frames: list[bytes]) -> None:
        data = encode(frames)
        async with self._send_lock:
            await self._loop.sock_sendall(self._sock, data)

    async def _fill(self) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        data = await self._loop.sock_recv(self._sock, CHUNK)
        if not data:
            raise WireError("the kernel closed the connection")
        self.received += len(data)
        self._buf += data

    async def _need(self, n: int) -> None:
        while len(self._buf) - self._pos < n:
            await self._fill()

    async def frame_head(self) -> tuple[int, int]:
        """The next frame's flags and length; its body is still to be read (`read` or `skip`)."""
        await self._need(2)
        flags = self._buf[self._pos]
        if flags & ~(_MORE | _LONG | _COMMAND):
            raise WireError(f"a frame with unknown flags {flags:#x}")
        if flags & _LONG:
            await self._need(9)
            (size,) = struct.unpack_from(">Q", self._buf, self._pos + 1)
            self._pos += 9
        else:
            size = self._buf[self._pos + 1]
            self._pos += 2
        return flags, size

    @staticmethod
    def more(flags: int) -> bool:
        return bool(flags & _MORE)

    @staticmethod
    def is_command(flags: int) -> bool:
        return bool(flags & _COMMAND)

    async def read(self, n: int) -> bytearray:
        """The next `n` bytes, in a buffer of exactly that size (the caller has bounded `n`)."""
        out = bytearray(n)
        have = min(n, len(self._buf) - self._pos)
        out[:have] = self._buf[self._pos:self._pos + have]
        self._pos += have
        view = memoryview(out)
        since_yield = 0
        while have < n:
            got = await self._loop.sock_recv_into(self._sock, view[have:])
            if not got:
                raise WireError("the kernel closed the connection")
            self.received += got
            have += got
            since_yield += got
            if since_yield >= _YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)
        return out

    async def skip(self, n: int, sink: Callable[[bytes], None] | None = None,
                   pause: Callable[[int], float] | None = None) -> None:
        """Pass the next `n` bytes through `sink` (if any) in pieces of at most CHUNK, keeping none;
        every `_YIELD_EVERY` bytes, and at the end, wait `pause(bytes since)` seconds (at least a
        turn of the event loop)."""
        since_yield = 0
        while n > 0:
            if self._pos >= len(self._buf):
                await self._fill()
            take = min(n, len(self._buf) - self._pos)
            if sink is not None:
                sink(bytes(self._buf[self._pos:self._pos + take]))
            self._pos += take
            n -= take
            since_yield += take
            if since_yield >= _YIELD_EVERY or (n == 0 and pause is not None):
                await asyncio.sleep(pause(since_yield) if pause is not None else 0)
                since_yield = 0
