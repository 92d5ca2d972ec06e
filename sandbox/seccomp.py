"""The seccomp filter every kernel runs under: the kernel-level attack surface a tenant never needs.

Built once per process with libseccomp (through `pyseccomp`, a ctypes binding that follows
libseccomp's official Python API) and exported as a classic-BPF program; `launcher.enter` loads
those bytes with one prctl() in the child, last, after the namespaces are set up, the uid is
dropped and no_new_privs is set. So the child calls no libseccomp code at all between fork and
exec, and a fork server builds the program once, before it forks anything.

A deny-list, like the `docker-default` profile's effect on an unprivileged container: everything
runs unless listed. An allow-list of what CPython, ipykernel, numpy, pip and whatever native
wheel a user installs need is a moving target that breaks users in ways they cannot fix; the
calls below are the ones container escapes and kernel exploits start from, and none of them is
needed by notebook work. Blocked calls fail with EPERM, except `clone3`, which fails with ENOSYS:
its flags sit in a struct that seccomp cannot read, and on ENOSYS glibc falls back to `clone`,
whose flags are filtered. Calls of another ABI (i386 `int 0x80`, x32) kill the process: they
would bypass a filter written for the native syscall numbers.
"""

from __future__ import annotations

import errno
import os
import threading

# namespace-creating flags: refused in clone() and unshare(); a thread or fork without them runs
CLONE_NEW_FLAGS = {
    "CLONE_NEWTIME": 0x00000080,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

# always EPERM (names the native ABI lacks are skipped)
BLOCKED = (
    # namespaces and mounts
    "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel interfaces behind most recent local privilege escalations
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "bpf", "perf_event_open",
    # the kernel keyring (shared by uid across containers)
    "keyctl", "add_key", "request_key",
    # other processes' memory and handles
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # file handles bypass path permissions
    "open_by_handle_at", "name_to_handle_at",
    # the machine itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime", "sethostname",
    "setdomainname", "syslog", "quotactl", "quotactl_fd", "lookup_dcookie", "vhangup", "iopl",
    "ioperm", "uselib", "fanotify_init",
)

_lock = threading.Lock()
_program: bytes | None = None


def program() -> bytes:
    """The filter as BPF bytes (built on first call, then cached). Raises OSError if libseccomp
    is missing or refuses a rule."""
    global _program
    with _lock:
        if _program is None:
            _program = _build()
        return _program


def _build() -> bytes:
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # OSError: the binding found no libseccomp.so.2
        raise OSError(errno.ENOSYS, f"libseccomp is not usable: {exc}") from exc

    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    native = sc.system_arch()
    for name in BLOCKED:
        if _exists(sc, native, name):
            f.add_rule(deny, name)
    for bit in CLONE_NEW_FLAGS.values():
        # one rule per flag: MASKED_EQ compares (arg & mask) == value, so "any of these bits"
        # takes one rule each. clone's flags are its first argument on x86-64 and arm64.
        f.add_rule(deny, "unshare", sc.Arg(0, sc.MASKED_EQ, bit, bit))
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("kernelpool-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            f.export_bpf(out)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _exists(sc: object, arch: int, name: str) -> bool:
    try:
        return int(sc.resolve_syscall(arch, name)) >= 0  # type: ignore[attr-defined]
    except (ValueError, OSError):
        return False
