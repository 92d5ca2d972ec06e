"""Real passwd/group entries for the users whose kernels we run.

A kernel only needs a uid to run, but a passwd entry makes `ls -l`, `whoami`, `getpass` and
`os.path.expanduser` inside the kernel behave. Callers: kernelpool's user service (add,
remove, start-up). Everything shells out to shadow-utils, which takes the locks on
/etc/passwd and /etc/group for us.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess

from sandbox.errors import AccountError
from sandbox.identity import Identity

# useradd accepts more, but a name that starts with '-' would be read as an option
_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def _tool(name: str) -> str | None:
    # the server's PATH may lack the sbin directories (e.g. started from a user shell)
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN)


def _nologin() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"):
        if os.path.exists(shell):
            return shell
    return "/bin/false"


def _run(tool: str, args: list[str], name: str) -> subprocess.CompletedProcess[str]:
    path = _tool(tool)
    if path is None:
        raise AccountError(f"{tool} not found; cannot manage account {name!r}", path=name)
    return subprocess.run([path, *args],  # noqa: S603 (the tool from fixed folders; names checked by _check_name)
                          capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise AccountError(
            f"invalid account name {name!r}: use a lowercase letter or '_', then up to 31 of [a-z0-9_-]", path=name
        )


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group(name: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def _check_consistent(identity: Identity) -> bool:
    """True if the account exists exactly as asked; False if it (or its group) is missing.

    Raises AccountError when something exists that contradicts the identity, because reusing
    it would run one user's kernels as someone else.
    """
    name, uid, gid = identity.name, identity.uid, identity.gid
    group = _group(name)
    if group is not None and group.gr_gid != gid:
        raise AccountError(f"group {name!r} exists with gid {group.gr_gid}, not {gid}", path=name)
    if group is None:
        try:
            other = grp.getgrgid(gid)
            raise AccountError(f"gid {gid} already belongs to group {other.gr_name!r}, not {name!r}", path=name)
        except KeyError:
            pass
    user = _user(name)
    if user is not None:
        if user.pw_uid != uid:
            raise AccountError(f"account {name!r} exists with uid {user.pw_uid}, not {uid}", path=name)
        if user.pw_gid != gid:
            raise AccountError(f"account {name!r} exists with gid {user.pw_gid}, not {gid}", path=name)
    else:
        try:
            other_user = pwd.getpwuid(uid)
            raise AccountError(f"uid {uid} already belongs to account {other_user.pw_name!r}, not {name!r}", path=name)
        except KeyError:
            pass
    return user is not None and group is not None


def ensure_account(identity: Identity) -> None:
    """Create the group and user for `identity` unless they already exist exactly like that.

    Idempotent. Raises AccountError if the name exists with another uid/gid, if the uid or gid
    belongs to another name, or if useradd/groupadd fail. The home directory is not created
    (-M): kernelpool prepares it with `prepare_dir`.
    """
    _check_name(identity.name)
    if _check_consistent(identity):
        return
    name = identity.name
    if _group(name) is None:
        done = _run("groupadd", ["-g", str(identity.gid), name], name)
        # another thread or process may have created it meanwhile: re-check before complaining
        if done.returncode != 0 and _group(name) is None:
            raise AccountError(f"groupadd {name!r} failed: {done.stderr.strip() or done.returncode}", path=name)
    if _user(name) is None:
        done = _run(
            "useradd",
            ["-u", str(identity.uid), "-g", str(identity.gid), "-M", "-d", identity.home, "-s", _nologin(), "-N", name],
            name,
        )
        if done.returncode != 0 and _user(name) is None:
            raise AccountError(f"useradd {name!r} failed: {done.stderr.strip() or done.returncode}", path=name)
    if not _check_consistent(identity):
        raise AccountError(f"account {name!r} still missing after useradd", path=name)


def remove_account(name: str, *, force: bool = False) -> None:
    """Delete the user and its group; idempotent. The home directory is left alone.

    userdel refuses while processes of that uid run, zombies included: end them first
    (`sandbox.tasks.kill_tasks`), then `force` lets the zombies their parents have not reaped yet pass.
    """
    _check_name(name)
    if _user(name) is not None:
        done = _run("userdel", ["-f", name] if force else [name], name)
        if done.returncode != 0 and _user(name) is not None:
            raise AccountError(f"userdel {name!r} failed: {done.stderr.strip() or done.returncode}", path=name)
    if _group(name) is not None:
        done = _run("groupdel", [name], name)
        if done.returncode != 0 and _group(name) is not None:
            raise AccountError(f"groupdel {name!r} failed: {done.stderr.strip() or done.returncode}", path=name)


def id_in_use(number: int) -> bool:
    """Whether the host already gives `number` to a user (as uid) or a group (as gid)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(number)
            return True
        except KeyError:
            pass
    return False


def account_exists(name: str) -> bool:
    """True if a passwd entry with this name exists."""
    return _user(name) is not None


def can_manage_accounts() -> bool:
    """True if we are root and shadow-utils are installed (checked by kernelpool at start-up)."""
    return os.geteuid() == 0 and all(_tool(t) is not None for t in ("useradd", "userdel", "groupadd", "groupdel"))
