"""System V IPC objects of one uid (shared memory segments, message queues, semaphore sets): listed
and removed.

They belong to an IPC namespace, not to a process: they outlive every process of their owner,
holding memory (a segment may be gigabytes) and data that the next holder of the uid could read.
Listed from /proc/sysvipc, which shows the caller's IPC namespace: the host's, where kernels
started without an IPC namespace of their own put theirs (a namespace of their own takes its
objects with it when its last process ends). Called by kernelpool's user removal once no task
of the uid is left.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from sandbox import _libc
from sandbox.errors import SandboxError

KINDS = ("shm", "msg", "sem")
_ID_COLUMN = {"shm": "shmid", "msg": "msqid", "sem": "semid"}


@dataclass(frozen=True)
class IpcObject:
    kind: str  # "shm", "msg" or "sem"
    id: int
    key: int
    uid: int  # owner
    cuid: int  # creator


def objects(proc: str = "/proc/sysvipc") -> list[IpcObject]:
    """Every System V IPC object of the caller's IPC namespace."""
    found: list[IpcObject] = []
    for kind in KINDS:
        try:
            with open(f"{proc}/{kind}", encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue  # a kernel built without System V IPC
        if not lines:
            continue
        header = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(header, line.split(), strict=False))
            try:
                found.append(IpcObject(kind, int(row[_ID_COLUMN[kind]]), int(row["key"]), int(row["uid"]), int(row["cuid"])))
            except (KeyError, ValueError):
                continue
    return found


def owned_by(uid: int, proc: str = "/proc/sysvipc") -> list[IpcObject]:
    """The objects `uid` owns or created (an owner can hand an object to another uid; its creator
    is still the one who filled it)."""
    return [o for o in objects(proc) if uid in (o.uid, o.cuid)]


def remove_owned_by(uid: int) -> int:
    """Remove every object `uid` owns or created; returns how many. Raises SandboxError if one
    cannot be removed."""
    if uid <= 0:
        raise SandboxError(f"refusing to remove the IPC objects of uid {uid}", path=str(uid))
    removed = 0
    for obj in owned_by(uid):
        try:
            _libc.ipc_remove(obj.kind, obj.id)
            removed += 1
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIDRM):
                continue  # removed meanwhile
            raise SandboxError(f"cannot remove System V {obj.kind} {obj.id} of uid {uid}: {exc.strerror}",
                               path=str(uid)) from exc
    return removed
