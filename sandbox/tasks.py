"""The tasks of one uid, found thread by thread in /proc, and ended.

A uid's processes cannot leave it (no_new_privs; no setuid program works for them), so /proc is
the one complete list of what a user still runs. It is read per thread (/proc/PID/task/TID), not
per process: a process whose main thread has exited shows as a zombie in /proc/PID/status while
its other threads run on, and only their own entries say so. Callers: kernelpool's user removal
(`kernelpool.users.removal`), after the user's cgroups were killed (`sandbox.cgroupkill`), to end
anything outside them and to confirm that nothing of the uid is left before its account goes.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from sandbox.errors import SandboxError

_PROC = "/proc"
_STATES = {
    "D": "uninterruptible sleep: waiting inside the kernel, e.g. on a file system that does not answer",
    "T": "stopped", "t": "stopped by a debugger", "R": "running", "S": "sleeping", "I": "idle",
}


@dataclass(frozen=True)
class Task:
    """One thread of a uid, as /proc showed it."""

    tid: int
    tgid: int  # its process (thread group)
    name: str  # its comm: the task may have set it itself, so it is shown, never trusted
    state: str  # the letter of /proc/.../status "State"

    @property
    def alive(self) -> bool:
        """A zombie (exited, waiting to be reaped) or dead task runs nothing."""
        return self.state not in ("Z", "X")

    def describe(self) -> str:
        who = f"{self.tgid}" if self.tid == self.tgid else f"{self.tgid} (thread {self.tid})"
        why = _STATES.get(self.state, "")
        return f"{who} {self.name!r} state {self.state}" + (f" ({why})" if why else "")


class TasksRemain(SandboxError):
    """Tasks of a uid still run after every way of ending them was tried. `tasks` says which."""

    def __init__(self, uid: int, tasks: list[Task], waited: float) -> None:
        shown = "; ".join(t.describe() for t in tasks[:5]) + (f"; and {len(tasks) - 5} more" if len(tasks) > 5 else "")
        super().__init__(f"{len(tasks)} task(s) of uid {uid} still run {waited:g} s after SIGKILL: {shown}",
                         path=str(uid))
        self.uid = uid
        self.tasks = tasks


def _status(path: str) -> dict[str, str] | None:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None  # gone meanwhile
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _has_uid(status: dict[str, str], uid: int) -> bool:
    # real, effective, saved and file-system uid: any of them makes the task the uid's
    return str(uid) in status.get("Uid", "").split()


def tasks_of(uid: int, proc: str = _PROC) -> list[Task]:
    """Every task (thread) any of whose uids is `uid`, zombies included."""
    found: list[Task] = []
    try:
        pids = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            tids = [e for e in os.listdir(f"{proc}/{pid}/task") if e.isdigit()]
        except OSError:
            continue  # gone meanwhile
        for tid in tids:
            status = _status(f"{proc}/{pid}/task/{tid}/status")
            if status is None or not _has_uid(status, uid):
                continue
            state = status.get("State", "?").strip()[:1] or "?"
            found.append(Task(int(tid), int(pid), status.get("Name", "").strip(), state))
    return found


def live_tasks(uid: int, proc: str = _PROC) -> list[Task]:
    """The tasks of `uid` that are not zombies: a zombie main thread with live threads is counted
    through those threads."""
    return [t for t in tasks_of(uid, proc) if t.alive]


def signal_group(tgid: int, uid: int) -> bool:
    """SIGKILL the process `tgid` if it is `uid`'s; False if it was not there or not the uid's.

    Through a pidfd: the process is pinned before its owner is checked, so a pid that the kernel
    handed to another process meanwhile (pid_max may be as low as 32768) is never signalled.
    """
    try:
        fd = os.pidfd_open(tgid)
    except OSError:
        return False  # gone, or not a process (any more)
    try:
        status = _status(f"{_PROC}/{tgid}/status")
        if status is None or not _has_uid(status, uid):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def kill_tasks(uid: int, *, timeout: float = 5.0) -> int:
    """SIGKILL every process with a live task of `uid` until two scans in a row find none (a fork
    in flight during the first is seen by the second); returns how many were signalled.

    Raises TasksRemain with what still runs after `timeout` seconds (a task in uninterruptible
    sleep cannot die until the kernel lets it go). Refuses uid 0 and the caller's own uids.
    """
    if uid <= 0 or uid in (os.getuid(), os.geteuid()):
        raise SandboxError(f"refusing to kill the processes of uid {uid}", path=str(uid))
    signalled = 0
    started = time.monotonic()
    quiet = 0
    while quiet < 2:
        live = live_tasks(uid)
        if not live:
            quiet += 1
            time.sleep(0.02)
            continue
        quiet = 0
        for tgid in sorted({t.tgid for t in live}):
            signalled += signal_group(tgid, uid)
        if time.monotonic() - started > timeout:
            remaining = live_tasks(uid)
            if remaining:
                raise TasksRemain(uid, remaining, round(time.monotonic() - started, 1))
        time.sleep(0.01)
    return signalled
