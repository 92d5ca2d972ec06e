"""A replica's part in moving users (the steps are described in `replicas.moves`).

Files are packed and unpacked by GNU tar run as the user's own uid (`subprocess` drops to it
before tar starts, with an empty environment): tar then reads and writes only what the user's
own kernels could, so nothing a user left in their folder (links, FIFOs, names) can make the
root server read or write elsewhere. Without isolation tar runs as the server's own user.
Called by `replicas.service` on every MOVES announcement and every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kernelpool.config import Settings
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.replicas.moves import CHUNK, COPIED, DONE, DRAINING, FAILED, MoveRow, Moves
from kernelpool.store import Store, UserRow
from kernelpool.users.accounts import UserService
from sandbox.folders import remove_tree

log = logging.getLogger(__name__)

_TAR_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


class MoveFailed(Exception):
    pass


class Mover:
    def __init__(self, settings: Settings, store: Store, users: UserService, kernels: KernelRegistry,
                 end_sessions: Callable[[str, str], Awaitable[int]]) -> None:
        if settings.replica is None:
            raise RuntimeError("a mover belongs to a replica: settings.replica is unset")
        self.me: str = settings.replica
        self._settings, self._store, self._users, self._kernels = settings, store, users, kernels
        self._end_sessions = end_sessions
        self.moves = Moves(store)
        self.leaving: dict[str, str] = {}  # user -> target, while the user moves away from here
        self._busy = asyncio.Lock()

    async def step(self) -> None:
        """Do whatever step of a move is this replica's to do now."""
        async with self._busy:
            rows = await self.moves.all()
            self.leaving = {r.user: r.target for r in rows if r.source == self.me and r.state in (DRAINING, COPIED)}
            for row in rows:
                if row.source == self.me and row.state == DRAINING:
                    await self._run(row, self._export)
                elif row.target == self.me and row.state == COPIED:
                    await self._run(row, self._import)
                elif row.source == self.me and row.state == DONE:
                    await self._clean_up(row)

    async def _run(self, row: MoveRow, step: Callable[[MoveRow], Awaitable[None]]) -> None:
        try:
            await step(row)
        except Exception as exc:
            why = str(exc) if isinstance(exc, MoveFailed) else f"{type(exc).__name__}: {exc}"
            log.error("moving %s from %s to %s failed: %s", row.user, row.source, row.target, why)
            await self.moves.set_state(row.user, FAILED, error=f"on {self.me}: {why}")
            self.leaving.pop(row.user, None)
            await self._users.load()  # the user stays here (as source) or was never here (as target)

    def _tar_as(self, record: UserRow) -> dict[str, Any]:
        """subprocess's arguments that run tar as the user (from its row: never the server's own
        uid by accident of what this replica has loaded); none without isolation."""
        identity = self._users.identity(record)
        if identity is None:
            return {}
        return {"user": identity.uid, "group": identity.gid, "extra_groups": [], "umask": 0o077}

    async def _export(self, row: MoveRow) -> None:
        user = row.user
        self.leaving[user] = row.target
        text = (f"your notebooks are moving to another replica ({row.target}): this session is closed and your "
                f"kernels were stopped; reconnect in a few seconds (nothing is lost)")
        closed = await self._end_sessions(user, text)
        self._users.forget(user)
        stopped = await self._kernels.forget_removed(self._users.current())
        log.info("moving %s to %s: %d session(s) closed, %d kernel(s) stopped; packing its folder", user, row.target,
                 closed, stopped)
        record = await self._store.get_user(user)
        if record is None:
            raise MoveFailed(f"user {user!r} is gone")
        ident = self._tar_as(record)
        await asyncio.to_thread(self._users.prepare, record)  # its folder exists, even if it was never used
        proc = await asyncio.create_subprocess_exec(
            "tar", "--create", "--file=-", "--directory", self._users.folder(user), "--sparse", ".",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_TAR_ENV, cwd="/", **ident)
        if proc.stdout is None or proc.stderr is None:
            raise RuntimeError("tar's output is not piped")
        errors = asyncio.ensure_future(proc.stderr.read())
        seq = size = 0
        while block := await _read_up_to(proc.stdout, CHUNK):
            await self.moves.add_chunk(user, seq, block)
            seq, size = seq + 1, size + len(block)
        code = await proc.wait()
        if code != 0:
            raise MoveFailed(f"tar could not pack {self._users.folder(user)} as the user (exit {code}): "
                             f"{(await errors).decode(errors='replace').strip()[-500:]}")
        await self.moves.set_state(user, COPIED, size=size, files=seq)
        log.info("moving %s to %s: %d bytes packed in %d chunk(s)", user, row.target, size, seq)

    async def _import(self, row: MoveRow) -> None:
        user = row.user
        record = await self._store.get_user(user)
        if record is None:
            raise MoveFailed(f"user {user!r} is gone")
        # a copy left from an earlier stay here is older than what comes: it goes first
        await asyncio.to_thread(remove_tree, str(self._settings.users_dir), user)
        await asyncio.to_thread(self._users.prepare, record)
        proc = await asyncio.create_subprocess_exec(
            "tar", "--extract", "--file=-", "--directory", self._users.folder(user), "--preserve-permissions",
            "--no-same-owner", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_TAR_ENV, cwd="/",
            **self._tar_as(record))
        if proc.stdin is None or proc.stderr is None:
            raise RuntimeError("tar's input is not piped")
        errors = asyncio.ensure_future(proc.stderr.read())
        size = 0
        try:
            async for block in self.moves.chunks(user):
                proc.stdin.write(block)
                await proc.stdin.drain()
                size += len(block)
        finally:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.close()
        code = await proc.wait()
        if code != 0 or size != row.bytes:
            raise MoveFailed(f"tar could not unpack the folder as the user (exit {code}, {size} of {row.bytes} bytes): "
                             f"{(await errors).decode(errors='replace').strip()[-500:]}")
        await self.moves.finish(user, self.me)
        await self._users.load()
        log.info("moved %s from %s: %d bytes unpacked; this replica is its home now", user, row.source, size)

    async def _clean_up(self, row: MoveRow) -> None:
        # the target has the files and is the home: the copy here goes (kernels stopped at export)
        record = await self._store.get_user(row.user)
        await asyncio.to_thread(remove_tree, str(self._settings.users_dir), row.user)
        if record is not None:
            await asyncio.to_thread(remove_tree, str(self._settings.run_dir), str(record.uid))
        self._users.forget(row.user)
        self.leaving.pop(row.user, None)
        await self.moves.forget(row.user)
        log.info("moved %s to %s: the old copy of its folder here is removed", row.user, row.target)


async def _read_up_to(stream: asyncio.StreamReader, size: int) -> bytes:
    """Up to `size` bytes (less only at the end): chunks of one size, whatever the pipe hands over."""
    parts: list[bytes] = []
    left = size
    while left > 0:
        part = await stream.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)
