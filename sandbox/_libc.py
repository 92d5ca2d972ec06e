"""libc calls the stdlib lacks on Python 3.11 (unshare, setns, mount, prctl), resolved once at import.

Resolved here, not in the forked child, because dlopen/dlsym take locks another thread of
the parent may have held at fork time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
SECCOMP_MODE_FILTER = 2
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns.restype = ctypes.c_int
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_mount.restype = ctypes.c_int
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int
_prctl_ptr = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, use_errno=True)(("prctl", _libc))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _raise(path: str | None = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


def unshare(flags: int) -> None:
    if _unshare(flags) != 0:
        _raise()


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    if _mount(enc(source), target.encode(), enc(fstype), flags, enc(data)) != 0:
        _raise(target)


def umount2(target: str, flags: int) -> None:
    if _umount2(target.encode(), flags) != 0:
        _raise(target)


def set_dumpable(*, dumpable: bool) -> None:
    if _prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) != 0:
        _raise()


def load_seccomp_filter(program: bytes) -> None:
    """Install a classic-BPF seccomp program (an array of struct sock_filter, 8 bytes each).

    Needs no_new_privs (or CAP_SYS_ADMIN); applies to this thread and what it later starts.
    """
    if not program or len(program) % 8:
        raise ValueError("a seccomp program is a non-empty array of 8-byte instructions")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _prctl_ptr(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog)) != 0:
        _raise()


def setns(fd: int, nstype: int) -> None:
    if _setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_no_new_privs() -> None:
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def get_no_new_privs() -> bool:
    value = _prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return bool(value == 1)


IPC_RMID = 0
_shmctl = _libc.shmctl
_shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_shmctl.restype = ctypes.c_int
_msgctl = _libc.msgctl
_msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_msgctl.restype = ctypes.c_int
_semctl = _libc.semctl
_semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_semctl.restype = ctypes.c_int


def ipc_remove(kind: str, ident: int) -> None:
    """IPC_RMID on a System V object: "shm" (a segment: freed once no process has it attached),
    "msg" (a message queue) or "sem" (a semaphore set)."""
    if kind == "shm":
        done = _shmctl(ident, IPC_RMID, None)
    elif kind == "msg":
        done = _msgctl(ident, IPC_RMID, None)
    elif kind == "sem":
        done = _semctl(ident, 0, IPC_RMID)
    else:
        raise ValueError(f"unknown System V IPC kind {kind!r}")
    if done != 0:
        _raise()
