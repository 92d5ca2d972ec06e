"""The server's own folders: made with the right owner and mode, and deleted whole.

`prepare_dir` makes the data folders and each user's folders; `remove_tree` deletes a user's
folder or a kernel's runtime folder without following a link the user planted. Callers:
kernelpool's user service and kernel registry, and `sandbox.rundir`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as st

from sandbox.errors import InvalidPath, SandboxError

_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def prepare_dir(path: str, uid: int | None, gid: int | None, *, mode: int = 0o700) -> None:
    """Create the folder `path` (missing parents as root-owned 0755), then set its owner and mode.

    Refuses (InvalidPath) if `path` itself is a symbolic link. Parents are the server's own
    configuration and may be links. Called by kernelpool for the data folders and for each
    user's folder and runtime folder.
    """
    path = os.path.abspath(path)
    missing = []
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o755)
            os.chmod(folder, 0o755)  # noqa: S103 (users' uids pass folders above their own: DataDirUnreachable)
        except FileExistsError:
            pass
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    try:
        fd = os.open(path, _READ_DIR)
    except OSError as exc:
        if os.path.islink(path):
            raise InvalidPath(path, "is a symbolic link; refusing to use it as a folder") from None
        if exc.errno == errno.ENOTDIR:
            raise InvalidPath(path, "exists and is not a folder") from None
        raise
    try:
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        os.fchmod(fd, mode)
    except OSError as exc:
        raise SandboxError(f"cannot set owner/mode of {path}: {exc.strerror}", path=path) from exc
    finally:
        os.close(fd)


def remove_tree(parent: str, name: str) -> bool:
    """Delete `parent/name` and everything below it; False if it did not exist.

    `parent` is the server's own folder (e.g. DATA/users); `name` one component. The walk goes
    from directory descriptors, one level at a time, with no recursion and one descriptor open
    at a time, so a tree of any depth goes; a link is removed, never followed. A folder moved
    while we walk (the user's processes must be stopped first; this is the backstop) or one on
    another file system below `name` (a mount point) stops the walk with SandboxError, naming
    the path. When `name` itself is a mount point (a volume per user), it is emptied and left.
    """
    if "/" in name or name in ("", ".", ".."):
        raise InvalidPath(name, "must be a single path component")
    top = os.open(parent, _READ_DIR)
    try:
        try:
            info = os.stat(name, dir_fd=top, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not st.S_ISDIR(info.st_mode):
            os.unlink(name, dir_fd=top)
            return True
        _remove_below(top, name, os.path.join(parent, name))
        if info.st_dev == os.fstat(top).st_dev:
            os.rmdir(name, dir_fd=top)
        return True
    finally:
        os.close(top)


def _remove_below(top: int, name: str, shown: str) -> None:
    """Empty the folder `name` in `top`. `shown` names it in errors."""
    fd = _open_child_dir(top, name, shown, None)
    device = os.fstat(fd).st_dev
    # the way back up: (name, dev, ino) of each folder we are inside, below `top`
    trail: list[tuple[str, int, int]] = [(name, device, os.fstat(fd).st_ino)]
    try:
        while True:
            child = _empty_or_first_subdir(fd, shown)
            if child is not None:
                next_fd = _open_child_dir(fd, child, shown, device)
                info = os.fstat(next_fd)
                os.close(fd)
                fd = next_fd
                trail.append((child, info.st_dev, info.st_ino))
                continue
            # `fd` is empty now: climb to its parent and remove it there
            done, _, _ = trail.pop()
            if not trail:
                return
            up = os.open("..", _READ_DIR, dir_fd=fd)
            info = os.fstat(up)
            if (info.st_dev, info.st_ino) != trail[-1][1:]:
                os.close(up)
                raise SandboxError(f"{shown}: a folder was moved while it was being deleted; stop the "
                                   "user's processes and try again", path=shown)
            os.close(fd)
            fd = up
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)


def _open_child_dir(dirfd: int, name: str, shown: str, device: int | None) -> int:
    try:
        fd = os.open(name, _READ_DIR, dir_fd=dirfd)
    except OSError as exc:
        raise SandboxError(f"{shown}: cannot open {name!r} to delete it: {exc.strerror}", path=shown) from None
    if device is not None and os.fstat(fd).st_dev != device:
        os.close(fd)
        raise SandboxError(f"{shown}: {name!r} is on another file system (a mount point); unmount it first",
                           path=shown)
    return fd


def _empty_or_first_subdir(fd: int, shown: str) -> str | None:
    """Unlink every non-folder in `fd`; return a subfolder's name, or None once it is empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SandboxError(f"{shown}: cannot delete {entry.name!r}: {exc.strerror}", path=shown) from None
    return None
