"""What `list_files` and `list_notebooks` show of a user's folder: bounded, and saying when cut.

A user's kernel can put millions of files in a folder. A listing reads the folder as a stream
(`sandbox.fs.SafeRoot.scan` / `walk`), keeps at most a page of entries, stats only those, and
reads at most `SCAN_LIMIT` names per call; when it stops early, its `note` says so and how to
narrow the listing. Runs in a file-work thread (`kernelpool.notebooks.filework`).
Callers: `kernelpool.notebooks.service.NotebookService`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from kernelpool.errors import PathRefused
from kernelpool.notebooks.paths import check_dir_path, refusing
from sandbox import SafeRoot
from sandbox.errors import SandboxError
from sandbox.scan import Kind

LIST_LIMIT = 500  # entries list_files returns
NOTEBOOK_LIMIT = 10000  # notebooks list_notebooks returns
SCAN_LIMIT = 20_000  # names one listing reads, at most: a folder larger than this is not read to its end


@dataclass(frozen=True)
class Listing:
    items: list[Any]
    note: str | None = None  # set when the listing was cut: where, and how to narrow it


def files(root: SafeRoot, path: str, pattern: str | None, *, limit: int = LIST_LIMIT,
          max_scan: int = SCAN_LIMIT) -> Listing:
    """Entries of one folder (as `list_files` returns them), sorted by name."""
    folder = check_dir_path(path)
    match = re.compile(fnmatch.translate(pattern)).match if pattern else None

    def keep(name: str, kind: Kind) -> bool:
        return match is None or match(name) is not None

    try:
        with refusing(path):
            found = root.scan(folder, keep, limit, max_scan)
    except FileNotFoundError:
        raise PathRefused(path, "no such folder") from None
    except NotADirectoryError:
        raise PathRefused(path, "not a folder") from None
    items = [{"path": f"{folder}/{e.name}" if folder else e.name, "type": e.kind, "size": e.size, "modified": e.mtime}
             for e in sorted(found.entries, key=lambda e: e.name)]
    note = None
    where = f"folder {folder!r}" if folder else "your folder"
    if found.cut and len(items) >= limit:
        note = (f"listing cut at {limit} entries: {where} has more{' matching ' + repr(pattern) if pattern else ''}, "
                f"and these are the first found, not the first by name. Pass a pattern (e.g. '*.csv') or a "
                "subfolder as path to narrow it")
    elif found.cut:
        note = (f"listing cut after reading {found.scanned} names of {where} without reaching its end: "
                f"entries further on are not shown. Use a subfolder with fewer entries"
                f"{', or a pattern that matches earlier names' if pattern else ''}")
    return Listing(items, note)


def notebooks(root: SafeRoot, *, limit: int = NOTEBOOK_LIMIT, max_scan: int = SCAN_LIMIT) -> Listing:
    """The user's notebooks anywhere in their folder (hidden folders skipped), sorted by path."""
    def keep(name: str) -> bool:
        return name.endswith(".ipynb")

    try:
        found = root.walk(keep, limit, max_scan)
    except (OSError, SandboxError):
        return Listing([])  # no folder (yet), or one that cannot be read: no notebooks
    items = sorted(e.name for e in found.entries)
    note = None
    if found.cut:
        said = f"{limit} notebooks found" if len(items) >= limit else f"{found.scanned} names read"
        note = (f"list cut after {said} without reaching the end of your folder: notebooks further on are not "
                "listed (they still open by path). Keep notebooks apart from folders of many files")
    return Listing(items, note)
