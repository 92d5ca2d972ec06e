"""A kernel's runtime folder: its connection file and ipc sockets, in folders owned by root.

The root server writes the connection file and connects to the kernel's sockets. Both must be
at paths that no tenant can change, or a kernel could plant a link there and turn the server's
write (or connect) onto any file (or another user's kernel). So, under the server's run folder
(root, 0711):

    RUN/<uid>/           root:<gid> 0710  one per user: only that user's kernels may pass, none list it
    RUN/<uid>/tmp/       <uid> 0700       the user's TMPDIR (the server creates and deletes it, nothing else)
    RUN/<uid>/<kid>/     root:<gid> 0750  the kernel's connection file, root:<gid> 0640, written while
                                          the folder was root's alone
    RUN/<uid>/<kid>/s/   root:<gid> 0770  while the kernel binds its sockets; then 0750 ("locked")

The kernel's group may add entries to `s/` only until the server locks it, which it does as soon
as every socket is there (or the kernel died, or the wait timed out). The server connects only
after that, and only to entries it has checked are sockets of the kernel's uid; jupyter_client's
own path calls (the connection file, the ipc files) all land in these root-owned folders. Names
are uids and kernel ids, never user names. Callers: kernelpool's kernel registry (create),
provisioner (share, open_for_binding, wait_for_sockets, lock, check_sockets, remove) and user
service (`prepare_user_run`).
"""

from __future__ import annotations

import asyncio
import os
import stat as st
import time
from collections.abc import Callable

from sandbox.errors import LaunchError, SandboxError
from sandbox.folders import prepare_dir, remove_tree

CONNECTION_FILE = "kernel.json"
SOCKETS = "s"
SOCKET_PREFIX = "k"  # jupyter_client names ipc sockets "<prefix>-<port>"
TMP = "tmp"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def user_run_folder(run_dir: str, uid: int) -> str:
    """RUN/<uid>: the folder of one user's kernel folders."""
    return os.path.join(run_dir, str(uid))


def prepare_user_run(run_dir: str, uid: int, gid: int | None, tmp_owner: tuple[int, int] | None) -> str:
    """Create RUN/<uid> (root:<gid> 0710; 0700 when `gid` is None) and its tmp/ (owned by
    `tmp_owner`, 0700); returns the tmp folder's path. Idempotent; refuses links (InvalidPath)."""
    folder = user_run_folder(run_dir, uid)
    prepare_dir(folder, 0 if gid is not None else None, gid, mode=0o710 if gid is not None else 0o700)
    tmp = os.path.join(folder, TMP)
    owner = tmp_owner or (None, None)
    prepare_dir(tmp, owner[0], owner[1], mode=0o700)
    return tmp


