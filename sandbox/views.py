"""Private views of the shared trees: a kernel's own /tmp, /dev/shm, /proc and cgroup files.

Called by `launcher.enter` in the child, as root, after it joined its cgroup and before it drops
to the user's uid, each step a small function in this order:

1. `enter_mount_namespace`: a mount namespace of its own, with every mount made a slave of the
   host's (host mounts and unmounts still reach it; nothing it mounts reaches the host);
2. `hide_mounts`: mounts below the data folders that belong to others (in Docker, each user's
   volume at DATA/users/NAME) are detached, so that not even /proc/self/mountinfo names them;
3. `private_tmpfs` on /tmp and /dev/shm: empty, mode 1777, capped at a size, but for the folders
   the kernel needs (its own working and runtime folders, its interpreter) where they lie below
   (a data folder under /tmp): those are bind-mounted back at the same paths. tmpfs pages are
   charged to the memory cgroup of the process that first touches them, so what a kernel stores
   there counts against its own (and its user's) memory limit; the namespace, and with it the
   tmpfs, goes away with the kernel's last process;
4. `private_proc`: a fresh procfs with `hidepid=invisible`, so that only processes the kernel may
   ptrace (its own uid's, dumpable ones) are listed at all: not other users', not the server's.
   (A PID namespace was the alternative: with the fork server the kernel is already forked, so
   CLONE_NEWPID would apply to its children only, whose first one would become that namespace's
   init; and pids the server tracks would change meaning. hidepid gives the same visibility with
   no change to process bookkeeping. Pid numbers stay global.)
5. `enter_cgroup_namespace`: after joining the cgroup, so that the kernel's cgroup is the root of
   what it sees and /proc/self/cgroup shows "/" for every hierarchy;
6. `private_cgroupfs`: /sys/fs/cgroup replaced by the hierarchies the kernel joined, mounted from
   inside its cgroup namespace, so each shows the kernel's own cgroup as its root (its limits
   and usage are readable; no other cgroup, no user name, no kernel id).

Needs CAP_SYS_ADMIN in the host's user namespace (the server runs as root). Nothing here logs,
locks or allocates much: it runs between fork and exec.
"""

from __future__ import annotations

import os

from sandbox import _libc

CGROUP_ROOT = "/sys/fs/cgroup"
_MNT_FLAGS = _libc.MS_NOSUID | _libc.MS_NODEV


def enter_mount_namespace() -> None:
    _libc.unshare(_libc.CLONE_NEWNS)
    # slave, not private: a volume the host unmounts is not kept busy by a kernel's copy
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_SLAVE, None)


def private_tmpfs(path: str, size_bytes: int, keep: list[str] | tuple[str, ...] = ()) -> None:
    """An empty tmpfs over `path`, with those of the folders `keep` that lie below it bound back."""
    if not os.path.isdir(path):
        raise FileNotFoundError(2, "no such folder to mount a private tmpfs on", path)
    kept = _open_kept(path, keep)
    try:
        _libc.mount("tmpfs", path, "tmpfs", _MNT_FLAGS, f"size={size_bytes},mode=1777")
        for folder, fd in kept:
            # the folders on the way are root's in the tmpfs: only the kept folder itself is shared
            os.makedirs(folder, mode=0o755, exist_ok=True)
            _libc.mount(f"/proc/self/fd/{fd}", folder, None, _libc.MS_BIND | _libc.MS_REC, None)
    finally:
        for _, fd in kept:
            os.close(fd)


def _open_kept(path: str, keep: list[str] | tuple[str, ...]) -> list[tuple[str, int]]:
    below = sorted({os.path.normpath(k) for k in keep if os.path.normpath(k).startswith(path.rstrip("/") + "/")})
    # a folder inside another kept one comes along with it
    outer = [k for k in below if not any(k != o and k.startswith(o + "/") for o in below)]
    kept: list[tuple[str, int]] = []
    try:
        for folder in outer:
            # opened before the tmpfs hides them; O_NOFOLLOW: a kept folder that is a link is refused
            kept.append((folder, os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)))
    except BaseException:
        for _, fd in kept:
            os.close(fd)
        raise
    return kept


