"""The few exceptions kernelpool raises; each carries its fields and a message meant for the caller.

They are mapped to MCP tool errors in one place (the tool wrapper, `kernelpool.mcp.server._run`),
and to CLI messages in `cli`. Sandbox path errors become `PathRefused` in one place too
(`kernelpool.notebooks.paths.refusing`).
"""

from __future__ import annotations

from typing import Any, ClassVar


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class KernelpoolError(Exception):
    """Base class: `str(exc)` is the message shown to the client.

    A subclass names its constructor's arguments in `fields` (in order; `defaults` for the ones
    that may be left out) and words its message in `template`, formatted with them. The
    arguments stay on the exception as attributes.
    """

    fields: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    template: ClassVar[str] = ""

    def __init__(self, *values: Any) -> None:
        if not self.fields:  # a fixed template (NoNotebook), or a message given whole (SandboxUnavailable)
            super().__init__(*(values or (self.template,)))
            return
        if len(values) > len(self.fields):
            raise TypeError(f"{type(self).__name__} takes {self.fields}, got {len(values)} values")
        named = self.defaults | dict(zip(self.fields, values, strict=False))
        missing = [f for f in self.fields if f not in named]
        if missing:
            raise TypeError(f"{type(self).__name__} needs {missing}")
        self.__dict__.update(named)
        super().__init__(self.template.format(**named, **self.formatted(named)))

    @staticmethod
    def formatted(named: dict[str, Any]) -> dict[str, Any]:
        """Extra values for the template, computed from the fields."""
        return {}


class InvalidArgument(KernelpoolError):
    fields = ("name", "reason")
    template = "invalid {name}: {reason}"


class UnknownArguments(KernelpoolError):
    """A tool call with arguments the tool does not take (a misspelling, or one from another server)."""

    fields = ("tool", "unknown", "known")
    template = "{tool} does not take {names}; nothing was done. {tool} takes: {takes}"

    @staticmethod
    def formatted(named: dict[str, Any]) -> dict[str, Any]:
        unknown = [repr(n) for n in named["unknown"]]
        names = f"the argument {unknown[0]}" if len(unknown) == 1 else "the arguments " + ", ".join(unknown)
        return {"names": names, "takes": ", ".join(named["known"]) or "no arguments"}


class NoNotebook(KernelpoolError):
    template = ("no notebook given: pass `notebook` (a path relative to your folder, e.g. 'analysis.ipynb'), "
                "or call use_notebook first (that works only for clients with an MCP session)")


class NotebookError(KernelpoolError):
    """About one notebook file, named by the client's path."""

    fields = ("path",)


class NotebookNotFound(NotebookError):
    template = "notebook not found: {path!r} (use_notebook with mode='create' creates it)"


class NotebookExists(NotebookError):
    """`use_notebook(mode="create")` of a notebook that is there already."""

    template = "notebook already exists: {path!r} (use mode='connect')"


class RefusedPath(KernelpoolError):
    """A path or a file the server will not use, and why."""

    fields = ("path", "reason")


class CorruptNotebook(RefusedPath):
    template = "{path!r} is not a valid notebook ({reason}); it was left untouched"


class PathRefused(RefusedPath):
    template = "path refused: {path!r}: {reason}"


class NotebookTooLarge(KernelpoolError):
    """A notebook file over `max_notebook_bytes`, seen before reading it or while reading it."""

    fields = ("path", "size", "limit", "grew")
    defaults = {"grew": False}
    template = ("notebook {path!r} is too large to open: {said} the limit of {limit_text} (max_notebook_bytes); "
                "it was not read. Make it smaller with code run in a kernel (clear large outputs, or split it into "
                "several notebooks), or ask the administrator to raise max_notebook_bytes")

    @staticmethod
    def formatted(named: dict[str, Any]) -> dict[str, Any]:
        said = ("it grew past" if named["grew"] else
                f"it has {fmt_bytes(named['size'])} ({named['size']} bytes), over")
        return {"said": said, "limit_text": f"{fmt_bytes(named['limit'])} ({named['limit']} bytes)"}


class NotebookTooComplex(KernelpoolError):
    """A notebook under the size cap whose parse would hold more memory than the server allows one read."""

    fields = ("path", "size", "cost", "limit")
    template = ("notebook {path!r} ({size_text}) is too costly to open: parsing it would hold about {cost_text} of "
                "server memory, over the limit of {limit_text} (4 x max_notebook_bytes). It holds millions of small "
                "JSON values (tiny cells, long lists in outputs or metadata) or much text beyond ASCII. Make it "
                "smaller with code run in a kernel (clear outputs or metadata, or split it), or ask the "
                "administrator to raise max_notebook_bytes")

    @staticmethod
    def formatted(named: dict[str, Any]) -> dict[str, Any]:
        return {"size_text": fmt_bytes(named["size"]), "cost_text": fmt_bytes(named["cost"]),
                "limit_text": fmt_bytes(named["limit"])}


class CellNotFound(KernelpoolError):
    fields = ("path", "ref", "count")
    template = "no cell {ref} in {path!r} (it has {count} cells)"


