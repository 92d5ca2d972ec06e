"""Bounded, streamed reading of folders in a user's tree, from descriptors opened without following links.

A user's kernel can fill a folder with millions of entries, or nest folders deeply. Reading such
a folder whole (listdir, then a stat per name, then sorting) made one call hold the server's
file-work threads for tens of seconds and hundreds of megabytes. Here a folder is read as a
stream (`os.scandir` of a descriptor), only the entries kept are stat'ed, and reading stops at a
number of kept entries or of names read, whichever comes first; the result says whether the
folder was read to its end. Callers: `sandbox.fs.SafeRoot.scan` and `SafeRoot.walk`, which
open the descriptors (the link rules are theirs).
"""

from __future__ import annotations

import os
import stat as st
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sandbox.paths import MAX_DEPTH

if TYPE_CHECKING:
    from os import _ScandirIterator

Kind = Literal["file", "dir", "symlink", "other"]

# a folder opened to be read: O_NOFOLLOW, so a name swapped for a link fails instead of being followed
READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    """One directory entry as `lstat` sees it (links are reported, not followed)."""

    name: str
    kind: Kind
    size: int
    mtime: float


@dataclass
class Scan:
    """What a bounded read found: the entries kept, how many names were read, and whether
    reading stopped early (`cut`: more entries may exist than were looked at or kept)."""

    entries: list[Entry] = field(default_factory=list)
    scanned: int = 0
    cut: bool = False


def entry(name: str, info: os.stat_result) -> Entry:
    mode = info.st_mode
    kind: Kind
    if st.S_ISREG(mode):
        kind = "file"
    elif st.S_ISDIR(mode):
        kind = "dir"
    elif st.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    return Entry(name, kind, info.st_size, info.st_mtime)


def _kind(item: os.DirEntry[str]) -> Kind:
    # from the directory's own d_type where the file system gives it; else an lstat through
    # the folder's descriptor (follow_symlinks=False): never a link's target
    if item.is_symlink():
        return "symlink"
    if item.is_dir(follow_symlinks=False):
        return "dir"
    if item.is_file(follow_symlinks=False):
        return "file"
    return "other"


def scan_dir(dirfd: int, keep: Callable[[str, Kind], bool], limit: int, max_scan: int) -> Scan:
    """The entries of the folder open at `dirfd` (read, not O_PATH) for which `keep(name, kind)`,
    in directory order, each stat'ed without following links; at most `limit` kept, after
    reading at most `max_scan` names. Entries removed while we read are skipped."""
    out = Scan()
    with os.scandir(dirfd) as items:
        for item in items:
            if out.scanned >= max_scan or len(out.entries) >= limit:
                out.cut = True
                break
            out.scanned += 1
            name = item.name
            if not keep(name, _kind(item)):
                continue
            try:
                info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.entries.append(entry(name, info))
    return out


def walk_files(rootfd: int, keep: Callable[[str], bool], limit: int, max_scan: int) -> Scan:
    """Regular files below the folder open at `rootfd` whose name passes `keep`, as paths
    relative to it ('a/b.ipynb'); folders and files whose names start with '.' are skipped, links
    are never followed. Depth first, at most MAX_DEPTH levels; stops after `limit` files or
    `max_scan` names read in all. Entries carry no size or time (nothing is stat'ed but what
    the directory's d_type cannot tell)."""
    out = Scan()
    # (descriptor, relative path, its open scandir iterator): only the current path is open
    stack: list[tuple[int, str, _ScandirIterator[str]]] = []

    def enter(fd: int, rel: str) -> None:
        try:
            stack.append((fd, rel, os.scandir(fd)))
        except BaseException:
            os.close(fd)
            raise

    enter(os.dup(rootfd), "")
    try:
        while stack:
            fd, rel, items = stack[-1]
            item = next(items, None)
            if item is None:
                _leave(stack.pop())
                continue
            if out.scanned >= max_scan or len(out.entries) >= limit:
                out.cut = True
                break
            out.scanned += 1
            name = item.name
            if name.startswith("."):
                continue  # .ipynb_checkpoints, .ipython, .local: not the user's notebooks
            path = f"{rel}/{name}" if rel else name
            kind = _kind(item)
            if kind == "file" and keep(name):
                out.entries.append(Entry(path, "file", 0, 0.0))
            elif kind == "dir" and len(stack) < MAX_DEPTH:
                try:
                    enter(os.open(name, READ_DIR, dir_fd=fd), path)
                except OSError:
                    continue  # gone, swapped for a link, or unreadable: skipped
    finally:
        while stack:
            _leave(stack.pop())
    return out


@dataclass(frozen=True)
class Usage:
    """What a bounded count of a tree's disk use found: bytes allocated, names read, and whether
    it stopped before the end (`cut`: the bytes are then a lower bound)."""

    bytes: int
    scanned: int
    cut: bool


def disk_usage(rootfd: int, max_scan: int) -> Usage:
    """Bytes allocated (st_blocks, as du counts: a sparse file counts what it holds) by every
    entry below the folder open at `rootfd`, hidden ones included, links counted as themselves and
    never followed; at most MAX_DEPTH levels and `max_scan` names, each stat'ed once."""
    total, scanned, cut = 0, 0, False
    stack: list[tuple[int, _ScandirIterator[str]]] = []

    def enter(fd: int) -> None:
        try:
            stack.append((fd, os.scandir(fd)))
        except BaseException:
            os.close(fd)
            raise

    enter(os.dup(rootfd))
    try:
        while stack:
            fd, items = stack[-1]
            item = next(items, None)
            if item is None:
                stack.pop()[1].close()
                os.close(fd)
                continue
            if scanned >= max_scan:
                cut = True
                break
            scanned += 1
            try:
                info = os.stat(item.name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue  # removed while we read
            total += info.st_blocks * 512
            if st.S_ISDIR(info.st_mode):
                if len(stack) >= MAX_DEPTH:
                    cut = True
                    continue
                try:
                    enter(os.open(item.name, READ_DIR, dir_fd=fd))
                except OSError:
                    continue  # gone, swapped for a link, or unreadable
    finally:
        while stack:
            fd, items = stack.pop()
            items.close()
            os.close(fd)
    return Usage(total, scanned, cut)


def _leave(level: tuple[int, str, _ScandirIterator[str]]) -> None:
    fd, _, items = level
    items.close()
    os.close(fd)
