"""Folder listings run in processes of their own, so that reading a huge folder does not hold the
server's interpreter.

A listing reads up to 20,000 names in Python (`kernelpool.notebooks.listing`). In a thread of the
server, that loop held the GIL that the event loop serving every user needs: with one user's
24 concurrent listings of a folder of 200,000 files, another user's `list_files` p50 reached
2.1x its idle value in CI (tests/test_starve.py). Here the loop runs in one of `count`
scanner processes (`python -m kernelpool.notebooks.scanner`, at a lower CPU priority); the
server only sends the request and reads the bounded answer.

The protocol, on the child's stdin and stdout: a 4-byte big-endian length, then a JSON array.
A request is [kind, [root, uid, gid], args] with kind "files" or "notebooks" (the user's folder as
`SafeRoot` takes it); an answer is ["ok", items, note] or ["refused", path, reason] or
["oserror", errno, strerror] or ["error", text]. JSON keeps file names that are not UTF-8 (their
surrogate escapes pass as JSON escapes). A child that dies (killed, out of memory) is replaced on the
next request, and the request it was running fails with a clear error. The child exits when its stdin closes, so
it does not outlive a server killed with SIGKILL.

Callers: `kernelpool.notebooks.filework.FileWork.scan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from kernelpool.errors import PathRefused
from kernelpool.notebooks.listing import Listing
from sandbox import SafeRoot

_HEAD = struct.Struct(">I")
_NICE = 5  # below the server's own priority: a scan yields the CPU to the server's event loop
MAX_ANSWER = 64 << 20  # an answer is bounded (500 entries, 10,000 paths); more is a broken child


class ScanFailed(Exception):
    """The scanner process could not answer (it died, or could not start)."""


class Scanners:
    """`count` scanner processes, each answering one request at a time."""

    def __init__(self, count: int = 2, python: str = sys.executable) -> None:
        self.count = count
        self._children = [_Child(python) for _ in range(count)]  # each started at its first request
        self._idle: asyncio.Queue[_Child] | None = None  # made in the running loop, at the first request
        self._closed = False

    async def run(self, kind: str, root: SafeRoot, *args: Any) -> Listing:
        """`kind`(root, *args) (a function of `kernelpool.notebooks.listing`), from a child; its
        PathRefused and OSError are raised here as they were there. A caller cancelled mid-answer
        costs its child (killed: its answer would reach the next request), not the next caller."""
        if self._closed:
            raise ScanFailed("the server is shutting down")
        if self._idle is None:
            self._idle = asyncio.Queue()
            for child in self._children:
                self._idle.put_nowait(child)
        child = await self._idle.get()
        try:
            answer = await self._exchange(child, json.dumps([kind, [root.root, root.uid, root.gid], list(args)]).encode())
        except asyncio.CancelledError:
            child.kill()
            raise
        finally:
            self._idle.put_nowait(child)
        return _unpack(answer)

    async def _exchange(self, child: _Child, request: bytes) -> Any:
        if child.proc is None or child.proc.returncode is not None:
            await child.start()
        try:
            return await child.ask(request)
        except (OSError, ValueError, asyncio.IncompleteReadError, ScanFailed) as exc:
            await child.stop()
            raise ScanFailed(f"the folder scanner process stopped while listing ({exc or type(exc).__name__}); "
                             "try again") from None

    def pids(self) -> list[int]:
        """The running children's pids (for tests and diagnostics)."""
        return [c.proc.pid for c in self._children if c.proc is not None and c.proc.returncode is None]

    def close(self) -> None:
        """Close the children's input: each ends its loop and exits (a running scan is bounded)."""
        self._closed = True
        for child in self._children:
            child.close()

    async def wait_closed(self) -> None:
        """After `close`: wait for the children to exit (killed after 5 s), their pipes closed."""
        await asyncio.gather(*(child.stop() for child in self._children))


class _Child:
    def __init__(self, python: str) -> None:
        self._python = python
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self._python, "-m", "kernelpool.notebooks.scanner", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, close_fds=True)
        except OSError as exc:
            raise ScanFailed(f"could not start the folder scanner process: {exc}") from None

    async def ask(self, request: bytes) -> Any:
        if self.proc is None or self.proc.stdin is None or self.proc.stdout is None:
            raise ScanFailed("not started")
        self.proc.stdin.write(_HEAD.pack(len(request)) + request)
        await self.proc.stdin.drain()
        (size,) = _HEAD.unpack(await self.proc.stdout.readexactly(_HEAD.size))
        if size > MAX_ANSWER:
            raise ScanFailed(f"an answer of {size} bytes")
        return json.loads(await self.proc.stdout.readexactly(size))

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()  # its loop ends at the end of its input

    def kill(self) -> None:
        """Now, without waiting (the loop reaps it): the next request starts a new process."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _unpack(answer: Any) -> Listing:
    tag = answer[0]
    if tag == "ok":
        return Listing(answer[1], answer[2])
    if tag == "refused":
        raise PathRefused(answer[1], answer[2])
    if tag == "oserror":
        raise OSError(answer[1], answer[2])
    raise ScanFailed(f"the folder scan failed: {answer[1]}")


# ---- the child ---------------------------------------------------------------------------------

def _answer(request: Any) -> list[Any]:
    from kernelpool.notebooks import listing

    functions: dict[str, Callable[..., Listing]] = {"files": listing.files, "notebooks": listing.notebooks}
    try:
        kind, (folder, uid, gid), args = request
        found = functions[kind](SafeRoot(folder, uid, gid), *args)
    except PathRefused as exc:
        return ["refused", exc.path, exc.reason]
    except OSError as exc:
        return ["oserror", exc.errno or errno.EIO, exc.strerror or str(exc)]
    except Exception as exc:  # reported to the caller, and the child goes on
        return ["error", f"{type(exc).__name__}: {exc}"]
    return ["ok", found.items, found.note]


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        piece = stream.read(size - len(data))
        if not piece:
            return None
        data += piece
    return data


def main() -> None:
    # Ctrl-C on a server in a terminal reaches its whole process group: the server stops its
    # children itself (closing their input), so they ignore it; a lower priority than the server
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(_NICE)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (head := _read(stdin, _HEAD.size)) is not None:
        body = _read(stdin, _HEAD.unpack(head)[0])
        if body is None:
            return
        out = json.dumps(_answer(json.loads(body))).encode()
        stdout.write(_HEAD.pack(len(out)) + out)
        stdout.flush()


if __name__ == "__main__":
    main()
