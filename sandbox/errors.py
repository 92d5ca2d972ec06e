"""The sandbox's exceptions: one base class, a few subclasses that carry the facts.

Callers (kernelpool's services) catch `SandboxError` and map it to one protocol error at the
edge; the subclasses exist so that a message can name what was refused and why without the
caller parsing strings.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every error the sandbox raises on purpose.

    `path` is the file, cgroup directory or account the error is about, when there is one.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


class AccountError(SandboxError):
    """A passwd/group entry could not be created or removed, or conflicts with the one asked for."""


class CgroupError(SandboxError):
    """A cgroup could not be created, configured, joined or removed."""


class NetworkError(SandboxError):
    """A user's network namespace (or the server's firewall table) could not be made or removed."""


class LaunchError(SandboxError):
    """The child failed while sandboxing itself, before exec: the command never ran.

    `step` names the step that failed (e.g. "chdir", "setuid", "join cgroup").
    """

    def __init__(self, message: str, *, step: str | None = None, path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.step = step


class PathError(SandboxError):
    """A path given to `SafeRoot` was refused. `path` is the relative path as given."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path!r}: {reason}", path=path)
        self.reason = reason


class PathOutsideRoot(PathError):
    """The path is absolute or climbs out with '..'."""

    def __init__(self, path: str, reason: str = "path leads outside the user's folder") -> None:
        super().__init__(path, reason)


class InvalidPath(PathError):
    """The path is malformed (NUL, empty component) or crosses a symbolic link."""


class FileTooLarge(SandboxError):
    """`SafeRoot.read_bytes` found a file larger than the caller's `max_bytes`."""

    def __init__(self, path: str, size: int, limit: int, *, grew: bool = False) -> None:
        said = "grew past" if grew else "is larger than"
        super().__init__(f"{path!r}: file {said} {limit} bytes", path=path)
        self.size = size  # what fstat said; when `grew`, the bytes read before stopping
        self.limit = limit
        self.grew = grew
