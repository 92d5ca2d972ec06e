"""The few exceptions kernelpool raises; each carries its fields and a message meant for the caller.

They are mapped to MCP tool errors in one place (the tool wrapper, `kernelpool.mcp.server._run`),
and to CLI messages in `cli`. Sandbox path errors become `PathRefused` in one place too
(`kernelpool.notebooks.paths.refusing`).
"""

from __future__ import annotations


class KernelpoolError(Exception):
    """Base class: `str(exc)` is the message shown to the client."""


class InvalidArgument(KernelpoolError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"invalid {name}: {reason}")
        self.name = name
        self.reason = reason


class NoNotebook(KernelpoolError):
    def __init__(self) -> None:
        super().__init__(
            "no notebook given: pass `notebook` (a path relative to your folder, e.g. 'analysis.ipynb'), "
            "or call use_notebook first (that works only for clients with an MCP session)"
        )


class NotebookNotFound(KernelpoolError):
    def __init__(self, path: str) -> None:
        super().__init__(f"notebook not found: {path!r} (use_notebook with mode='create' creates it)")
        self.path = path


class NotebookExists(KernelpoolError):
    def __init__(self, path: str) -> None:
        super().__init__(f"notebook already exists: {path!r} (use mode='connect')")
        self.path = path


class CorruptNotebook(KernelpoolError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path!r} is not a valid notebook ({reason}); it was left untouched")
        self.path = path
        self.reason = reason


class CellNotFound(KernelpoolError):
    def __init__(self, path: str, ref: str, count: int) -> None:
        super().__init__(f"no cell {ref} in {path!r} (it has {count} cells)")
        self.path = path
        self.ref = ref


class PathRefused(KernelpoolError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"path refused: {path!r}: {reason}")
        self.path = path
        self.reason = reason


class UserNotFound(KernelpoolError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no such user: {name!r}")
        self.name = name


class UserExists(KernelpoolError):
    def __init__(self, name: str) -> None:
        super().__init__(f"user already exists: {name!r}")
        self.name = name


class RemovalFailed(KernelpoolError):
    """`users remove` stopped at `step`; what was done and what to do next are in the message."""

    def __init__(self, name: str, step: str, reason: str, state: str, advice: str) -> None:
        super().__init__(f"could not remove user {name!r} ({step}: {reason}). {state} {advice}")
        self.name = name
        self.step = step
        self.reason = reason


class KernelFailed(KernelpoolError):
    """A kernel could not be started, or died; `cause` says why in words."""

    def __init__(self, notebook: str, cause: str) -> None:
        super().__init__(f"kernel for {notebook!r}: {cause}")
        self.notebook = notebook
        self.cause = cause


class LimitReached(KernelpoolError):
    """A per-user or server-wide cap: the message names it, its value, and what to do."""

    def __init__(self, what: str, limit: int, advice: str = "shut a kernel down with unuse_notebook first") -> None:
        super().__init__(f"{what} limit reached ({limit}); {advice}")
        self.what = what
        self.limit = limit


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class DiskLow(KernelpoolError):
    def __init__(self, what: str, free: int, floor: int) -> None:
        super().__init__(
            f"refused to {what}: the server's data folder has {fmt_bytes(free)} free, under its floor of "
            f"{fmt_bytes(floor)} (disk_free_floor); nothing was changed. Delete files you no longer need, "
            "or ask the administrator for space")
        self.what = what
        self.free = free
        self.floor = floor


class ResultExpired(KernelpoolError):
    def __init__(self, execution_id: str, reason: str) -> None:
        super().__init__(f"execution {execution_id!r} expired: {reason}")
        self.execution_id = execution_id
        self.reason = reason


class SandboxUnavailable(KernelpoolError):
    pass


class DataFromNewerVersion(KernelpoolError):
    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(
            f"the data folder's database {path} was written by a newer kernelpool (schema version {found}; "
            f"this kernelpool knows versions up to {supported}). Run that newer kernelpool on it; this one "
            "refuses, and has changed nothing in the folder"
        )
        self.path = path
        self.found = found
        self.supported = supported


class NoSpace(KernelpoolError):
    def __init__(self, path: str) -> None:
        super().__init__(f"could not write {path!r}: no space left on the server's disk; the file was left as it "
                         "was. Delete files you no longer need, or ask the administrator for space")
        self.path = path