class KernelRunDir:
    """RUN/<uid>/<kid>/ of one kernel; see the module docstring.

    `uid`/`gid` are the kernel's (None: it runs as the server's own user, insecure mode; the
    folders then stay the server's, 0700).
    """

    def __init__(self, run_dir: str, user_uid: int, kid: str, uid: int | None, gid: int | None) -> None:
        if not kid or "/" in kid or kid in (".", "..", TMP):
            raise SandboxError(f"bad kernel id {kid!r}", path=kid)
        self.parent = user_run_folder(run_dir, user_uid)
        self.kid = kid
        self.uid = uid
        self.gid = gid
        self.path = os.path.join(self.parent, kid)
        self.connection_file = os.path.join(self.path, CONNECTION_FILE)
        self.socket_dir = os.path.join(self.path, SOCKETS)
        self.socket_prefix = os.path.join(self.socket_dir, SOCKET_PREFIX)
        self.locked = False

    def __repr__(self) -> str:
        return f"KernelRunDir({self.path!r}, uid={self.uid})"

    # -- descriptors ------------------------------------------------------------------------

    def _open_parent(self) -> int:
        # RUN/<uid> is root's and no tenant may write in it: its path cannot be steered
        return os.open(self.parent, _DIR)

    def _open(self, *names: str) -> int:
        fd = self._open_parent()
        try:
            for name in names:
                nxt = os.open(name, _DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- life cycle -----------------------------------------------------------------------

    def create(self) -> None:
        """Make <kid>/ and <kid>/s/, root's alone (0700) until `share` and `open_for_binding`."""
        parent = self._open_parent()
        try:
            os.mkdir(self.kid, 0o700, dir_fd=parent)  # FileExistsError for a reused id: never reuse
            fd = os.open(self.kid, _DIR, dir_fd=parent)
            try:
                os.fchmod(fd, 0o700)
                os.mkdir(SOCKETS, 0o700, dir_fd=fd)
                sub = os.open(SOCKETS, _DIR, dir_fd=fd)
                try:
                    os.fchmod(sub, 0o700)
                finally:
                    os.close(sub)
            finally:
                os.close(fd)
        finally:
            os.close(parent)

    def share(self) -> None:
        """Let the kernel read its connection file (written by the caller while <kid>/ was root's
        alone): file root:<gid> 0640, folder root:<gid> 0750. Nothing is followed."""
        if self.gid is None:
            return
        fd = self._open(self.kid)
        try:
            conn = os.open(CONNECTION_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                if not st.S_ISREG(os.fstat(conn).st_mode):
                    raise SandboxError(f"{self.connection_file} is not a regular file", path=self.connection_file)
                os.fchown(conn, 0, self.gid)
                os.fchmod(conn, 0o640)
            finally:
                os.close(conn)
            os.fchown(fd, 0, self.gid)
            os.fchmod(fd, 0o750)
        finally:
            os.close(fd)

    def open_for_binding(self) -> None:
        """Let the kernel's group create its sockets in s/ (root:<gid> 0770) until `lock`."""
        if self.gid is None:
            return
        fd = self._open(self.kid, SOCKETS)
        try:
            os.fchown(fd, 0, self.gid)
            os.fchmod(fd, 0o770)
        finally:
            os.close(fd)

    def lock(self) -> None:
        """s/ becomes root:<gid> 0750: from now on only root changes what is in it. Idempotent."""
        if self.gid is not None:
            fd = self._open(self.kid, SOCKETS)
            try:
                os.fchmod(fd, 0o750)
            finally:
                os.close(fd)
        self.locked = True

    def _socket_owner(self) -> int:
        return os.geteuid() if self.uid is None else self.uid

    def missing_sockets(self, names: list[str]) -> list[str]:
        """Which of `names` in s/ are not (yet) sockets owned by the kernel's uid; links are not followed."""
        fd = self._open(self.kid, SOCKETS)
        try:
            missing = []
            for name in names:
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    missing.append(name)
                    continue
                if not st.S_ISSOCK(info.st_mode) or info.st_uid != self._socket_owner():
                    missing.append(name)
            return missing
        finally:
            os.close(fd)

    async def wait_for_sockets(self, names: list[str], alive: Callable[[], bool], timeout: float) -> None:
        """Wait until every socket in `names` is there, the kernel died (`alive()` false), or
        `timeout` seconds passed (LaunchError); the caller locks afterwards in any case."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        while self.missing_sockets(names):
            if not alive():
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"the kernel did not create its sockets within {timeout:g} s", step="sockets")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)

    def check_sockets(self, names: list[str]) -> None:
        """After `lock`: every socket is the kernel's, so connecting to them reaches that kernel."""
        if not self.locked:
            raise SandboxError("check_sockets before lock", path=self.socket_dir)
        bad = self.missing_sockets(names)
        if bad:
            raise LaunchError(
                f"refusing to connect: {', '.join(bad)} in {self.socket_dir} are not the kernel's sockets "
                "(replaced by something else while it started)", step="sockets", path=self.socket_dir)

    def remove(self) -> None:
        """Delete the kernel's folder and everything in it, without following anything."""
        remove_tree(self.parent, self.kid)


def remove_kernel_folder(run_dir: str, connection_file: str) -> bool:
    """Remove the kernel folder that holds `connection_file` (as recorded by a dead server), if it
    is one of ours: RUN/<uid>/<kid>/kernel.json. False for anything else (left alone)."""
    rel = os.path.relpath(os.path.abspath(connection_file), os.path.abspath(run_dir))
    parts = rel.split(os.sep)
    if len(parts) != 3 or parts[2] != CONNECTION_FILE or not parts[0].isdigit() or parts[1] in ("..", ".", TMP):
        return False
    return remove_tree(os.path.join(run_dir, parts[0]), parts[1])