def hide_mounts(below: list[str] | tuple[str, ...], keep: list[str] | tuple[str, ...]) -> int:
    """Detach, in this namespace, every mount under the folders `below` but those a kept folder
    needs (itself, what contains it, what it contains): other users' volumes, so that not even
    /proc/self/mountinfo names them. Returns how many mount trees were detached."""
    roots = [os.path.normpath(b).rstrip("/") + "/" for b in below]
    kept = [os.path.normpath(k) for k in keep]
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not any(f" {r}" in text for r in roots):
        return 0  # the usual case: no volume below them at all
    points = sorted({_unescape(line.split()[4]) for line in text.splitlines() if len(line.split()) > 4}, key=len)
    detached: list[str] = []
    for point in points:
        if not any(point.startswith(r) for r in roots):
            continue
        if any(point == k or k.startswith(point + "/") or point.startswith(k + "/") for k in kept):
            continue
        if any(point.startswith(d + "/") for d in detached):
            continue  # went with its parent
        try:
            _libc.umount2(point, _libc.MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (2, 22):  # ENOENT, EINVAL: covered by another mount, out of reach already
                raise
        detached.append(point)
    return len(detached)


def private_proc() -> None:
    # mounted over the host's /proc (whose own submounts, e.g. binfmt_misc, stay hidden below)
    _libc.mount("proc", "/proc", "proc", _MNT_FLAGS | _libc.MS_NOEXEC, "hidepid=invisible")


def enter_cgroup_namespace() -> None:
    _libc.unshare(_libc.CLONE_NEWCGROUP)


def joined_hierarchies(procs_files: list[str], mountinfo: str) -> list[tuple[str, str, str]]:
    """(mount point, fstype, mount data) of each cgroup mount that holds one of `procs_files`.

    Read before anything is unmounted; pure, so that it can be tested on a sample mountinfo.
    """
    mounts: list[tuple[str, str, str]] = []
    for line in mountinfo.splitlines():
        if " - cgroup" not in line:
            continue
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, superopts = fields[sep + 1], fields[sep + 3]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        point = _unescape(fields[4])
        data = ",".join(o for o in superopts.split(",") if o not in ("rw", "ro"))
        mounts.append((point, fstype, data))
    found: list[tuple[str, str, str]] = []
    for procs in procs_files:
        holders = [m for m in mounts if procs.startswith(m[0].rstrip("/") + "/")]
        if holders:
            best = max(holders, key=lambda m: len(m[0]))  # the innermost mount holding the file
            if best not in found:
                found.append(best)
    return found


def private_cgroupfs(procs_files: list[str], root: str = CGROUP_ROOT) -> None:
    """Replace `root` (/sys/fs/cgroup) with the joined hierarchies, seen from the cgroup namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        joined = joined_hierarchies(procs_files, f.read())
    unified = [m for m in joined if m[0].rstrip("/") == root]
    _detach(root)
    flags = _MNT_FLAGS | _libc.MS_NOEXEC
    if unified:
        # cgroup v2: the one tree is the whole of /sys/fs/cgroup. No options: the host's
        # (nsdelegate, ...) are set from the initial cgroup namespace only
        _libc.mount("cgroup2", root, "cgroup2", flags, None)
        return
    # cgroup v1 (or none): a small tmpfs holding one folder per joined hierarchy
    _libc.mount("tmpfs", root, "tmpfs", flags, "size=64k,mode=755")
    for point, fstype, data in joined:
        if os.path.dirname(point.rstrip("/")) != root:
            continue  # a hierarchy mounted elsewhere stays as the host has it
        os.mkdir(point, 0o755)
        _libc.mount(fstype, point, fstype, flags, (data or None) if fstype == "cgroup" else None)


def _detach(path: str) -> None:
    # the host's mounts there (a tmpfs and its cgroup submounts) leave the namespace altogether,
    # so that not even /proc/self/mountinfo lists them
    try:
        _libc.umount2(path, _libc.MNT_DETACH)
    except OSError as exc:
        if exc.errno != 22:  # EINVAL: not a mount point (cgroups mounted in sysfs' own folder)
            raise


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 4].isdigit() and len(text[i + 1:i + 4]) == 3:
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
