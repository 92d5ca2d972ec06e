"""Private views of the shared trees: a kernel's own /tmp, /dev/shm, /proc, /sys, cgroup files,
SysV IPC and POSIX message queues, pseudo-terminals, and account files.

Called by `launcher.enter` in the child, as root, after it joined its cgroup and its network
namespace and before it drops to the user's uid, each step a small function in this order:

1. `enter_mount_namespace`: a mount namespace of its own, with every mount made a slave of the
   host's (host mounts and unmounts still reach it; nothing it mounts reaches the host);
2. `enter_ipc_namespace`: SysV shared memory, semaphores and message queues, and POSIX message
   queues, of its own: another user's kernel cannot list or attach them (`/proc/sysvipc`, `ipcs`),
   nor exhaust the limits this kernel's `shmget` counts against. One namespace per kernel, not per
   user: it goes away with the kernel's last process, and every segment in it with it, so nothing
   outlives the kernel (no segment survives its stop, its user's removal or a server restart), and
   nothing needs removing; a user's kernels have no need to share SysV objects (files in their
   folder do that). Segment pages are charged to the memory cgroup of the process that touches
   them, and messages and semaphores are kernel memory charged to the caller's: all of it counts
   against the kernel's (and its user's) memory limit;
3. `hide_mounts`: mounts below the data folders that belong to others (in Docker, each user's
   volume at DATA/users/NAME) are detached, so that not even /proc/self/mountinfo names them;
4. `private_tmpfs` on /tmp: empty, mode 1777, capped at a size, but for the folders the kernel
   needs (its own working and runtime folders, its interpreter) where they lie below (a data
   folder under /tmp): those are bind-mounted back at the same paths. tmpfs pages are charged to
   the memory cgroup of the process that first touches them, so what a kernel stores there counts
   against its own (and its user's) memory limit; the namespace, and with it the tmpfs, goes away
   with the kernel's last process;
5. `replace_files`: /etc/passwd and /etc/group with only the kernel's own user, root and nobody
   (rendered by the server, `sandbox.passwd`), and the other account files that list every user
   (`MASKED_FILES`: the backups, subordinate ids) empty: a read-only overlay on /etc whose top
   layer holds them (in a scratch tmpfs of root's, detached at once) over the host's live /etc;
6. `private_tmpfs` on /dev/shm, as /tmp; `private_mqueue`: a POSIX message queue file system of
   this IPC namespace over each mqueue mount (/dev/mqueue in Docker); `private_devpts`: a
   pseudo-terminal instance of its own on /dev/pts (`ls /dev/pts` showed the uids of other
   users' terminals);
7. `private_proc`: a fresh procfs with `hidepid=invisible`, so that only processes the kernel may
   ptrace (its own uid's, dumpable ones) are listed at all: not other users', not the server's.
   (A PID namespace was the alternative: with the fork server the kernel is already forked, so
   CLONE_NEWPID would apply to its children only, whose first one would become that namespace's
   init; and pids the server tracks would change meaning. hidepid gives the same visibility with
   no change to process bookkeeping. Pid numbers stay global.) `limit_shm` then caps the IPC
   namespace's shared memory (its defaults allow segments of 16 EiB);
8. `private_sysfs`: a fresh read-only sysfs, mounted from inside the kernel's network namespace,
   so /sys/class/net lists that namespace's links only (the host's list named other users' links
   and their traffic); the host's mounts below /sys (debugfs, securityfs, bpf, ...) are not there;
9. `enter_cgroup_namespace`: after joining the cgroup, so that the kernel's cgroup is the root of
   what it sees and /proc/self/cgroup shows "/" for every hierarchy;
10. `private_cgroupfs`: /sys/fs/cgroup replaced by the hierarchies the kernel joined, mounted from
   inside its cgroup namespace, so each shows the kernel's own cgroup as its root (its limits
   and usage are readable; no other cgroup, no user name, no kernel id);
11. `hide_dirs`: host folders that name other users (`HIDDEN_DIRS`: /run/netns, whose files are
   named by uid; the sockets of daemons that answer user look-ups from the host's files) lose
   their mounts and are covered by an empty read-only tmpfs.

Needs CAP_SYS_ADMIN in the host's user namespace (the server runs as root). Nothing here logs,
locks or allocates much: it runs between fork and exec.
"""

from __future__ import annotations

import os

from sandbox import _libc

