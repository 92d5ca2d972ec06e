"""Ending everything in a cgroup tree in a way no task can dodge, finding trees by name, removing them.

Works on directories, in any mix of hierarchies: the v2 tree, and v1's memory, cpu, pids, cpuacct
and freezer trees. Callers: `Cgroup.kill_all` (the server stopping a kernel) and kernelpool's user
removal, which runs in the CLI rather than in the server that made the cgroups, and so finds a
user's cgroups by name (`find_trees`).

`kill_trees`, each step where the host has it:

1. ``pids.max`` = 0 at the top of each tree (pids controller): from now on no task in it can fork
   or start a thread, so a fork loop cannot outrun the kill (the old value is put back at the end,
   for a caller that keeps the tree, e.g. after a failed removal).
2. Freeze: v2 ``cgroup.freeze``, v1 freezer ``freezer.state``; waited for. A task in
   uninterruptible sleep cannot freeze: after `FREEZE_WAIT` the kill goes ahead all the same.
3. Kill: v2 ``cgroup.kill`` (Linux 5.14+: the kernel kills the whole tree, forks in flight
   included); and SIGKILL to every task listed in ``cgroup.threads`` / ``tasks`` (every thread,
   so a process whose main thread has exited is found too). A frozen task cannot exit, so its id
   cannot pass to another process before the signal lands; tasks that are not frozen are signalled
   through a pidfd, and only if they are still listed once the pidfd pins them.
4. Thaw: the killed tasks die as they wake.
5. Wait until no task is left anywhere in the tree, killing again; CgroupError after `timeout`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Sequence

from sandbox._cgroupfiles import read_file, write_file
from sandbox.errors import CgroupError

FREEZE_WAIT = 2.0  # seconds a freeze may take before the kill goes ahead without it
_POLL = 0.005


def find_trees(prefix: str, leaf: str, root: str = "/sys/fs/cgroup", mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Every cgroup directory ``.../<prefix>/<leaf>`` in every cgroup hierarchy (v1 or v2) mounted
    at or below `root`, wherever in the hierarchy it sits: a server's cgroups hang below the
    server's own cgroup, which another process (the CLI) does not share. Directories named
    `prefix` are not descended into (they hold kernels' cgroups, not servers')."""
    found: list[str] = []
    for top in _mount_points(root, mountinfo):
        for dirpath, dirnames, _ in os.walk(top):
            if prefix in dirnames:
                candidate = os.path.join(dirpath, prefix, leaf)
                if os.path.isdir(candidate) and not os.path.islink(candidate):
                    found.append(candidate)
                dirnames.remove(prefix)
    return sorted(set(found))


def _mount_points(root: str, mountinfo: str) -> list[str]:
    points: list[str] = []
    with open(mountinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].replace("\\040", " ")
            if fields[sep + 1] in ("cgroup", "cgroup2") and (point == root or point.startswith(root.rstrip("/") + "/")):
                points.append(point)
    return sorted(set(points))


def tasks_in(dirs: Sequence[str]) -> set[int]:
    """Ids of every task (thread) in `dirs` and below that still runs."""
    found: set[int] = set()
    for top in dirs:
        for dirpath, _, _ in os.walk(top):
            found.update(_listed(dirpath))
    return {tid for tid in found if _runs(tid)}


def _runs(tid: int) -> bool:
    # a task that exited leaves its cgroup; one that is only waiting to be reaped (a zombie) runs
    # nothing either. On a real cgroupfs this drops nothing; it keeps stand-in trees honest
    state = _status_field(tid, "State") or "X"
    return state[:1] not in ("Z", "X")


def _status_field(tid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
    except OSError:
        return None  # gone
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key + ":")), None)


def _listed(path: str) -> list[int]:
    # v2 lists every thread in cgroup.threads; v1 in tasks (cgroup.procs has one id per process)
    for name in ("cgroup.threads", "tasks"):
        text = read_file(os.path.join(path, name))
        if text is not None:
            return [int(t) for t in text.split()]
    return []


def kill_trees(dirs: Sequence[str], *, timeout: float = 10.0) -> int:
    """End every task in the cgroups `dirs` and below (see the module's docstring); returns how many
    tasks were listed at the start. Raises CgroupError naming what is left after `timeout` seconds."""
    dirs = [d for d in dirs if os.path.isdir(d)]
    first = tasks_in(dirs)
    if not first:
        return 0  # the common case: a kernel that shut down cleanly leaves nothing to freeze
    deadline = time.monotonic() + timeout
    limits = _block_forks(dirs)
    try:
        frozen = _freeze(dirs)
        try:
            _kill(dirs, frozen)
        finally:
            _thaw(dirs)
        while True:
            left = tasks_in(dirs)
            if not left:
                return len(first)
            if time.monotonic() > deadline:
                raise CgroupError(f"{len(left)} task(s) still in {dirs[0]} after SIGKILL for {timeout:g} s: "
                                  f"{sorted(left)[:10]}", path=dirs[0])
            _kill(dirs, set())
            time.sleep(_POLL * 4)
    finally:
        _restore(limits)