class UserError(KernelpoolError):
    """About one user, by name: raised by `users.accounts` for the CLI's `users` commands and for
    the server's look-ups of who a token names."""

    fields = ("name",)


class UserNotFound(UserError):
    template = "no such user: {name!r}"


class UserExists(UserError):
    template = "user already exists: {name!r}"


class NoUidLeft(KernelpoolError):
    """`users add` found no uid to give: a uid is never given twice (`kernelpool.store.Store.add_user`)."""

    fields = ("low", "high", "highest", "removed")
    template = ("no uid left to give in {low}-{high} (uid_min-uid_max): a uid is never given twice, every one up to "
                "{highest} was given already ({removed} of them to users removed since), and the host's own accounts "
                "hold the rest. Nothing was added. Raise uid_max, or set a range above {highest}")


class RemovalFailed(KernelpoolError):
    """`users remove` stopped at `step`; what was done and what to do next are in the message."""

    fields = ("name", "step", "reason", "state", "advice")
    template = "could not remove user {name!r} ({step}: {reason}). {state} {advice}"


class KernelFailed(KernelpoolError):
    """A kernel could not be started, or died; `cause` says why in words."""

    fields = ("notebook", "cause")
    template = "kernel for {notebook!r}: {cause}"


class LimitReached(KernelpoolError):
    """A per-user or server-wide cap: the message names it, its value, and what to do."""

    fields = ("what", "limit", "advice")
    defaults = {"advice": "shut a kernel down with unuse_notebook first"}
    template = "{what} limit reached ({limit}); {advice}"


class DiskLow(KernelpoolError):
    fields = ("what", "free", "floor")
    template = ("refused to {what}: the server's data folder has {free_text} free, under its floor of {floor_text} "
                "(disk_free_floor); nothing was changed. Delete files you no longer need, or ask the administrator "
                "for space")

    @staticmethod
    def formatted(named: dict[str, Any]) -> dict[str, Any]:
        return {"free_text": fmt_bytes(named["free"]), "floor_text": fmt_bytes(named["floor"])}


class ResultExpired(KernelpoolError):
    fields = ("execution_id", "reason")
    template = "execution {execution_id!r} expired: {reason}"


class SandboxUnavailable(KernelpoolError):
    pass


class DataDirUnreachable(KernelpoolError):
    """Kernels (users' uids) could not pass a folder above the data folder: the server refuses to start."""

    fields = ("path", "blocked", "fix")
    path: str
    blocked: str  # the folder on the way, and why: "/root is mode drwx------"
    fix: str
    template = ("users' kernels run as the users' own uids and could not reach their folders in the data folder "
                "{path}: {blocked}, which other uids may not pass. Nothing was changed. {fix}")


class EarlierDataDir(KernelpoolError):
    """The default data folder is empty while an earlier version's default folder holds data: the
    server (and the CLI) refuse rather than start an empty server beside it."""

    fields = ("old", "new", "fix")
    template = ("the data folder is {new} (the default as root), which holds no data yet; {old} holds the data of "
                "an earlier kernelpool (which kept it in ./kernelpool-data, below the folder it was started in). "
                "Nothing was changed. {fix}")


class DataFromNewerVersion(KernelpoolError):
    fields = ("path", "found", "supported")
    template = ("the data folder's database {path} was written by a newer kernelpool (schema version {found}; "
                "this kernelpool knows versions up to {supported}). Run that newer kernelpool on it; this one "
                "refuses, and has changed nothing in the folder")


class NoSpace(NotebookError):
    template = ("could not write {path!r}: no space left on the server's disk; the file was left as it was. "
                "Delete files you no longer need, or ask the administrator for space")


class QuotaReached(KernelpoolError):
    """A write that would take the user's folder past user_disk_quota; nothing was written."""

    fields = ("path", "limit", "used", "adding")
    template = ("disk quota of {limit_text} reached: your folder takes {used_text}{adding_text}, so {path!r} was not "
                "written and nothing changed. Delete files you no longer need (delete_file, or in a kernel), or ask "
                "the administrator to raise user_disk_quota")

    @staticmethod
    def formatted(named: dict[str, Any]) -> dict[str, Any]:
        adding = named["adding"]
        return {"limit_text": fmt_bytes(named["limit"]), "used_text": fmt_bytes(named["used"]),
                "adding_text": f" and this would add {fmt_bytes(adding)}" if adding > 0 else ""}


class FileTooLargeForCall(KernelpoolError):
    """More bytes than max_file_bytes in one read_file or write_file call."""

    fields = ("path", "size", "limit")
    template = ("{path!r}: {size_text} is more than one call may write (max_file_bytes, {limit_text}); nothing was "
                "written. Send it in pieces: the first with mode='create' or 'overwrite', the rest with mode='append'")

    @staticmethod
    def formatted(named: dict[str, Any]) -> dict[str, Any]:
        return {"size_text": fmt_bytes(named["size"]), "limit_text": fmt_bytes(named["limit"])}


class KernelNotAllowed(KernelpoolError):
    """A kernel (asked for, or recorded in a notebook) that this server does not offer."""

    fields = ("name", "offered")
    template = "kernel {name!r} is not offered by this server; it offers: {offered} (list_kernelspecs)"
