"""The parts of cgroup handling shared by v1 and v2: `Cgroup`, `CgroupBackend`, file helpers
(`read_file` and `write_file` from `sandbox._cgroupfiles`, which `sandbox.cgroupkill` uses too).

Public names are re-exported by `sandbox.cgroups`; import them from there.
"""

from __future__ import annotations

import contextlib
import os
import re
from abc import ABC, abstractmethod

from sandbox import cgroupkill
from sandbox._cgroupfiles import read_file, write_file
from sandbox.errors import CgroupError
from sandbox.limits import Limits

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}")
_KILL_WAIT_S = 3.0
_REMOVE_WAIT_S = 3.0


def split_relpath(relpath: str, *, allow_empty: bool = False) -> list[str]:
    if relpath == "" and allow_empty:
        return []
    parts = relpath.split("/")
    for part in parts:
        if not _COMPONENT.fullmatch(part):
            raise CgroupError(
                f"invalid cgroup path {relpath!r}: each component must match [A-Za-z0-9_][A-Za-z0-9_.@-]*",
                path=relpath,
            )
    return parts


def read_keyed(path: str, key: str) -> int | None:
    text = read_file(path)
    if text is None:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def read_int(path: str) -> int | None:
    text = read_file(path)
    return None if text is None or not text.strip() else int(text.split()[0])


def read_pids(path: str) -> list[int]:
    text = read_file(path) or ""
    return [int(line) for line in text.split()]


def own_cgroup_paths() -> dict[str, str]:
    """Controller (v1) or "" (v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="ascii") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                paths[controller] = path
    return paths


class Cgroup:
    """One cgroup (a user's aggregate or one kernel), in every hierarchy the backend uses.

    Returned by `CgroupBackend.create`/`get`; the launcher writes the child into
    `procs_files()`, the kernel registry reads usage and OOM kills and calls `remove()`.
    """

    def __init__(self, backend: CgroupBackend, relpath: str, limits: Limits) -> None:
        self.backend = backend
        self.relpath = relpath
        self.limits = limits

    def __repr__(self) -> str:
        return f"Cgroup(v{self.backend.version}, {self.relpath!r}, {self.limits})"

    def directories(self) -> list[str]:
        """Absolute directories of this cgroup: one per v1 hierarchy, one for v2."""
        return self.backend._dirs(self.relpath)

    def procs_files(self) -> list[str]:
        """Absolute paths of every cgroup.procs a process must be written into to join."""
        return [os.path.join(d, "cgroup.procs") for d in self.directories()]

    def add_pid(self, pid: int) -> None:
        """Move a running process in (the launcher does this itself in the child)."""
        for path in self.procs_files():
            write_file(path, str(pid))

    def pids(self) -> list[int]:
        """Processes directly in this cgroup (not its children)."""
        found: set[int] = set()
        for path in self.procs_files():
            found.update(read_pids(path))
        return sorted(found)

    def all_pids(self) -> list[int]:
        """Processes in this cgroup and every cgroup below it."""
        found: set[int] = set()
        for top in self.directories():
            for dirpath, _, _ in os.walk(top):
                found.update(read_pids(os.path.join(dirpath, "cgroup.procs")))
        return sorted(found)

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this cgroup (0 if unknown).

        v1 counts a kill only in the victim's own cgroup (not its ancestors), also when it was
        the user's aggregate limit that was hit: ask the kernel's cgroup, not the user's.
        """
        return self.backend._oom_kills(self.relpath)

    def memory_current(self) -> int | None:
        """Bytes charged to this cgroup now (children included), or None if not available."""
        return self.backend._memory_current(self.relpath)

    def cpu_usage_seconds(self) -> float | None:
        """CPU time used by this cgroup since creation, or None (v1 without cpuacct)."""
        return self.backend._cpu_usage(self.relpath)

    def kill_all(self) -> None:
        """End every task in this cgroup and below (`sandbox.cgroupkill.kill_trees`: forks blocked,
        frozen where the host can, killed, thawed); returns once none is left or gives up."""
        self.backend._kill_all(self)

    def remove(self) -> None:
        """Kill what runs inside, then delete this cgroup and its children. Idempotent."""
        dirs = [d for d in self.directories() if os.path.isdir(d)]
        if not dirs:
            return
        self.kill_all()
        cgroupkill.remove_trees(dirs, wait=_REMOVE_WAIT_S)


class CgroupBackend(ABC):
    """Creates and finds cgroups below `<own cgroup>/<prefix>`; see `detect()`."""

    version: int
    controllers: set[str]
    prefix: str

    def create(self, relpath: str, limits: Limits) -> Cgroup:
        """Create `relpath` ("alice" or "alice/k-1234") and its parents; set `limits` on it.

        Idempotent: an existing cgroup keeps its processes and gets the new limits. Parents
        that are created here get no limits of their own (create them first for that).
        Raises CgroupError, also when a limit is asked for a controller this host lacks.
        """
        parts = split_relpath(relpath)
        self._check_controllers(limits, relpath)
        self._make(parts)
        self._write_limits(relpath, limits)
        return Cgroup(self, relpath, limits)

    def get(self, relpath: str) -> Cgroup | None:
        """The existing cgroup at `relpath` with its limits read back, or None. "" is the prefix dir."""
        split_relpath(relpath, allow_empty=True)
        if not os.path.isdir(self._dirs(relpath)[0]):
            return None
        return Cgroup(self, relpath, self._read_limits(relpath))

    def list_children(self, relpath: str = "") -> list[str]:
        """Relative paths of the cgroups directly below `relpath` (e.g. "alice" -> ["alice/k-1"]).

        Used at start-up to find cgroups left behind by a crash.
        """
        parts = split_relpath(relpath, allow_empty=True)
        names: set[str] = set()
        for top in self._dirs(relpath):
            try:
                names.update(e.name for e in os.scandir(top) if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                continue
        return sorted("/".join([*parts, n]) for n in names)

    def writable(self) -> bool:
        """Whether we may create our cgroups: the nearest existing ancestor of each prefix dir is writable."""
        for d in self._dirs(""):
            while not os.path.exists(d):
                d = os.path.dirname(d)
            if not os.access(d, os.W_OK):
                return False
        return bool(self._dirs(""))

    def _check_controllers(self, limits: Limits, relpath: str) -> None:
        wanted = {"memory": limits.memory_bytes, "cpu": limits.cpus, "pids": limits.pids}
        for controller, value in wanted.items():
            if value is not None and controller not in self.controllers:
                raise CgroupError(
                    f"cannot limit {controller} for {relpath!r}: the {controller} controller is not available here",
                    path=relpath,
                )

    def _kill_all(self, cgroup: Cgroup) -> None:
        with contextlib.suppress(CgroupError):  # what is left keeps its cgroup busy: `remove` says so
            cgroupkill.kill_trees(cgroup.directories(), timeout=_KILL_WAIT_S)

    @abstractmethod
    def _dirs(self, relpath: str) -> list[str]: ...

    @abstractmethod
    def _make(self, parts: list[str]) -> None: ...

    @abstractmethod
    def _write_limits(self, relpath: str, limits: Limits) -> None: ...

    @abstractmethod
    def _read_limits(self, relpath: str) -> Limits: ...

    @abstractmethod
    def _oom_kills(self, relpath: str) -> int: ...

    @abstractmethod
    def _memory_current(self, relpath: str) -> int | None: ...

    @abstractmethod
    def _cpu_usage(self, relpath: str) -> float | None: ...
