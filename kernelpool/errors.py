"""The few exceptions kernelpool raises; each carries its fields and a message meant for the caller.

They are mapped to MCP tool errors in one place (the tool wrapper, `kernelpool.mcp.server._run`),
and to CLI messages in `cli`. Sandbox path errors become `PathRefused` in one place too
(`kernelpool.notebooks.paths.refusing`).

Each class has its own typed constructor, so that mypy checks every `raise` against it; the
fields stay on the exception as attributes, and `str(exc)` is the message.
"""

from __future__ import annotations

from collections.abc import Sequence


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _sized(n: int) -> str:
    return f"{fmt_bytes(n)} ({n} bytes)"


class KernelpoolError(Exception):
    """Base class: `str(exc)` is the message shown to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class InvalidArgument(KernelpoolError):
    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"invalid {name}: {reason}")


class UnknownArguments(KernelpoolError):
    """A tool call with arguments the tool does not take (a misspelling, or one from another server)."""

    def __init__(self, tool: str, unknown: Sequence[str], known: Sequence[str]) -> None:
        self.tool = tool
        self.unknown = list(unknown)
        self.known = list(known)
        quoted = [repr(n) for n in self.unknown]
        names = f"the argument {quoted[0]}" if len(quoted) == 1 else "the arguments " + ", ".join(quoted)
        super().__init__(f"{tool} does not take {names}; nothing was done. {tool} takes: "
                         + (", ".join(self.known) or "no arguments"))


class NoNotebook(KernelpoolError):
    def __init__(self) -> None:
        super().__init__("no notebook given: pass `notebook` (a path relative to your folder, e.g. 'analysis.ipynb'), "
                         "or call use_notebook first (that works only for clients with an MCP session)")


class NotebookError(KernelpoolError):
    """About one notebook file, named by the client's path."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


class NotebookNotFound(NotebookError):
    def __init__(self, path: str) -> None:
        super().__init__(path, f"notebook not found: {path!r} (use_notebook with mode='create' creates it)")


class NotebookExists(NotebookError):
    """`use_notebook(mode="create")` of a notebook that is there already."""

    def __init__(self, path: str) -> None:
        super().__init__(path, f"notebook already exists: {path!r} (use mode='connect')")


class NoSpace(NotebookError):
    def __init__(self, path: str) -> None:
        super().__init__(path, f"could not write {path!r}: no space left on the server's disk; the file was left "
                               "as it was. Delete files you no longer need, or ask the administrator for space")


class RefusedPath(KernelpoolError):
    """A path or a file the server will not use, and why."""

    def __init__(self, path: str, reason: str, message: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(message)


class CorruptNotebook(RefusedPath):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason, f"{path!r} is not a valid notebook ({reason}); it was left untouched")


class PathRefused(RefusedPath):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason, f"path refused: {path!r}: {reason}")


class NotebookTooLarge(KernelpoolError):
    """A notebook file over `max_notebook_bytes`, seen before reading it (`size`) or while reading
    it (`grew`)."""

    def __init__(self, path: str, size: int, limit: int, *, grew: bool = False) -> None:
        self.path = path
        self.size = size
        self.limit = limit
        self.grew = grew
        said = "it grew past" if grew else f"it has {_sized(size)}, over"
        super().__init__(
            f"notebook {path!r} is too large to open: {said} the limit of {_sized(limit)} (max_notebook_bytes); "
            "it was not read. Make it smaller with code run in a kernel (clear large outputs, or split it into "
            "several notebooks), or ask the administrator to raise max_notebook_bytes")


class NotebookTooComplex(KernelpoolError):
    """A notebook under the size cap whose parse would hold more memory than the server allows one read."""

    def __init__(self, path: str, size: int, cost: int, limit: int) -> None:
        self.path = path
        self.size = size
        self.cost = cost
        self.limit = limit
        super().__init__(
            f"notebook {path!r} ({fmt_bytes(size)}) is too costly to open: parsing it would hold about "
            f"{fmt_bytes(cost)} of server memory, over the limit of {fmt_bytes(limit)} (4 x max_notebook_bytes). "
            "It holds millions of small JSON values (tiny cells, long lists in outputs or metadata) or much text "
            "beyond ASCII. Make it smaller with code run in a kernel (clear outputs or metadata, or split it), "
            "or ask the administrator to raise max_notebook_bytes")


class CellNotFound(KernelpoolError):
    def __init__(self, path: str, ref: str, count: int) -> None:
        self.path = path
        self.ref = ref
        self.count = count
        super().__init__(f"no cell {ref} in {path!r} (it has {count} cells)")


