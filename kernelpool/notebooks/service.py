"""Notebooks on disk: the source of truth.

`NotebookService` reads and writes `.ipynb` files inside a user's folder through
`sandbox.fs.SafeRoot` (no link or `..` can steer it outside), validates every file it writes
with nbformat, writes atomically, and serialises edits of one notebook with a lock. The pure
editing functions below work on an in-memory notebook and are what the tools call inside
`NotebookService.edit`.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import nbjson, new_code_cell, new_markdown_cell, new_notebook, new_raw_cell

from kernelpool.errors import (
    CellNotFound,
    CorruptNotebook,
    InvalidArgument,
    NoSpace,
    NotebookExists,
    NotebookNotFound,
    PathRefused,
)
from sandbox import SafeRoot
from sandbox.errors import PathError, SandboxError
from sandbox.fs import normalize_path

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_NOTEBOOK_BYTES = 512 * 1024 * 1024
_CACHE_ENTRIES = 512  # parsed notebooks kept in memory
_CACHE_MAX_FILE = 8 * 1024 * 1024  # larger notebooks are parsed each time rather than held
CELL_TYPES = ("code", "markdown", "raw")


def check_notebook_path(path: str) -> str:
    """Normalise and check a client-given notebook path; raises PathRefused.

    Lenient about spelling ("./x//y.ipynb" is "x/y.ipynb"; backslashes are folder separators);
    the rules themselves (characters, depth, name length, NFC) are `sandbox.fs.normalize_path`'s.
    """
    if not isinstance(path, str) or not path.strip():
        raise PathRefused(str(path), "empty path")
    if path.startswith("/") or path.startswith("\\"):
        raise PathRefused(path, "absolute paths are not allowed; give a path relative to your folder")
    norm = _normalise(path, path.replace("\\", "/"))
    if not norm:
        raise PathRefused(path, "empty path")
    if not norm.endswith(".ipynb"):
        raise PathRefused(path, "a notebook path must end in .ipynb")
    return norm


def check_dir_path(path: str) -> str:
    """Normalise and check a client-given folder path ("" is the user's folder); raises PathRefused."""
    if not isinstance(path, str):
        raise PathRefused(str(path), "path must be a string")
    if path.startswith("/"):
        raise PathRefused(path, "absolute paths are not allowed; give a path relative to your folder")
    return _normalise(path, path)


def _normalise(given: str, path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return ""
    try:
        return normalize_path("/".join(parts))
    except PathError as exc:
        raise PathRefused(given, exc.reason) from None


# ---- pure editing functions -------------------------------------------------------------

def new_cell(cell_type: str, source: str) -> NotebookNode:
    if cell_type == "code":
        return new_code_cell(source)
    if cell_type == "markdown":
        return new_markdown_cell(source)
    if cell_type == "raw":
        return new_raw_cell(source)
    raise InvalidArgument("cell_type", f"{cell_type!r}: use one of {', '.join(CELL_TYPES)}")


def cell_position(nb: NotebookNode, path: str, cell_index: int | None, cell_id: str | None) -> int:
    """The index of the cell named by index (negative counts from the end) or by id."""
    count = len(nb.cells)
    if cell_id is not None:
        for i, cell in enumerate(nb.cells):
            if cell.get("id") == cell_id:
                return i
        raise CellNotFound(path, f"with id {cell_id!r}", count)
    if cell_index is None:
        raise InvalidArgument("cell", "give cell_index or cell_id")
    if isinstance(cell_index, bool) or not isinstance(cell_index, int):
        raise InvalidArgument("cell_index", "must be an integer")
    index = cell_index + count if cell_index < 0 else cell_index
    if not 0 <= index < count:
        raise CellNotFound(path, f"at index {cell_index}", count)
    return index


def insert_position(nb: NotebookNode, cell_index: int) -> int:
    """Where `insert_cell(cell_index)` puts a cell: -1 appends; 0..len inserts before that cell."""
    count = len(nb.cells)
    if isinstance(cell_index, bool) or not isinstance(cell_index, int):
        raise InvalidArgument("cell_index", "must be an integer")
    if cell_index == -1:
        return count
    if not 0 <= cell_index <= count:
        raise InvalidArgument("cell_index", f"{cell_index} is out of range: use 0..{count}, or -1 to append")
    return cell_index


def insert_cell(nb: NotebookNode, cell_index: int, cell_type: str, source: str) -> tuple[int, NotebookNode]:
    pos = insert_position(nb, cell_index)
    cell = new_cell(cell_type, source)
    nb.cells.insert(pos, cell)
    return pos, cell


def clear_outputs(cell: NotebookNode) -> None:
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None


def set_source(cell: NotebookNode, source: str) -> None:
    # outputs stay until the cell runs again, as in JupyterLab
    cell.source = source


def edit_source(cell: NotebookNode, old: str, new: str, replace_all: bool) -> int:
    """Replace `old` by `new`; unless replace_all, `old` must occur exactly once. Returns the count."""
    if old == "":
        raise InvalidArgument("old_string", "must not be empty")
    source = cell.source
    count = source.count(old)
    if count == 0:
        raise InvalidArgument("old_string", "not found in the cell's source")
    if count > 1 and not replace_all:
        raise InvalidArgument("old_string", f"occurs {count} times; make it unique or pass replace_all=true")
    cell.source = source.replace(old, new) if replace_all else source.replace(old, new, 1)
    return count if replace_all else 1


def move_cell(nb: NotebookNode, src: int, dst: int) -> int:
    count = len(nb.cells)
    if isinstance(dst, bool) or not isinstance(dst, int):
        raise InvalidArgument("new_index", "must be an integer")
    target = dst + count if dst < 0 else dst
    if not 0 <= target < count:
        raise InvalidArgument("new_index", f"{dst} is out of range: use 0..{count - 1}")
    cell = nb.cells.pop(src)
    nb.cells.insert(target, cell)
    return target


# ---- validation --------------------------------------------------------------------------

_CELL_PARTS = ("source", "outputs", "metadata", "attachments")


def _fingerprint(cell: NotebookNode) -> tuple[Any, ...]:
    """What a change to a cell replaces: edits assign new objects to these keys (never change
    them in place), so holding the objects and comparing with `is` tells a changed cell."""
    return (cell, len(cell), cell.get("cell_type"), cell.get("id"), cell.get("execution_count"),
            *(cell.get(k) for k in _CELL_PARTS))


def _unchanged(cell: NotebookNode, known: tuple[Any, ...] | None) -> bool:
    if known is None:
        return False
    now = _fingerprint(cell)
    return all(a is b or (type(a) in (int, str, type(None)) and a == b) for a, b in zip(now, known, strict=True))


def _check(nb: NotebookNode, validated: dict[int, tuple[Any, ...]]) -> None:
    """Validate `nb` with nbformat, re-checking only the cells changed since it was validated
    (whole-notebook validation grows with the notebook and was most of an edit's cost)."""
    changed = [c for c in nb.cells if not _unchanged(c, validated.get(id(c)))]
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

    def __init__(self, roots: Callable[[str], SafeRoot], disk_check: Callable[[str], None] | None = None) -> None:
        self._roots = roots
        self._disk_check = disk_check  # raises DiskLow when the data folder is under its free-space floor
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # (user, path) -> ((size, mtime) of the file as last read or written, the parsed notebook).
        # Callers of `load` must not change the notebook they get; `edit` is the way to change it.
        self._cache: OrderedDict[tuple[str, str], tuple[tuple[int, float], NotebookNode]] = OrderedDict()
        # id(cached notebook) -> {id(cell): fingerprint of the cell as last validated}
        self._validated: dict[int, dict[int, tuple[Any, ...]]] = {}
        # called with (user, path) after each write: resource subscriptions (kernelpool/mcp/notices.py)
        self.listeners: list[Callable[[str, str], Awaitable[Any]]] = []

    def lock(self, user: str, path: str) -> asyncio.Lock:
        key = (user, path)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def exists(self, user: str, path: str) -> bool:
        return await asyncio.to_thread(self._exists, user, path)

    def _exists(self, user: str, path: str) -> bool:
        try:
            return self._roots(user).exists(path)
        except SandboxError as exc:
            raise PathRefused(path, str(exc)) from None

    async def load(self, user: str, path: str) -> NotebookNode:
        return await asyncio.to_thread(self._load, user, path)

    def _stamp(self, user: str, path: str) -> tuple[int, float] | None:
        """(size, mtime) of the notebook file, without following links; None when it is not a file."""
        try:
            entry = self._roots(user).stat(path)
        except (SandboxError, OSError):
            return None
        return (entry.size, entry.mtime) if entry is not None and entry.kind == "file" else None

    def _load(self, user: str, path: str) -> NotebookNode:
        # the parsed notebook is kept while the file on disk is the one we last read or wrote:
        # reading, parsing and validating a big notebook on every call costs milliseconds
        stamp = self._stamp(user, path)
        cached = self._cache.get((user, path))
        if stamp is not None and cached is not None and cached[0] == stamp:
            self._cache.move_to_end((user, path))
            return cached[1]
        try:
            data = self._roots(user).read_bytes(path, max_bytes=MAX_NOTEBOOK_BYTES)
        except FileNotFoundError:
            raise NotebookNotFound(path) from None
        except SandboxError as exc:
            raise PathRefused(path, str(exc)) from None
        except (IsADirectoryError, NotADirectoryError, PermissionError, OSError) as exc:
            raise PathRefused(path, exc.strerror or str(exc)) from None
        invalid: dict[str, Any] = {}
        try:
            nb = nbformat.reads(data.decode("utf-8"), as_version=4, capture_validation_error=invalid)
        except (UnicodeDecodeError, json.JSONDecodeError, nbformat.reader.NotJSONError) as exc:
            raise CorruptNotebook(path, f"not JSON: {exc}") from None
        except Exception as exc:  # nbformat raises assorted errors for wrong shapes
            raise CorruptNotebook(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        if "ValidationError" in invalid:
            raise CorruptNotebook(path, invalid["ValidationError"].message)
        # notebooks older than 4.5 get cell ids on upgrade, so that cells can be addressed by id
        if nb.nbformat_minor < 5:
            nb.nbformat_minor = 5
            for cell in nb.cells:
                if "id" not in cell:
                    cell.id = new_cell("raw", "").id
        if stamp is not None and stamp == self._stamp(user, path):
            self._remember(user, path, stamp, nb)
        return nb

    async def save(self, user: str, path: str, nb: NotebookNode) -> None:
        if self._disk_check is not None:
            self._disk_check(f"write {path!r}")
        # The write runs in a thread that a cancellation cannot stop: the caller (and the lock
        # it holds) waits for it all the same, or a later edit's rename could land first and be
        # overwritten by this one. Then the cancellation goes on.
        write = asyncio.ensure_future(asyncio.to_thread(self._save, user, path, nb))
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
        for listener in self.listeners:
            try:
                await listener(user, path)
            except Exception:  # a listener must not turn a saved change into a failure
                log.exception("notebook listener failed")

    def _save(self, user: str, path: str, nb: NotebookNode) -> None:
        # a notebook JupyterLab would refuse is never written: every cell changed since the
        # notebook was last validated, and everything outside the cells, is validated now
        _check(nb, self._validated.get(id(nb), {}))
        text = nbjson.writes(nb)
        try:
            root = self._roots(user)
            parent = path.rpartition("/")[0]
            if parent:
                root.makedirs(parent)
            root.write_bytes_atomic(path, text.encode("utf-8"))
        except SandboxError as exc:
            self._forget(user, path)
            raise PathRefused(path, str(exc)) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._forget(user, path)
            raise NoSpace(path) from None
        stamp = self._stamp(user, path)
        if stamp is not None:
            self._remember(user, path, stamp, nb)

    def _forget(self, user: str, path: str) -> None:
        dropped = self._cache.pop((user, path), None)
        if dropped is not None:
            self._validated.pop(id(dropped[1]), None)

    def _remember(self, user: str, path: str, stamp: tuple[int, float], nb: NotebookNode) -> None:
        """Keep `nb` (valid: just read or written) as the parsed form of the file at `stamp`."""
        key = (user, path)
        old = self._cache.pop(key, None)
        if old is not None and old[1] is not nb:
            self._validated.pop(id(old[1]), None)
        if stamp[0] > _CACHE_MAX_FILE:
            self._validated.pop(id(nb), None)
            return
        self._cache[key] = (stamp, nb)
        self._validated[id(nb)] = {id(c): _fingerprint(c) for c in nb.cells}
        while len(self._cache) > _CACHE_ENTRIES:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._validated.pop(id(dropped), None)

    async def create(self, user: str, path: str) -> NotebookNode:
        async with self.lock(user, path):
            if await self.exists(user, path):
                raise NotebookExists(path)
            nb = new_notebook()
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
            nb.metadata["language_info"] = {"name": "python"}
            await self.save(user, path, nb)
            return nb

    async def edit(self, user: str, path: str, change: Callable[[NotebookNode], T]) -> T:
        """Load, apply `change`, save; all under the notebook's lock. A change that raises saves nothing."""
        async with self.lock(user, path):
            nb = await self.load(user, path)
            try:
                result = change(nb)
                await self.save(user, path, nb)
            except BaseException:
                # the change may have half-happened in memory: the file is the truth, read it again
                self._forget(user, path)
                raise
            return result

    async def list_notebooks(self, user: str, limit: int = 10000) -> list[str]:
        return await asyncio.to_thread(self._walk, user, "", "*.ipynb", limit)

    async def list_files(self, user: str, path: str, pattern: str | None, limit: int = 2000) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._list, user, path, pattern, limit)

    def _walk(self, user: str, start: str, pattern: str, limit: int) -> list[str]:
        root = self._roots(user)
        found: list[str] = []
        stack = [start]
        while stack and len(found) < limit:
            folder = stack.pop()
            try:
                entries = root.listdir(folder)
            except (OSError, SandboxError):
                continue
            for entry in sorted(entries, key=lambda e: e.name, reverse=True):
                rel = f"{folder}/{entry.name}" if folder else entry.name
                if entry.name.startswith("."):
                    continue  # .ipynb_checkpoints, .ipython, .local: not the user's notebooks
                if entry.kind == "dir":
                    stack.append(rel)
                elif entry.kind == "file" and fnmatch.fnmatch(entry.name, pattern):
                    found.append(rel)
        return sorted(found)

    def _list(self, user: str, path: str, pattern: str | None, limit: int) -> list[dict[str, Any]]:
        folder = check_dir_path(path)
        try:
            entries = self._roots(user).listdir(folder)
        except FileNotFoundError:
            raise PathRefused(path, "no such folder") from None
        except NotADirectoryError:
            raise PathRefused(path, "not a folder") from None
        except SandboxError as exc:
            raise PathRefused(path, str(exc)) from None
        out = []
        for entry in sorted(entries, key=lambda e: e.name):
            if pattern and not fnmatch.fnmatch(entry.name, pattern):
                continue
            out.append({
                "path": f"{folder}/{entry.name}" if folder else entry.name,
                "type": entry.kind,
                "size": entry.size,
                "modified": entry.mtime,
            })
            if len(out) >= limit:
                break
        return out