CGROUP_ROOT = "/sys/fs/cgroup"
_MNT_FLAGS = _libc.MS_NOSUID | _libc.MS_NODEV
_HIDDEN_FLAGS = _MNT_FLAGS | _libc.MS_NOEXEC | _libc.MS_RDONLY
# host folders whose entries name other users: network namespace files (PREFIX-UID), and the sockets
# of systemd-userdbd and nscd, which answer any user look-up from the host's account files
HIDDEN_DIRS = ("/run/netns", "/run/systemd/userdb", "/run/nscd")
# account files that list every user besides /etc/passwd and /etc/group, which a kernel reads empty:
# shadow-utils' backups (world-readable, one change behind) and the subordinate id ranges.
# /etc/shadow and /etc/gshadow are not here: they are root:shadow 0640, unreadable to a kernel
MASKED_FILES = ("/etc/passwd-", "/etc/group-", "/etc/subuid", "/etc/subuid-", "/etc/subgid", "/etc/subgid-")
PTY_MAX = 64  # pseudo-terminals one kernel may hold at once (`!cmd` in IPython takes one while it runs)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def enter_mount_namespace() -> None:
    _libc.unshare(_libc.CLONE_NEWNS)
    # slave, not private: a volume the host unmounts is not kept busy by a kernel's copy
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_SLAVE, None)


def enter_ipc_namespace() -> None:
    _libc.unshare(_libc.CLONE_NEWIPC)


def read_mountinfo() -> str:
    """This namespace's mount table, read once by `launcher.enter` for the steps that need it."""
    # os.read, not open(): half the time in a freshly forked child, where every step counts
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def private_tmpfs(path: str, size_bytes: int, *, keep: list[str] | tuple[str, ...] = ()) -> None:
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


def _open_kept(path: str, keep: list[str] | tuple[str, ...], kind: int = os.O_DIRECTORY) -> list[tuple[str, int]]:
    below = sorted({os.path.normpath(k) for k in keep if os.path.normpath(k).startswith(path.rstrip("/") + "/")})
    # a folder inside another kept one comes along with it
    outer = [k for k in below if not any(k != o and k.startswith(o + "/") for o in below)]
    kept: list[tuple[str, int]] = []
    try:
        for folder in outer:
            # opened before the tmpfs hides them; O_NOFOLLOW: a kept folder that is a link is refused
            kept.append((folder, os.open(folder, os.O_PATH | kind | os.O_NOFOLLOW | os.O_CLOEXEC)))
    except BaseException:
        for _, fd in kept:
            os.close(fd)
        raise
    return kept


def hide_mounts(below: list[str] | tuple[str, ...], keep: list[str] | tuple[str, ...], mountinfo: str | None = None) -> int:
    """Detach, in this namespace, every mount under the folders `below` but those a kept folder
    needs (itself, what contains it, what it contains): other users' volumes, so that not even
    /proc/self/mountinfo names them. Returns how many mount trees were detached."""
    roots = [os.path.normpath(b).rstrip("/") + "/" for b in below]
    kept = [os.path.normpath(k) for k in keep]
    text = read_mountinfo() if mountinfo is None else mountinfo
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


