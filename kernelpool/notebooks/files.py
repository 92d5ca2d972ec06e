"""A user's other files: read in pages, written whole or in appended chunks, deleted; bounded.

Same rules as notebooks: paths are client-given and checked (`paths.check_file_path`), every
call goes through the user's `sandbox.fs.SafeRoot` (no link followed, regular files only, new
files owned by the user's uid, whole-file writes atomic) in the user's file-work turn
(`filework`), and one call reads or writes at most `max_file_bytes`: a larger file is read page by
page from a byte offset (never whole) and written with mode='append' in chunks. A write that adds
bytes is checked against the user's disk quota (`quota`) and the server's free-space floor first;
a refused write changes nothing. A notebook written or deleted here is dropped from the notebook
service's cache, under that notebook's lock. Callers: the tool layer (`kernelpool.mcp.files`) and
the `file://` resources (`kernelpool.mcp.resources`).
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from kernelpool.errors import FileTooLargeForCall, InvalidArgument, NoSpace, PathRefused
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.paths import refusing
from kernelpool.notebooks.quota import DiskQuota
from kernelpool.notebooks.service import NotebookService
from sandbox import SafeRoot

ReadEncoding = Literal["auto", "utf-8", "base64"]
WriteEncoding = Literal["utf-8", "base64"]
WriteMode = Literal["create", "overwrite", "append"]


@dataclass(frozen=True)
class Page:
    """One page of a file: `text` is its content (UTF-8 text, or base64 of its bytes)."""

    path: str
    size: int  # the file's size in bytes when it was read
    offset: int  # byte offset of the page
    length: int  # bytes of the file in the page
    encoding: Literal["utf-8", "base64"]
    text: str

    @property
    def next_offset(self) -> int | None:
        end = self.offset + self.length
        return end if end < self.size else None


@dataclass(frozen=True)
class Written:
    path: str
    size: int  # the file's size after the write
    written: int  # bytes written by this call
    created: bool


def _text_page(raw: bytes, at_end: bool, max_chars: int) -> tuple[str, int] | None:
    """(text, bytes it takes) of the first `max_chars` characters of `raw` as UTF-8 (a character
    cut at the end of `raw` waits for the next page), or None when `raw` is not UTF-8 text."""
    if b"\0" in raw:
        return None  # valid UTF-8, but no text file has NULs: binary, as git decides
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=at_end)
    except UnicodeDecodeError:
        return None
    text = text[:max_chars]
    return text, len(text.encode("utf-8"))


def decode_content(content: str, encoding: WriteEncoding) -> bytes:
    """The bytes a write_file call carries; InvalidArgument when they are not what `encoding` says."""
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except ValueError as exc:
            raise InvalidArgument("content", f"not valid base64 ({exc})") from None
    try:
        return content.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument("content", f"not valid Unicode: a lone surrogate at character {exc.start}; send "
                                         "bytes that are not text with encoding='base64'") from None


class FileService:
    """read / write / delete in users' folders; `max_bytes` is max_file_bytes."""

    def __init__(self, roots: Callable[[str], SafeRoot], files: FileWork, notebooks: NotebookService,
                 quota: DiskQuota, max_bytes: int, disk_check: Callable[[str], None] | None = None) -> None:
        self._roots = roots
        self._files = files
        self._notebooks = notebooks
        self.quota = quota
        self.max_bytes = max_bytes
        self._disk_check = disk_check

    async def read(self, user: str, path: str, offset: int, max_chars: int, encoding: ReadEncoding) -> Page:
        """A page of at most `max_chars` characters (and `max_bytes` bytes) from byte `offset`."""
        if offset < 0:
            raise InvalidArgument("offset", "must be 0 or more (a byte offset: pass next_offset from the last page)")
        if not 1 <= max_chars <= self.max_bytes:
            raise InvalidArgument("max_chars", f"must be 1..{self.max_bytes} (max_file_bytes)")
        return await self._files.run(user, self._read, user, path, offset, max_chars, encoding)

    def _read(self, user: str, path: str, offset: int, max_chars: int, encoding: ReadEncoding) -> Page:
        as_text = min(4 * max_chars, self.max_bytes)  # a character takes at most 4 bytes
        as_base64 = max(3, min(max_chars // 4 * 3, self.max_bytes))  # 4 characters for 3 bytes
        want = as_base64 if encoding == "base64" else as_text
        with _refusing(path):
            raw, size = self._roots(user).read_range(path, offset, want)
        if offset > size:
            raise InvalidArgument("offset", f"{offset} is past the end of {path!r} ({size} bytes)")
        if encoding != "base64":
            found = _text_page(raw, offset + len(raw) >= size, max_chars)
            if found is not None:
                text, length = found
                if length or not raw:
                    return Page(path, size, offset, length, "utf-8", text)
            if encoding == "utf-8":
                raise InvalidArgument("encoding", f"{path!r} is not UTF-8 text from byte {offset}: "
                                                  "read it with encoding='base64' (or 'auto')")
        raw = raw[:as_base64]
        return Page(path, size, offset, len(raw), "base64", base64.b64encode(raw).decode("ascii"))

    async def write(self, user: str, path: str, data: bytes, mode: WriteMode) -> Written:
        if len(data) > self.max_bytes:
            raise FileTooLargeForCall(path, len(data), self.max_bytes)
        if self._disk_check is not None and data:
            self._disk_check(f"write {path!r}")
        async with self._notebooks.lock(user, path):  # only a notebook's path is ever locked elsewhere
            written = await self._files.run(user, self._write, user, path, data, mode)
            self._notebooks.forget(user, path)
        return written

    def _write(self, user: str, path: str, data: bytes, mode: WriteMode) -> Written:
        root = self._roots(user)
        with _refusing(path):
            existing = root.stat(path)
            if existing is not None and existing.kind == "dir":
                raise PathRefused(path, "a folder is there")
            if existing is not None and existing.kind != "file":
                raise PathRefused(path, f"a {'symbolic link' if existing.kind == 'symlink' else 'special file'} "
                                        "is there, not a regular file")
            if mode == "create" and existing is not None:
                raise InvalidArgument("mode", f"{path!r} exists: pass mode='overwrite' to replace it, or 'append'")
            if mode == "append" and existing is None:
                raise InvalidArgument("mode", f"{path!r} does not exist: the first piece takes mode='create'")
            old = existing.size if existing is not None else 0
            growth = len(data) if mode == "append" else len(data) - old
            self.quota.check(user, path, growth)
            if mode == "append":
                size = root.append_bytes(path, data)
            else:
                parent = path.rpartition("/")[0]
                if parent:
                    root.makedirs(parent)
                root.write_bytes_atomic(path, data, exclusive=mode == "create")
                size = len(data)
        self.quota.changed(user, growth)
        return Written(path, size, len(data), existing is None)

    async def delete(self, user: str, path: str) -> str:
        """Remove a file (or a link, never its target; not a folder); what was removed."""
        async with self._notebooks.lock(user, path):
            kind = await self._files.run(user, self._delete, user, path)
            self._notebooks.forget(user, path)
        return kind

    def _delete(self, user: str, path: str) -> str:
        root = self._roots(user)
        with _refusing(path):
            existing = root.stat(path)
            if existing is None:
                raise PathRefused(path, "no such file")
            if existing.kind == "dir":
                raise PathRefused(path, "a folder; delete_file removes files only")
            if existing.kind == "other":
                raise PathRefused(path, "not a regular file")
            root.remove(path)
        self.quota.changed(user, -existing.size if existing.kind == "file" else 0)
        return existing.kind


@contextlib.contextmanager
def _refusing(path: str) -> Iterator[None]:
    """Sandbox refusals and the OS errors a file tool meets, as the client's errors."""
    try:
        with refusing(path):
            yield
    except FileNotFoundError:
        raise PathRefused(path, "no such file") from None
    except FileExistsError:
        raise InvalidArgument("mode", f"{path!r} appeared meanwhile: pass mode='overwrite'") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(path) from None
        raise PathRefused(path, exc.strerror or str(exc)) from None