def _block_forks(dirs: Sequence[str]) -> dict[str, str]:
    saved: dict[str, str] = {}
    for top in dirs:
        path = os.path.join(top, "pids.max")
        try:
            old = read_file(path)
            if old is None:
                continue
            write_file(path, "0")
        except CgroupError:
            continue  # best effort: the freeze and the repeated kill still end a fork loop
        saved[path] = old.strip()
    return saved


def _restore(saved: dict[str, str]) -> None:
    for path, value in saved.items():
        try:
            write_file(path, value)
        except CgroupError as exc:
            if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno != errno.ENOENT:
                raise  # gone with its cgroup is fine; anything else is worth knowing


def _freeze(dirs: Sequence[str]) -> set[int]:
    """Freeze what can be frozen; returns the tasks known to be frozen (listed in a tree whose
    freeze completed)."""
    asked: list[tuple[str, str]] = []
    for top in dirs:
        for name, value in (("cgroup.freeze", "1"), ("freezer.state", "FROZEN")):
            path = os.path.join(top, name)
            if not os.path.exists(path):
                continue
            try:
                write_file(path, value)
            except CgroupError:
                continue  # best effort: unfrozen tasks are killed through pidfds instead
            asked.append((top, name))
    frozen: set[int] = set()
    deadline = time.monotonic() + FREEZE_WAIT
    pending = list(asked)
    while pending:
        for top, name in list(pending):
            if _is_frozen(top, name):
                pending.remove((top, name))
                frozen |= tasks_in([top])
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(_POLL)
    return frozen


def _is_frozen(top: str, name: str) -> bool:
    if name == "freezer.state":
        return (read_file(os.path.join(top, name)) or "").strip() == "FROZEN"
    events = read_file(os.path.join(top, "cgroup.events")) or ""
    return "frozen 1" in events.splitlines()


def _thaw(dirs: Sequence[str]) -> None:
    # every tree is thawed even if one fails: a frozen task with SIGKILL pending never dies
    failed: CgroupError | None = None
    for top in dirs:
        for name, value in (("cgroup.freeze", "0"), ("freezer.state", "THAWED")):
            path = os.path.join(top, name)
            if os.path.exists(path):
                try:
                    write_file(path, value)
                except CgroupError as exc:
                    failed = failed or exc
    if failed is not None:
        raise failed


def _kill(dirs: Sequence[str], frozen: set[int]) -> None:
    for top in dirs:
        path = os.path.join(top, "cgroup.kill")
        if os.path.exists(path):
            write_file(path, "1")
    listed = tasks_in(dirs)
    for tid in sorted(listed & frozen):
        with contextlib.suppress(ProcessLookupError):
            os.kill(tid, signal.SIGKILL)  # the whole thread group; frozen: the id is still this task's
    _kill_pinned(dirs, listed - frozen)


def _kill_pinned(dirs: Sequence[str], tids: set[int]) -> None:
    # Not frozen: a listed task may exit and its id go to another process before the signal. Pin
    # each task's process with a pidfd, then list the trees again: a task still listed, whose
    # process (the pinned one) still holds it, is in the tree, and so is the process signalled.
    pinned: dict[int, tuple[int, set[int]]] = {}
    try:
        for tid in tids:
            tgid = _tgid(tid)
            if tgid is None:
                continue
            if tgid not in pinned:
                try:
                    pinned[tgid] = (os.pidfd_open(tgid), set())
                except OSError:
                    continue
            pinned[tgid][1].add(tid)
        still = tasks_in(dirs)
        for tgid, (fd, members) in pinned.items():
            if any(t in still and os.path.exists(f"/proc/{tgid}/task/{t}") for t in members):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        for fd, _ in pinned.values():
            os.close(fd)


def _tgid(tid: int) -> int | None:
    value = _status_field(tid, "Tgid")
    return int(value) if value else None


def remove_trees(dirs: Sequence[str], *, wait: float = 3.0) -> None:
    """Delete the cgroups `dirs` and everything below, deepest first (they must hold no task; a
    task that is still exiting keeps its cgroup busy for a moment). Idempotent."""
    deadline = time.monotonic() + wait
    for top in dirs:
        if not os.path.isdir(top):
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            while True:
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove cgroup {dirpath}: {exc.strerror}", path=dirpath) from exc
                    time.sleep(0.02)
