"""The root server's file access inside one user's folder, immune to links planted by the user.

The user's kernel runs as the user and can create symbolic links, replace a folder by a link
between two of our calls, or hard-link files. The server runs as root. So every path is
walked one component at a time with openat(O_PATH | O_NOFOLLOW) from a descriptor of the
folder: no link is followed anywhere, and a swap between two steps can only make the call
fail, never redirect it. Callers: kernelpool's notebook and file services (`SafeRoot`). The
path rules are `sandbox.paths`'; the server's own folders are made and deleted by
`sandbox.folders` (both re-exported here).

Errors: `PathOutsideRoot` (absolute, '..'), `InvalidPath` (NUL, empty or '.' component,
a symbolic link on the way or at the end, not a regular file), `FileTooLarge`; and the
usual OSError subclasses with the relative path as `filename`: FileNotFoundError,
NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat as st
from collections.abc import Callable

from sandbox.errors import FileTooLarge, InvalidPath, PathError, PathOutsideRoot
from sandbox.folders import prepare_dir, remove_tree
from sandbox.paths import MAX_DEPTH, MAX_NAME_BYTES, normalize_path, split_path
from sandbox.scan import READ_DIR as _READ_DIR
from sandbox.scan import Entry, Kind, Scan, Usage, disk_usage, scan_dir, walk_files
from sandbox.scan import entry as _entry

__all__ = [
    "Entry", "Scan", "SafeRoot", "prepare_dir", "remove_tree", "normalize_path", "MAX_DEPTH", "MAX_NAME_BYTES",
    "PathError", "PathOutsideRoot", "InvalidPath", "FileTooLarge",
]

_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the user planted must not hang the server
_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_APPEND_FILE = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _oserror(code: int, relpath: str) -> OSError:
    # OSError(errno, ...) picks the matching subclass (FileNotFoundError, ...)
    return OSError(code, os.strerror(code), relpath)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class SafeRoot:
    """Link-proof file operations below `root`, as root, for one user.

    `uid`/`gid` own every file and folder created here (None: leave the creator's). Paths are
    relative and '/'-separated; see the module docstring for what is refused. Each call opens
    the root afresh, so a SafeRoot is cheap, stateless and thread-safe.
    """

    def __init__(self, root: str, uid: int | None = None, gid: int | None = None) -> None:
        self.root = os.path.abspath(root)
        self.uid = uid
        self.gid = gid

    def __repr__(self) -> str:
        return f"SafeRoot({self.root!r}, uid={self.uid}, gid={self.gid})"

    # -- walking ------------------------------------------------------------------------------

    def _open_root(self) -> int:
        try:
            return os.open(self.root, _WALK)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(self.root):
                raise InvalidPath("", f"the folder {self.root} is a symbolic link") from None
            raise

    def _step(self, dirfd: int, name: str, relpath: str) -> int:
        try:
            return os.open(name, _WALK, dir_fd=dirfd)
        except OSError as exc:
            raise self._why(exc, dirfd, name, relpath) from None

    def _why(self, exc: OSError, dirfd: int, name: str, relpath: str) -> Exception:
        """Turn an error on `name` into one that names `relpath` and says if a link was refused."""
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO):
            try:
                mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
                if st.S_ISLNK(mode):
                    return InvalidPath(relpath, f"{name!r} is a symbolic link; links are not followed")
                # open(2) of a socket, or of a FIFO for writing with no reader
                if exc.errno == errno.ENXIO and (st.S_ISSOCK(mode) or st.S_ISFIFO(mode)):
                    return InvalidPath(relpath, "not a regular file")
            except OSError:
                pass
        return _oserror(exc.errno or errno.EIO, relpath)

    def _open_dir(self, relpath: str, parts: list[str]) -> int:
        fd = self._open_root()
        try:
            for name in parts:
                next_fd = self._step(fd, name, relpath)
                os.close(fd)
                fd = next_fd
        except BaseException:
            _close(fd)
            raise
        return fd

    def _parent(self, relpath: str) -> tuple[int, str]:
        parts = split_path(relpath)
        return self._open_dir(relpath, parts[:-1]), parts[-1]

    def _chown(self, fd: int) -> None:
        if self.uid is not None or self.gid is not None:
            os.fchown(fd, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)

    @staticmethod
    def _fsync_dir(dirfd: int) -> None:
        fd = os.open(".", _READ_DIR, dir_fd=dirfd)  # an O_PATH descriptor cannot be fsync'ed
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- operations -----------------------------------------------------------------------------

    def _open_regular(self, relpath: str, flags: int) -> tuple[int, os.stat_result]:
        """A descriptor of the regular file at `relpath` opened with `flags` (which hold
        O_NOFOLLOW and O_NONBLOCK), and its fstat; the caller closes it."""
        dirfd, name = self._parent(relpath)
        try:
            try:
                fd = os.open(name, flags, dir_fd=dirfd)
            except OSError as exc:
                raise self._why(exc, dirfd, name, relpath) from None
        finally:
            os.close(dirfd)
        try:
            info = os.fstat(fd)
            if st.S_ISDIR(info.st_mode):
                raise _oserror(errno.EISDIR, relpath)
            if not st.S_ISREG(info.st_mode):
                raise InvalidPath(relpath, "not a regular file")
            # a hard link to someone else's file (e.g. /etc/shadow) looks like a plain file;
            # fs.protected_hardlinks normally stops users making one, this is the backstop
            if self.uid is not None and info.st_nlink > 1 and info.st_uid != self.uid:
                raise InvalidPath(relpath, "hard link to a file the user does not own")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, info

    def read_bytes(self, relpath: str, *, max_bytes: int | None = None) -> bytes:
        """Contents of a regular file; FileTooLarge if it exceeds `max_bytes`."""
        fd, info = self._open_regular(relpath, _READ_FILE)
        try:
            if max_bytes is not None and info.st_size > max_bytes:
                raise FileTooLarge(relpath, info.st_size, max_bytes)
            return _read_at_most(fd, relpath, info.st_size, max_bytes)
        finally:
            os.close(fd)

    def read_range(self, relpath: str, offset: int, max_bytes: int) -> tuple[bytes, int]:
        """At most `max_bytes` of a regular file from byte `offset` (fewer at its end), and the
        file's size when it was opened: a page of a file of any size, never the whole of it."""
        fd, info = self._open_regular(relpath, _READ_FILE)
        try:
            chunks, total = [], 0
            while total < max_bytes:
                chunk = os.pread(fd, max_bytes - total, offset + total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks), info.st_size
        finally:
            os.close(fd)

    def append_bytes(self, relpath: str, data: bytes) -> int:
        """Add `data` at the end of an existing regular file of the user's (one that uid owns,
        when uid is set: root must not append to a file planted there by someone else); its new size."""
        fd, info = self._open_regular(relpath, _APPEND_FILE)
        try:
            if self.uid is not None and info.st_uid != self.uid:
                raise InvalidPath(relpath, "not a file the user owns")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def write_bytes_atomic(self, relpath: str, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
        """Replace (or create) a file so that readers see the old or the new content, never a mix.

        The parent folder must exist. The new file belongs to uid/gid with `mode`. Only a regular
        file is replaced; with `exclusive`, nothing is (FileExistsError if anything is there, also
        when it appears while the data is written).
        """
        dirfd, name = self._parent(relpath)
        try:
            try:
                existing = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and st.S_ISLNK(existing.st_mode):
                raise InvalidPath(relpath, f"{name!r} is a symbolic link; refusing to replace it")
            if existing is not None and st.S_ISDIR(existing.st_mode):
                raise _oserror(errno.EISDIR, relpath)
            if existing is not None and exclusive:
                raise _oserror(errno.EEXIST, relpath)
            if existing is not None and not st.S_ISREG(existing.st_mode):
                raise InvalidPath(relpath, "not a regular file; refusing to replace it")
            tmp = f".{name[:180]}.{secrets.token_hex(6)}.kptmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
            try:
                try:
                    self._chown(fd)
                    os.fchmod(fd, mode)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if exclusive:  # link(2) fails if the name exists: no rename over a file made meanwhile
                    os.link(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
                    os.unlink(tmp, dir_fd=dirfd)
                else:
                    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dirfd)
                if isinstance(exc, FileExistsError):
                    raise _oserror(errno.EEXIST, relpath) from None
                raise
            self._fsync_dir(dirfd)
        finally:
            os.close(dirfd)

    def makedirs(self, relpath: str, *, mode: int = 0o700) -> None:
        """Create the folder and any missing parents (owned by uid/gid, `mode`); existing ones are fine."""
        parts = split_path(relpath, allow_root=True)
        fd = self._open_root()
        try:
            for name in parts:
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                    created = True
                except FileExistsError:
                    created = False
                except OSError as exc:
                    raise _oserror(exc.errno or errno.EIO, relpath) from None
                if created:
                    # chown through a descriptor of the new folder, not by name: the name
                    # could be swapped for a link in between
                    new = os.open(name, _READ_DIR, dir_fd=fd)
                    try:
                        self._chown(new)
                        os.fchmod(new, mode)  # the umask may have taken bits away
                    finally:
                        os.close(new)
                next_fd = self._step(fd, name, relpath)
                os.close(fd)
                fd = next_fd
        finally:
            _close(fd)

    def listdir(self, relpath: str = "") -> list[Entry]:
        """Entries of a folder, sorted by name; links are listed as "symlink", never followed.
        Reads the whole folder: for a folder a user fills, use `scan`."""
        found = self.scan(relpath, lambda name, kind: True, limit=1 << 62, max_scan=1 << 62)
        return sorted(found.entries, key=lambda e: e.name)

    def scan(self, relpath: str, keep: Callable[[str, Kind], bool], limit: int, max_scan: int) -> Scan:
        """A folder's entries for which `keep(name, kind)`, in directory order, streamed: reading
        stops after `limit` kept or `max_scan` names read (`Scan.cut`); only kept ones are stat'ed."""
        dirfd = self._open_dir(relpath, split_path(relpath, allow_root=True))
        try:
            readable = os.open(".", _READ_DIR, dir_fd=dirfd)
            try:
                return scan_dir(readable, keep, limit, max_scan)
            finally:
                os.close(readable)
        finally:
            os.close(dirfd)

    def walk(self, keep: Callable[[str], bool], limit: int, max_scan: int) -> Scan:
        """Regular files anywhere below the root whose name passes `keep` (hidden folders and
        files skipped, links never followed), as relative paths; bounded like `scan`."""
        dirfd = self._open_root()
        try:
            readable = os.open(".", _READ_DIR, dir_fd=dirfd)
            try:
                return walk_files(readable, keep, limit, max_scan)
            finally:
                os.close(readable)
        finally:
            os.close(dirfd)

    def usage(self, max_scan: int) -> Usage:
        """Bytes the root folder's tree takes on disk, counted within `max_scan` names (`scan.disk_usage`)."""
        dirfd = self._open_root()
        try:
            readable = os.open(".", _READ_DIR, dir_fd=dirfd)
            try:
                return disk_usage(readable, max_scan)
            finally:
                os.close(readable)
        finally:
            os.close(dirfd)

    def stat(self, relpath: str) -> Entry | None:
        """The entry at `relpath` (a final link is reported as "symlink"), or None if missing.

        "" is the root folder itself. A link on the way there raises InvalidPath.
        """
        parts = split_path(relpath, allow_root=True)
        if not parts:
            fd = self._open_root()
            try:
                return _entry("", os.fstat(fd))
            finally:
                os.close(fd)
        try:
            dirfd = self._open_dir(relpath, parts[:-1])
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return _entry(parts[-1], os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(dirfd)

    def exists(self, relpath: str) -> bool:
        """True if something (file, folder, link) is at `relpath`."""
        return self.stat(relpath) is not None

    def remove(self, relpath: str) -> None:
        """Unlink a file or link (a link is removed itself, never its target). Not folders."""
        dirfd, name = self._parent(relpath)
        try:
            os.unlink(name, dir_fd=dirfd)
        except OSError as exc:
            raise _oserror(exc.errno or errno.EIO, relpath) from None
        finally:
            os.close(dirfd)

    def rename(self, src: str, dst: str) -> None:
        """Move `src` to `dst` (replacing a file there, as rename(2) does)."""
        src_fd, src_name = self._parent(src)
        try:
            dst_fd, dst_name = self._parent(dst)
            try:
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                self._fsync_dir(dst_fd)
            except OSError as exc:
                raise _oserror(exc.errno or errno.EIO, f"{src} -> {dst}") from None
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)


def _read_at_most(fd: int, relpath: str, size: int, max_bytes: int | None) -> bytes:
    """The rest of the file open at `fd`, reading at most `max_bytes` + 1 bytes: a file that
    grows past the limit while it is read (a kernel appending) is caught without reading it all.
    One read of the size fstat gave, so a file that does not grow is read into one buffer."""
    cap = None if max_bytes is None else max_bytes + 1
    first = os.read(fd, size + 1)  # the caller checked size <= max_bytes
    if len(first) <= size:
        return first  # at its end: no more than fstat said (a short read is the end of a regular file)
    chunks, total = [first], len(first)
    while True:
        room = 1 << 20 if cap is None else min(1 << 20, cap - total)
        if room <= 0:
            raise FileTooLarge(relpath, total, max_bytes or 0, grew=True)
        chunk = os.read(fd, room)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