class UserError(KernelpoolError):
    """About one user, by name: raised by `users.accounts` for the CLI's `users` commands and for
    the server's look-ups of who a token names."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class UserNotFound(UserError):
    def __init__(self, name: str) -> None:
        super().__init__(name, f"no such user: {name!r}")


class UserExists(UserError):
    def __init__(self, name: str) -> None:
        super().__init__(name, f"user already exists: {name!r}")


class NoUidLeft(KernelpoolError):
    """`users add` found no uid to give: a uid is never given twice (`kernelpool.store.Store.add_user`)."""

    def __init__(self, low: int, high: int, highest: int, removed: int) -> None:
        self.low = low
        self.high = high
        self.highest = highest
        self.removed = removed
        super().__init__(
            f"no uid left to give in {low}-{high} (uid_min-uid_max): a uid is never given twice, every one up to "
            f"{highest} was given already ({removed} of them to users removed since), and the host's own accounts "
            f"hold the rest. Nothing was added. Raise uid_max, or set a range above {highest}")


class RemovalFailed(KernelpoolError):
    """`users remove` stopped at `step`; what was done and what to do next are in the message."""

    def __init__(self, name: str, step: str, reason: str, state: str, advice: str) -> None:
        self.name = name
        self.step = step
        self.reason = reason
        self.state = state
        self.advice = advice
        super().__init__(f"could not remove user {name!r} ({step}: {reason}). {state} {advice}")


class KernelFailed(KernelpoolError):
    """A kernel could not be started, or died; `cause` says why in words."""

    def __init__(self, path: str, cause: str) -> None:
        self.path = path
        self.cause = cause
        super().__init__(f"kernel for {path!r}: {cause}")


class LimitReached(KernelpoolError):
    """A per-user or server-wide cap: the message names it, its value, and what to do."""

    def __init__(self, what: str, limit: int | str,
                 advice: str = "shut a kernel down with unuse_notebook first") -> None:
        self.what = what
        self.limit = limit
        self.advice = advice
        super().__init__(f"{what} limit reached ({limit}); {advice}")


class DiskLow(KernelpoolError):
    def __init__(self, what: str, free: int, floor: int) -> None:
        self.what = what
        self.free = free
        self.floor = floor
        super().__init__(
            f"refused to {what}: the server's data folder has {fmt_bytes(free)} free, under its floor of "
            f"{fmt_bytes(floor)} (disk_free_floor); nothing was changed. Delete files you no longer need, or ask "
            "the administrator for space")


class ResultExpired(KernelpoolError):
    def __init__(self, execution_id: str, reason: str) -> None:
        self.execution_id = execution_id
        self.reason = reason
        super().__init__(f"execution {execution_id!r} expired: {reason}")


class SandboxUnavailable(KernelpoolError):
    """The host cannot isolate kernels as configured; the message names what it lacks."""


class DataDirUnreachable(KernelpoolError):
    """Kernels (users' uids) could not pass a folder above the data folder: the server refuses to start."""

    def __init__(self, path: str, blocked: str, fix: str) -> None:
        self.path = path
        self.blocked = blocked  # the folder on the way, and why: "/root is mode drwx------"
        self.fix = fix
        super().__init__(
            "users' kernels run as the users' own uids and could not reach their folders in the data folder "
            f"{path}: {blocked}, which other uids may not pass. Nothing was changed. {fix}")


class EarlierDataDir(KernelpoolError):
    """The default data folder is empty while an earlier version's default folder holds data: the
    server (and the CLI) refuse rather than start an empty server beside it."""

    def __init__(self, old: str, new: str, fix: str) -> None:
        self.old = old
        self.new = new
        self.fix = fix
        super().__init__(
            f"the data folder is {new} (the default as root), which holds no data yet; {old} holds the data of "
            "an earlier kernelpool (which kept it in ./kernelpool-data, below the folder it was started in). "
            f"Nothing was changed. {fix}")


class DataFromNewerVersion(KernelpoolError):
    def __init__(self, path: str, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"the data folder's database {path} was written by a newer kernelpool (schema version {found}; "
            f"this kernelpool knows versions up to {supported}). Run that newer kernelpool on it; this one "
            "refuses, and has changed nothing in the folder")


class QuotaReached(KernelpoolError):
    """A write that would take the user's folder past user_disk_quota; nothing was written."""

    def __init__(self, path: str, limit: int, used: int, adding: int) -> None:
        self.path = path
        self.limit = limit
        self.used = used
        self.adding = adding
        adding_text = f" and this would add {fmt_bytes(adding)}" if adding > 0 else ""
        super().__init__(
            f"disk quota of {fmt_bytes(limit)} reached: your folder takes {fmt_bytes(used)}{adding_text}, so {path!r} "
            "was not written and nothing changed. Delete files you no longer need (delete_file, or in a kernel), or "
            "ask the administrator to raise user_disk_quota")


class FileTooLargeForCall(KernelpoolError):
    """More bytes than max_file_bytes in one read_file or write_file call."""

    def __init__(self, path: str, size: int, limit: int) -> None:
        self.path = path
        self.size = size
        self.limit = limit
        super().__init__(
            f"{path!r}: {fmt_bytes(size)} is more than one call may write (max_file_bytes, {fmt_bytes(limit)}); "
            "nothing was written. Send it in pieces: the first with mode='create' or 'overwrite', the rest with "
            "mode='append'")


class KernelNotAllowed(KernelpoolError):
    """A kernel (asked for, or recorded in a notebook) that this server does not offer."""

    def __init__(self, name: str, offered: str) -> None:
        self.name = name
        self.offered = offered
        super().__init__(f"kernel {name!r} is not offered by this server; it offers: {offered} (list_kernelspecs)")
