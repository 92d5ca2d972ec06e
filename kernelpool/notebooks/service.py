"""Notebooks on disk: the source of truth.

`NotebookService` reads and writes `.ipynb` files inside a user's folder through
`sandbox.fs.SafeRoot` (no link or `..` can steer it outside), validates every file it writes
with nbformat, writes atomically, and serialises edits of one notebook with a lock. The pure
editing functions that run inside `NotebookService.edit` are in `kernelpool.notebooks.cells`;
client-given paths are checked by `kernelpool.notebooks.paths` before they get here.
Callers: the workspace and execution services, the tool layer, the resource handlers.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_notebook

from kernelpool.errors import (
    InvalidArgument,
    KernelpoolError,
    NoSpace,
    NotebookExists,
    NotebookNotFound,
    NotebookTooComplex,
    NotebookTooLarge,
    PathRefused,
)
from kernelpool.notebooks import cells
from kernelpool.notebooks.changes import Change, Changes
from kernelpool.notebooks.encoding import CellCachingEncoder, Mark, file_bytes, fingerprint, same
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.listing import Listing
from kernelpool.notebooks.paths import refusing
from kernelpool.notebooks.quota import DiskQuota
from kernelpool.notebooks.reading import parse, parse_cost
from sandbox import FileTooLarge, SafeRoot
from sandbox.errors import SandboxError

log = logging.getLogger(__name__)

T = TypeVar("T")

PARSE_FACTOR = 4  # a read may hold at most this many times max_notebook_bytes while it parses (reading.py)
_CACHE_ENTRIES = 512  # parsed notebooks kept in memory...
_CACHE_BYTES = 64 * 1024 * 1024  # ...while their parse costs add up to no more than this (a larger one is parsed each time)
# a read of a file up to _SMALL_READ bytes, whose parse costs up to _SMALL_COST, runs in any
# file-work thread; a larger one waits for the server's one large read at a time
_SMALL_READ = 4 << 20
_SMALL_COST = 48 << 20


class _Larger(Exception):
    """The file is larger, or costlier to parse, than a small read may take: read it as a large one."""


# ---- validation --------------------------------------------------------------------------

def _check(nb: NotebookNode, marks: list[Mark], validated: dict[int, Mark]) -> None:
    """Validate `nb` with nbformat, re-checking only the cells changed since it was validated
    (whole-notebook validation grows with the notebook and was most of an edit's cost)."""
    changed = [c for c, mark in zip(nb.cells, marks, strict=True) if not same(mark, validated.get(id(c)))]
    skeleton = NotebookNode({k: v for k, v in nb.items() if k != "cells"})
    skeleton["cells"] = changed
    try:
        nbformat.validate(skeleton)
    except nbformat.ValidationError as exc:
        raise ValueError(f"refusing to write an invalid notebook: {exc.message}") from None
    ids = [c.get("id") for c in nb.cells]
    if len(set(ids)) != len(ids):
        raise ValueError("refusing to write a notebook with duplicate cell ids")


# ---- files -------------------------------------------------------------------------------

class NotebookService:
    """Reads and writes one server's notebooks; `roots` gives each user's SafeRoot."""

    def __init__(self, roots: Callable[[str], SafeRoot], files: FileWork, max_bytes: int,
                 disk_check: Callable[[str], None] | None = None, quota: DiskQuota | None = None,
                 changes: Changes | None = None) -> None:
        self._roots = roots
        self._quota = quota  # user_disk_quota: a save that grows a file (or a new one) is checked against it
        self._files = files  # every file-system call for a user runs there, in one of the user's turns
        self.max_bytes = max_bytes  # max_notebook_bytes
        self.max_cost = PARSE_FACTOR * max_bytes
        self._large = asyncio.Lock()  # one large read at a time, server-wide
        self._disk_check = disk_check  # raises DiskLow when the data folder is under its free-space floor
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # (user, path) -> ((size, mtime) of the file as last read or written, the parsed notebook,
        # its parse cost). Callers of `load` must not change the notebook they get; `edit` is the
        # way to change it. Changed from file-work threads, under `_guard`.
        self._cache: OrderedDict[tuple[str, str], tuple[tuple[int, float], NotebookNode, int]] = OrderedDict()
        self._cached_bytes = 0
        self._guard = threading.RLock()
        # id(cached notebook) -> {id(cell): fingerprint of the cell as last validated}
        self._validated: dict[int, dict[int, Mark]] = {}
        # and each cached notebook's cells as encoded in its file: a save encodes only changed cells
        self._encoder = CellCachingEncoder()
        # told of each write: resource subscriptions (kernelpool/mcp/notices.py), open pages (kernelpool/web/live.py)
        self.changes = changes or Changes()

    def lock(self, user: str, path: str) -> asyncio.Lock:
        key = (user, path)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def exists(self, user: str, path: str) -> bool:
        return await self._files.run(user, self._exists, user, path)

    def _exists(self, user: str, path: str) -> bool:
        with refusing(path):
            return self._roots(user).exists(path)

    async def load(self, user: str, path: str) -> NotebookNode:
        """The parsed notebook (from the cache while the file is the one last read or written).
        A file over max_notebook_bytes, or whose parse would cost more than PARSE_FACTOR times
        that, is refused before it is parsed; reads of large files take turns server-wide."""
        async with self._files.turn(user):
            nb, size = await self._files.call(self._cached, user, path)
            if nb is not None:
                return nb
            if size is None or size <= _SMALL_READ:
                try:
                    return await self._files.call(self._read, user, path, _SMALL_READ, _SMALL_COST)
                except _Larger:
                    pass
            async with self._large:
                return await self._files.call(self._read, user, path, self.max_bytes, self.max_cost)

    def peek(self, user: str, path: str) -> NotebookNode | None:
        """The notebook as this server last read or wrote it, from memory only (no disk, no thread):
        the web view's live updates, right after a change was published. None when it is not kept
        (then `load`). Read-only, like `load`'s."""
        cached = self._cache.get((user, path))
        return cached[1] if cached is not None else None

    def _stamp(self, user: str, path: str) -> tuple[int, float] | None:
        """(size, mtime) of the notebook file, without following links; None when it is not a file."""
        try:
            entry = self._roots(user).stat(path)
        except (SandboxError, OSError):
            return None
        return (entry.size, entry.mtime) if entry is not None and entry.kind == "file" else None

    def _cached(self, user: str, path: str) -> tuple[NotebookNode | None, int | None]:
        """The cached notebook if the file is still the one it was parsed from; and the file's size."""
        stamp = self._stamp(user, path)
        with self._guard:
            cached = self._cache.get((user, path))
            if stamp is not None and cached is not None and cached[0] == stamp:
                self._cache.move_to_end((user, path))
                return cached[1], stamp[0]
        return None, stamp[0] if stamp is not None else None

    def _read(self, user: str, path: str, max_bytes: int, max_cost: int) -> NotebookNode:
        # the parsed notebook is kept while the file on disk is the one we last read or wrote:
        # reading, parsing and validating a big notebook on every call costs milliseconds
        stamp = self._stamp(user, path)
        try:
            with refusing(path):
                try:
                    data = self._roots(user).read_bytes(path, max_bytes=max_bytes)
                except FileTooLarge as exc:
                    if max_bytes < self.max_bytes:
                        raise _Larger() from None
                    raise NotebookTooLarge(path, exc.size, self.max_bytes, grew=exc.grew) from None
        except FileNotFoundError:
            raise NotebookNotFound(path) from None
        except (IsADirectoryError, NotADirectoryError, PermissionError, OSError) as exc:
            raise PathRefused(path, exc.strerror or str(exc)) from None
        cost = parse_cost(data)
        if cost > max_cost:
            if max_cost < self.max_cost:
                raise _Larger()
            raise NotebookTooComplex(path, len(data), cost, self.max_cost)
        nb = parse(data, path)
        del data
        if stamp is not None and stamp == self._stamp(user, path):
            self._remember(user, path, stamp, nb, cost)
        return nb

    async def save(self, user: str, path: str, nb: NotebookNode) -> None:
        if self._disk_check is not None:
            self._disk_check(f"write {path!r}")
        # The write runs in a thread that a cancellation cannot stop: the caller (and the lock
        # it holds) waits for it all the same, or a later edit's rename could land first and be
        # overwritten by this one. Then the cancellation goes on.
        write = asyncio.ensure_future(self._files.run(user, self._save, user, path, nb))
        cancelled = False
        while True:
            try:
                await asyncio.shield(write)
                break
            except asyncio.CancelledError:
                if write.done():
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        self.changes.publish(Change(user, path, "saved"))

    def _save(self, user: str, path: str, nb: NotebookNode) -> None:
        # a notebook JupyterLab would refuse is never written: every cell changed since the
        # notebook was last validated, and everything outside the cells, is validated now
        marks = [fingerprint(c) for c in nb.cells]  # once per write: validation and encoding share them
        _check(nb, marks, self._validated.get(id(nb), {}))
        data = file_bytes(self._encoder.encode(nb, marks))
        # a parse costs at least 3 times the file: a larger one will not be kept, so no need to weigh it
        cost = parse_cost(data) if 3 * len(data) <= _CACHE_BYTES else _CACHE_BYTES + 1
        stamp = None
        try:
            self._write(user, path, data)
            stamp = self._stamp(user, path)
        except KernelpoolError:
            self._forget(user, path)
            raise
        finally:
            if stamp is None:  # nothing remembered: neither are its encoded cells
                self._encoder.forget(nb)
        if stamp is not None:
            self._remember(user, path, stamp, nb, cost, marks)

    def _write(self, user: str, path: str, data: bytes) -> None:
        try:
            with refusing(path):
                root = self._roots(user)
                growth = len(data)
                if self._quota is not None:
                    old = root.stat(path)
                    growth -= old.size if old is not None and old.kind == "file" else 0
                    self._quota.check(user, path, growth)
                parent = path.rpartition("/")[0]
                if parent:
                    root.makedirs(parent)
                root.write_bytes_atomic(path, data)
                if self._quota is not None:
                    self._quota.changed(user, growth)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise NoSpace(path) from None

    def forget(self, user: str, path: str) -> None:
        """The file at `path` was written or removed outside this service (`kernelpool.notebooks.files`)."""
        self._forget(user, path)

    def _forget(self, user: str, path: str) -> None:
        with self._guard:
            dropped = self._cache.pop((user, path), None)
            if dropped is not None:
                self._drop(dropped)

    def _drop(self, entry: tuple[tuple[int, float], NotebookNode, int]) -> None:
        self._cached_bytes -= entry[2]
        self._validated.pop(id(entry[1]), None)
        self._encoder.forget(entry[1])

    def _remember(self, user: str, path: str, stamp: tuple[int, float], nb: NotebookNode, cost: int,
                  marks: list[Mark] | None = None) -> None:
        """Keep `nb` (valid: just read or written) as the parsed form of the file at `stamp`,
        weighed by its parse cost (what it holds in memory, not its file's size)."""
        key = (user, path)
        with self._guard:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cached_bytes -= old[2]
                if old[1] is not nb:
                    self._validated.pop(id(old[1]), None)
                    self._encoder.forget(old[1])
            if cost > _CACHE_BYTES:
                self._validated.pop(id(nb), None)
                self._encoder.forget(nb)
                return
            self._cache[key] = (stamp, nb, cost)
            self._cached_bytes += cost
            self._validated[id(nb)] = {id(c): m for c, m in zip(nb.cells, marks or map(fingerprint, nb.cells), strict=True)}
            while len(self._cache) > _CACHE_ENTRIES or self._cached_bytes > _CACHE_BYTES:
                _, dropped = self._cache.popitem(last=False)
                self._drop(dropped)

    async def create(self, user: str, path: str, metadata: dict[str, Any] | None = None) -> NotebookNode:
        """A new notebook whose metadata records its kernel (`kernels.specs.Spec.metadata`; python3's by default)."""
        async with self.lock(user, path):
            if await self.exists(user, path):
                raise NotebookExists(path)
            nb: NotebookNode = new_notebook()
            nb.metadata.update(nbformat.from_dict(metadata) if metadata else {
                "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                "language_info": {"name": "python"}})
            await self.save(user, path, nb)
            return nb

    async def edit(self, user: str, path: str, change: Callable[[NotebookNode], T]) -> T:
        """Load, apply `change`, save; all under the notebook's lock. A change that raises saves nothing."""
        async with self.lock(user, path):
            return await self.edit_locked(user, path, change)

    async def edit_locked(self, user: str, path: str, change: Callable[[NotebookNode], T]) -> T:
        """`edit` for a caller that holds the notebook's lock already."""
        nb = await self.load(user, path)
        try:
            result = change(nb)
            await self.save(user, path, nb)
        except BaseException:
            # the change may have half-happened in memory: the file is the truth, read it again
            self._forget(user, path)
            raise
        return result

    async def must_exist(self, user: str, path: str) -> None:
        """Raise the precise error (not found, or refused) unless the notebook file is there."""
        if not await self.exists(user, path):
            await self.load(user, path)

    async def cell(self, user: str, path: str, *, cell_index: int | None = None,
                   cell_id: str | None = None) -> tuple[int, NotebookNode]:
        """The cell named by index or id, read-only (see `load`): (index, cell)."""
        nb = await self.load(user, path)
        i = cells.cell_position(nb, path, cell_index=cell_index, cell_id=cell_id)
        return i, nb.cells[i]

    async def cell_window(self, user: str, path: str, start: int, limit: int) -> tuple[int, list[NotebookNode]]:
        """Up to `limit` cells from index `start`, read-only; and how many cells the notebook has."""
        if start < 0:
            raise InvalidArgument("start_index", "must be 0 or more")
        if limit < 1:
            raise InvalidArgument("limit", "must be 1 or more")
        nb = await self.load(user, path)
        return len(nb.cells), nb.cells[start:start + limit]

    async def output_page(self, user: str, path: str, *, cell_index: int | None = None, cell_id: str | None = None,
                          offset: int, size: int, max_size: int) -> tuple[int, NotebookNode, cells.OutputPage]:
        """A page of one cell's output text (`cells.output_page`): (index, cell, page)."""
        i, cell = await self.cell(user, path, cell_index=cell_index, cell_id=cell_id)
        return i, cell, cells.output_page(cell, offset, size, max_size)

    async def insert(self, user: str, path: str, cell_index: int, cell_type: str, source: str) -> tuple[int, NotebookNode]:
        """Insert a new cell at `cell_index` (-1 appends) and save: (index, cell)."""
        return await self.edit(user, path, lambda nb: cells.insert_cell(nb, cell_index, cell_type, source))

    async def edit_cell(self, user: str, path: str, apply: Callable[[NotebookNode, int], T], *,
                        cell_index: int | None = None, cell_id: str | None = None) -> tuple[int, str, T]:
        """Change the cell named by index or id (`apply(nb, index)`) and save: (index, id, what apply returned)."""

        def change(nb: NotebookNode) -> tuple[int, str, T]:
            i = cells.cell_position(nb, path, cell_index=cell_index, cell_id=cell_id)
            return i, nb.cells[i].id, apply(nb, i)

        return await self.edit(user, path, change)

    async def list_notebooks(self, user: str) -> Listing:
        """The user's notebooks (paths), bounded: `Listing.note` says when the list was cut."""
        return await self._files.scan(user, "notebooks", self._roots(user))

    async def modified(self, user: str, paths: list[str]) -> dict[str, float]:
        """Each notebook's last change (its file's mtime), for the web view's list; gone ones left out."""
        def stamps() -> dict[str, float]:
            return {p: stamp[1] for p in paths if (stamp := self._stamp(user, p)) is not None}

        return await self._files.run(user, stamps)

    async def list_files(self, user: str, path: str, *, pattern: str | None = None) -> Listing:
        """Entries of one folder (dicts as list_files returns them), bounded like list_notebooks."""
        return await self._files.scan(user, "files", self._roots(user), path, pattern)
