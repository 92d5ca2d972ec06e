"""cgroups: one directory per user (aggregate limits) with one per kernel nested inside.

Layout, below the server's own cgroup in each hierarchy (so that a container's or a systemd
unit's limits still cap everything we start):

    <own cgroup>/<prefix>/<user>/<kernel>

Both cgroup v2 (one unified tree; production hosts and Docker) and v1 (one tree per
controller; these development machines) are supported behind `CgroupBackend`. Callers:
kernelpool's kernel registry (create before a launch, remove after shutdown, list leftovers
at start-up) and `launcher.enter`, which writes the child into `Cgroup.procs_files()`.
Processes belong in leaves only (kernels), never in a user's aggregate directory: cgroup v2
refuses to enable controllers below a cgroup that holds processes.
"""

from __future__ import annotations

import contextlib
import errno
import os

from sandbox._cgroupfs import (
    Cgroup,
    CgroupBackend,
    own_cgroup_paths,
    read_file,
    read_int,
    read_keyed,
    read_pids,
    split_relpath,
    write_file,
)
from sandbox.errors import CgroupError
from sandbox.limits import CPU_PERIOD_US, Limits

__all__ = ["Cgroup", "CgroupBackend", "CgroupV1Backend", "CgroupV2Backend", "detect"]

# v1 reports "no limit" as a huge page-aligned number (LONG_MAX rounded down), not -1
_V1_UNLIMITED = 1 << 62
# cpuacct only for cpu_usage_seconds; freezer (where writable) so that a kill cannot be dodged
_V1_CONTROLLERS = ("memory", "cpu", "pids", "cpuacct", "freezer")
_V2_CONTROLLERS = ("memory", "cpu", "pids")


# ---- cgroup v1 -----------------------------------------------------------------------------

def _v1_mounts(root: str) -> dict[str, tuple[str, str]]:
    """Controller -> (mount point, hierarchy path mounted there), for v1 mounts under `root`."""
    found: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, superopts = fields[sep + 1], fields[sep + 3]
            mount_root, mount_point = fields[3], fields[4]
            if fstype != "cgroup" or not (mount_point == root or mount_point.startswith(root + "/")):
                continue
            for opt in superopts.split(","):
                if opt in _V1_CONTROLLERS and opt not in found:
                    found[opt] = (mount_point, mount_root)
    return found


def _creatable(path: str) -> bool:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.access(path, os.W_OK)