def limit_shm(max_bytes: int) -> None:
    """Cap the IPC namespace's SysV shared memory at `max_bytes`, per segment and in all (a fresh
    namespace allows almost 2**64 of each; the pages are charged to the memory cgroup anyway, but
    a segment larger than the kernel may hold then fails at `shmget`, not in the OOM killer)."""
    for name, value in (("shmmax", max_bytes), ("shmall", -(-max_bytes // _PAGE))):
        # per IPC namespace: these files act on the writer's, and only root may write them
        fd = os.open(f"/proc/sys/kernel/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)


def private_mqueue(mountinfo: str) -> None:
    """A mqueue file system of this IPC namespace over each one the host has mounted (Docker's
    /dev/mqueue), which would list the host's POSIX message queues."""
    if " - mqueue " not in mountinfo:
        return  # the usual case outside containers
    for point in _mount_points(mountinfo, "mqueue"):
        _detach(point)
        _libc.mount("mqueue", point, "mqueue", _MNT_FLAGS | _libc.MS_NOEXEC, None)


def private_devpts(*, max_ptys: int = PTY_MAX) -> None:
    """A pseudo-terminal instance of its own: /dev/pts lists only this kernel's terminals, at most
    `max_ptys` at once. /dev/ptmx needs no bind: since Linux 4.7 it opens the instance mounted at
    the /dev/pts beside it."""
    _libc.mount("devpts", "/dev/pts", "devpts", _libc.MS_NOSUID | _libc.MS_NOEXEC,
                f"newinstance,ptmxmode=0666,mode=0620,max={max_ptys}")


def private_sysfs() -> None:
    """A fresh sysfs over /sys, read-only, showing the network devices of the calling process's
    network namespace only. The host's /sys goes with every mount below it (cgroups included:
    read `joined_hierarchies` first)."""
    _detach("/sys")
    _libc.mount("sysfs", "/sys", "sysfs", _HIDDEN_FLAGS, None)


def hide_dirs(dirs: list[str] | tuple[str, ...], mountinfo: str) -> list[str]:
    """Detach every mount at or below each existing folder of `dirs` (links resolved), then cover
    it with an empty read-only tmpfs; returns the folders covered. Root's folders of the host only:
    they are resolved as root."""
    covered: list[str] = []
    points = sorted(_mount_points(mountinfo), key=len)
    for folder in dict.fromkeys(os.path.realpath(d) for d in dirs if os.path.isdir(d)):
        detached: list[str] = []
        for point in points:  # top-most first: a detached mount takes the ones below it along
            if point != folder and not point.startswith(folder + "/"):
                continue
            if any(point.startswith(d + "/") for d in detached):
                continue
            try:
                _libc.umount2(point, _libc.MNT_DETACH)
            except OSError as exc:
                if exc.errno not in (2, 22):  # ENOENT, EINVAL: out of reach already
                    raise
            detached.append(point)
        _libc.mount("tmpfs", folder, "tmpfs", _HIDDEN_FLAGS, "size=4k,mode=755")
        covered.append(folder)
    return covered


def replace_files(contents: dict[str, str], masked: list[str] | tuple[str, ...], mountinfo: str,
                  scratch: str = "/dev/shm") -> None:  # noqa: S108 (in the kernel's own mount namespace)
    """Show each text of `contents` at its path, and an empty file at each path of `masked`, over a
    live view of the rest of the folder that holds them (/etc): a read-only overlay whose top layer,
    root's, holds these files and whose lower layer is the host's folder. Not bind mounts over the
    files: shadow-utils replaces /etc/passwd by renaming a new one over it at every account change,
    and the kernel then detaches every mount on the old file, in every namespace, which would show
    the host's new file. Mounts below the folder (Docker's /etc/hosts, /etc/resolv.conf) are bound
    back on top. The top layers live in a small tmpfs on `scratch` (a folder covered later anyway),
    detached once the overlays hold them, so no other path leads to them."""
    folders: dict[str, dict[str, bytes]] = {}
    for path, text in [*contents.items(), *((m, "") for m in masked)]:
        folders.setdefault(os.path.dirname(path), {}).setdefault(os.path.basename(path), text.encode())
    folders = {d: files for d, files in folders.items() if os.path.isdir(d)}
    if not folders:
        return
    _libc.mount("tmpfs", scratch, "tmpfs", _MNT_FLAGS | _libc.MS_NOEXEC, "size=1m,mode=700")
    try:
        for i, (folder, files) in enumerate(folders.items()):
            if any(c in folder for c in ":,\\"):
                raise ValueError(f"cannot lay an overlay on {folder!r}: ':', ',' and '\\' separate its options")
            layer = f"{scratch}/{i}"
            _layer(layer, folder, files)
            # but not a mount over one of these files (`-v /etc/passwd:/etc/passwd` would name everyone)
            ours = {f"{folder.rstrip('/')}/{name}" for name in files}
            below = [p for p in _mount_points(mountinfo) if p.startswith(folder.rstrip("/") + "/") and p not in ours]
            kept = _open_kept(folder, below, kind=0)  # files or folders; opened before the overlay hides them
            try:
                _libc.mount("overlay", folder, "overlay", _MNT_FLAGS | _libc.MS_RDONLY, f"lowerdir={layer}:{folder}")
                for point, fd in kept:
                    _libc.mount(f"/proc/self/fd/{fd}", point, None, _libc.MS_BIND | _libc.MS_REC, None)
            finally:
                for _, fd in kept:
                    os.close(fd)
    finally:
        _libc.umount2(scratch, _libc.MNT_DETACH)


def _layer(layer: str, folder: str, files: dict[str, bytes]) -> None:
    # the merged folder takes its owner and mode from the top layer's: the host folder's
    info = os.stat(folder)
    os.mkdir(layer, 0o700)
    empty: str | None = None
    for name, data in files.items():
        if not data and empty is not None:
            os.link(empty, f"{layer}/{name}")  # one syscall, not three: each empty file is the same
            continue
        fd = os.open(f"{layer}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        empty = empty or (f"{layer}/{name}" if not data else None)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask this process inherited
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    os.chown(layer, info.st_uid, info.st_gid)
    os.chmod(layer, info.st_mode & 0o7777)


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


def private_cgroupfs(procs_files: list[str], root: str = CGROUP_ROOT, mountinfo: str | None = None) -> None:
    """Replace `root` (/sys/fs/cgroup) with the joined hierarchies, seen from the cgroup namespace.
    `mountinfo`: the mount table from before `private_sysfs`, which took the host's cgroup mounts away."""
    joined = joined_hierarchies(procs_files, read_mountinfo() if mountinfo is None else mountinfo)
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


def _mount_points(mountinfo: str, fstype: str | None = None) -> list[str]:
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and "-" in fields[5:] and (fstype is None or fields[fields.index("-", 5) + 1] == fstype):
            points.append(_unescape(fields[4]))
    return points


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
