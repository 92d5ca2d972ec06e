"""The account files a kernel sees: /etc/passwd and /etc/group with its own user, root and nobody.

The host's files list every kernelpool user: name, uid and folder. A kernel gets these instead
(`LaunchSpec.replaced_files`, bound over the host's by `views.replace_files`), so that
`getpwuid`, `whoami`, `id`, `~` and `getpass.getuser()` still work for its own user and nothing
names another. Rendered in the server before the fork: root's and nobody's entries come from
the host through NSS, which loads modules and takes locks, and must not run between fork and
exec. Callers: kernelpool's kernel launcher, once per kernel.
"""

from __future__ import annotations

import functools
import grp
import pwd

from sandbox.accounts import _nologin
from sandbox.identity import Identity

NOBODY = 65534
_DEFAULT_USERS = {0: ("root", "root", "/root", "/bin/sh"), NOBODY: ("nobody", "nobody", "/nonexistent", "/usr/sbin/nologin")}
_DEFAULT_GROUPS = {0: "root", NOBODY: "nogroup"}


def kernel_files(identity: Identity) -> dict[str, str]:
    """{"/etc/passwd": ..., "/etc/group": ...} for a kernel of `identity`: root, the identity's own
    user and group (home: its folder), nobody/nogroup; no group lists members. Raises ValueError
    for a field that would break the file's format (a ':' or a line break)."""
    users = [_host_user(0)]
    groups = [_host_group(0)]
    if identity.uid not in (0, NOBODY):
        users.append(_line(identity.name, "x", identity.uid, identity.gid, "", identity.home, _nologin()))
    if identity.gid not in (0, NOBODY):
        groups.append(_line(identity.name, "x", identity.gid, ""))
    users.append(_host_user(NOBODY))
    groups.append(_host_group(NOBODY))
    return {"/etc/passwd": "".join(users), "/etc/group": "".join(groups)}


@functools.cache
def _host_user(uid: int) -> str:
    try:
        e = pwd.getpwuid(uid)
        fields = (e.pw_name, "x", uid, e.pw_gid, e.pw_gecos, e.pw_dir, e.pw_shell)
    except KeyError:
        name, gecos, home, shell = _DEFAULT_USERS[uid]
        fields = (name, "x", uid, uid, gecos, home, shell)
    return _line(*fields)


@functools.cache
def _host_group(gid: int) -> str:
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = _DEFAULT_GROUPS[gid]
    return _line(name, "x", gid, "")  # no members: they would name users


def _line(*fields: str | int) -> str:
    text = [str(f) for f in fields]
    bad = [t for t in text if ":" in t or "\n" in t or "\r" in t]
    if bad:
        raise ValueError(f"cannot write an account entry with {bad[0]!r}: ':' and line breaks have a meaning there")
    return ":".join(text) + "\n"