class CgroupV1Backend(CgroupBackend):
    """cgroup v1: the same relative path in the memory, cpu, pids (and cpuacct, freezer) hierarchies.

The freezer hierarchy is used where it is mounted and writable (not in a Docker container,
whose entry point makes only memory, cpu, cpuacct and pids writable): kernels then sit in a
freezer cgroup too, which `sandbox.cgroupkill` freezes before it kills.

    `mounts` maps controller -> mount point (default: read from /proc/self/mountinfo under
    `root`); `own_paths` maps controller -> this process's cgroup path in that hierarchy
    (default: /proc/self/cgroup, made relative to what the mount shows). Tests pass both.
    """

    version = 1

    def __init__(
        self,
        mounts: dict[str, str] | None = None,
        prefix: str = "kernelpool",
        root: str = "/sys/fs/cgroup",
        own_paths: dict[str, str] | None = None,
    ) -> None:
        split_relpath(prefix)
        self.prefix = prefix
        if mounts is None:
            found = _v1_mounts(root)
            mount_points = {c: mp for c, (mp, _) in found.items()}
            mount_roots = {c: mr for c, (_, mr) in found.items()}
        else:
            mount_points = {c: mp for c, mp in mounts.items() if c in _V1_CONTROLLERS}
            mount_roots = {c: "/" for c in mount_points}
        own = own_cgroup_paths() if own_paths is None else own_paths
        self._bases: dict[str, str] = {}
        for controller, mount_point in mount_points.items():
            path = own.get(controller, "/")
            mount_root = mount_roots[controller]
            # a container may see only its own subtree mounted (mount root = its cgroup path)
            if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
                path = path[len(mount_root):]
            self._bases[controller] = os.path.join(mount_point, path.lstrip("/"), prefix)
        if "freezer" in self._bases and not _creatable(self._bases["freezer"]):
            del self._bases["freezer"]  # optional: a read-only freezer must not take the others down
        self.controllers = set(self._bases) & {"memory", "cpu", "pids"}

    def base(self, controller: str) -> str | None:
        """The prefix directory in one hierarchy (e.g. /sys/fs/cgroup/memory/<own>/kernelpool)."""
        return self._bases.get(controller)

    def _dir(self, controller: str, relpath: str) -> str:
        return os.path.join(self._bases[controller], relpath) if relpath else self._bases[controller]

    def _dirs(self, relpath: str) -> list[str]:
        # memory first: `get` looks at the first one
        order = sorted(self._bases, key=_V1_CONTROLLERS.index)
        return [self._dir(c, relpath) for c in order]

    def _make(self, parts: list[str]) -> None:
        for controller in self._bases:
            # level by level: older kernels only accept memory.use_hierarchy before children exist
            for level in range(len(parts) + 1):
                path = self._dir(controller, "/".join(parts[:level]))
                try:
                    os.makedirs(path, exist_ok=True)
                except OSError as exc:
                    raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}", path=path) from exc
                if controller == "memory":
                    # always on since Linux 5.x; older kernels default to flat accounting,
                    # which would let a user's kernels escape the user's aggregate limit
                    with contextlib.suppress(CgroupError):  # refused once children exist; nothing better then
                        write_file(os.path.join(path, "memory.use_hierarchy"), "1")

    def _write_limits(self, relpath: str, limits: Limits) -> None:
        if "memory" in self._bases:
            self._write_memory(self._dir("memory", relpath), limits.memory_bytes)
        if "cpu" in self._bases:
            self._write_cpu(self._dir("cpu", relpath), limits)
        if "pids" in self._bases:
            write_file(os.path.join(self._dir("pids", relpath), "pids.max"), "max" if limits.pids is None else str(limits.pids))

    def _write_memory(self, path: str, memory_bytes: int | None) -> None:
        limit = os.path.join(path, "memory.limit_in_bytes")
        memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
        value = "-1" if memory_bytes is None else str(memory_bytes)
        if not os.path.exists(memsw):  # swap accounting off: swap is not limited at all then
            write_file(limit, value)
            return
        # the kernel insists on limit <= memsw limit at every moment: when growing, raise the
        # memory+swap limit first; when shrinking, lower the memory limit first
        current = read_int(limit) or _V1_UNLIMITED
        target = _V1_UNLIMITED if memory_bytes is None else memory_bytes
        order = [memsw, limit] if target > current else [limit, memsw]
        for file in order:
            write_file(file, value)

    def _write_cpu(self, path: str, limits: Limits) -> None:
        quota = os.path.join(path, "cpu.cfs_quota_us")
        # unlimit first so that changing the period can never leave an invalid quota/period pair
        write_file(quota, "-1")
        write_file(os.path.join(path, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        wanted = limits.cpu_quota_us(period_us=CPU_PERIOD_US)
        if wanted is None:
            return
        # v1 refuses (EINVAL) a quota above an ancestor's; v2 would silently cap it. Cap it
        # the same way here so that "kernel 2 cpus, user 1 cpu" means 1 cpu on both.
        ceiling = self._ancestor_quota(os.path.dirname(path))
        write_file(quota, str(wanted if ceiling is None else min(wanted, ceiling)))

    def _ancestor_quota(self, path: str) -> int | None:
        # up to the hierarchy's root: above the mount point the files stop existing
        ceiling: int | None = None
        while os.path.exists(os.path.join(path, "cpu.cfs_quota_us")):
            quota = read_int(os.path.join(path, "cpu.cfs_quota_us"))
            period = read_int(os.path.join(path, "cpu.cfs_period_us"))
            if quota is not None and quota > 0 and period:
                scaled = quota * CPU_PERIOD_US // period
                ceiling = scaled if ceiling is None else min(ceiling, scaled)
            if path == os.path.dirname(path):
                break
            path = os.path.dirname(path)
        return ceiling

    def _read_limits(self, relpath: str) -> Limits:
        memory = cpus = pids = None
        if "memory" in self._bases:
            value = read_int(os.path.join(self._dir("memory", relpath), "memory.limit_in_bytes"))
            memory = value if value is not None and value < _V1_UNLIMITED else None
        if "cpu" in self._bases:
            quota = read_int(os.path.join(self._dir("cpu", relpath), "cpu.cfs_quota_us"))
            period = read_int(os.path.join(self._dir("cpu", relpath), "cpu.cfs_period_us"))
            cpus = quota / period if quota is not None and quota > 0 and period else None
        if "pids" in self._bases:
            text = (read_file(os.path.join(self._dir("pids", relpath), "pids.max")) or "max").strip()
            pids = None if text == "max" else int(text)
        return Limits(memory, cpus, pids)

    def _oom_kills(self, relpath: str) -> int:
        if "memory" not in self._bases:
            return 0
        return read_keyed(os.path.join(self._dir("memory", relpath), "memory.oom_control"), "oom_kill") or 0

    def _memory_current(self, relpath: str) -> int | None:
        if "memory" not in self._bases:
            return None
        return read_int(os.path.join(self._dir("memory", relpath), "memory.usage_in_bytes"))

    def _cpu_usage(self, relpath: str) -> float | None:
        if "cpuacct" not in self._bases:
            return None
        ns = read_int(os.path.join(self._dir("cpuacct", relpath), "cpuacct.usage"))
        return None if ns is None else ns / 1e9


# ---- cgroup v2 -----------------------------------------------------------------------------

class CgroupV2Backend(CgroupBackend):
    """cgroup v2: one tree at `root`; our cgroups go below `root/own_path/prefix`.

    `own_path` defaults to this process's path from /proc/self/cgroup ("0::/..."); tests pass
    "" with `root` a temp dir holding a simulated cgroup.controllers.
    """

    version = 2

    def __init__(self, root: str = "/sys/fs/cgroup", prefix: str = "kernelpool", own_path: str | None = None) -> None:
        split_relpath(prefix)
        self.prefix = prefix
        if own_path is None:
            own_path = own_cgroup_paths().get("", "/")
        self.own = os.path.join(root, own_path.lstrip("/")).rstrip("/") or "/"
        self.root = os.path.join(self.own, prefix)
        available = (read_file(os.path.join(self.own, "cgroup.controllers")) or "").split()
        self.controllers = set(_V2_CONTROLLERS) & set(available)

    def _dirs(self, relpath: str) -> list[str]:
        return [os.path.join(self.root, relpath) if relpath else self.root]

    def _make(self, parts: list[str]) -> None:
        # every cgroup above the leaf must hand the controllers down to its children
        chain = [self.own, self.root] + [os.path.join(self.root, *parts[: i + 1]) for i in range(len(parts))]
        for i, path in enumerate(chain):
            if i > 0:
                try:
                    os.mkdir(path)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}", path=path) from exc
            if i < len(chain) - 1:
                self._enable_subtree(path)

    def _enable_subtree(self, path: str) -> None:
        control = os.path.join(path, "cgroup.subtree_control")
        enabled = set((read_file(control) or "").replace("+", "").split())
        missing = sorted(self.controllers - enabled, key=_V2_CONTROLLERS.index)
        if not missing:
            return
        value = " ".join("+" + c for c in missing)
        try:
            write_file(control, value)
        except CgroupError as exc:
            cause = exc.__cause__
            if path != self.own or not isinstance(cause, OSError) or cause.errno != errno.EBUSY:
                raise
            # "no internal processes": our own cgroup (a container's root, a systemd unit)
            # still holds processes, the server among them. Move them into a leaf next to our
            # prefix dir, as container init systems do, then try again.
            self._evacuate_own()
            write_file(control, value)

    def _evacuate_own(self) -> None:
        leaf = os.path.join(self.own, f"{self.prefix}-server")
        os.makedirs(leaf, exist_ok=True)
        for pid in read_pids(os.path.join(self.own, "cgroup.procs")):
            try:
                write_file(os.path.join(leaf, "cgroup.procs"), str(pid))
            except CgroupError as exc:
                if not (isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ESRCH):
                    raise

    def _write_limits(self, relpath: str, limits: Limits) -> None:
        path = self._dirs(relpath)[0]
        if "memory" in self.controllers:
            write_file(os.path.join(path, "memory.max"), "max" if limits.memory_bytes is None else str(limits.memory_bytes))
            swap = os.path.join(path, "memory.swap.max")
            if os.path.exists(swap):  # absent without swap accounting
                # a kernel that swaps is slower than one that is killed and restarted
                write_file(swap, "0")
        if "cpu" in self.controllers:
            quota = limits.cpu_quota_us(period_us=CPU_PERIOD_US)
            write_file(os.path.join(path, "cpu.max"), f"{'max' if quota is None else quota} {CPU_PERIOD_US}")
        if "pids" in self.controllers:
            write_file(os.path.join(path, "pids.max"), "max" if limits.pids is None else str(limits.pids))

    def _read_limits(self, relpath: str) -> Limits:
        path = self._dirs(relpath)[0]
        memory = (read_file(os.path.join(path, "memory.max")) or "max").strip()
        cpu = (read_file(os.path.join(path, "cpu.max")) or "max").split()
        pids = (read_file(os.path.join(path, "pids.max")) or "max").strip()
        return Limits(
            None if memory == "max" else int(memory),
            None if cpu[0] == "max" else int(cpu[0]) / int(cpu[1] if len(cpu) > 1 else CPU_PERIOD_US),
            None if pids == "max" else int(pids),
        )

    def _oom_kills(self, relpath: str) -> int:
        return read_keyed(os.path.join(self._dirs(relpath)[0], "memory.events"), "oom_kill") or 0

    def _memory_current(self, relpath: str) -> int | None:
        return read_int(os.path.join(self._dirs(relpath)[0], "memory.current"))

    def _cpu_usage(self, relpath: str) -> float | None:
        usec = read_keyed(os.path.join(self._dirs(relpath)[0], "cpu.stat"), "usage_usec")
        return None if usec is None else usec / 1e6


# ---- detection -----------------------------------------------------------------------------

def detect(prefix: str = "kernelpool", root: str = "/sys/fs/cgroup") -> CgroupBackend | None:
    """The cgroup backend this host supports, or None (kernels then run without limits).

    v2 when `root` is a unified mount whose controllers (for our own cgroup) include memory;
    else v1 when the memory, cpu and pids hierarchies are mounted and writable. Called once
    by kernelpool at start-up.
    """
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        try:
            v2 = CgroupV2Backend(root=root, prefix=prefix)
        except (CgroupError, OSError):
            v2 = None
        if v2 is not None and "memory" in v2.controllers and v2.writable():
            return v2
    try:
        v1 = CgroupV1Backend(prefix=prefix, root=root)
    except (CgroupError, OSError):
        return None
    if {"memory", "cpu", "pids"} <= v1.controllers and v1.writable():
        return v1
    return None
