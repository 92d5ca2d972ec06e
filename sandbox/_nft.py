"""nftables through the `nft` command, one short process per change.

Used by `sandbox.network` for the kernels' firewall table. Not libnftables in the server's own
process (as before 2026-12): libnftables (1.0.6, Debian 12) waits on its netlink socket with
`select()`, and glibc aborts a process whose descriptor is past FD_SETSIZE (1024). A server with
a few hundred kernels holds more descriptors than that, so the next user's namespace killed the
whole server ("bit out of range 0 - FD_SETSIZE on fd_set"). `nft` starts with only the
descriptors it needs. Changes are rare (one per user's namespace), so a process each costs
nothing that matters. Debian ships `nft` in the `nftables` package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

_TIMEOUT = 30.0


class NftError(Exception):
    """nft refused a command, or could not run; the message is its own error text."""


def _binary() -> str | None:
    # the system's own first: the server runs as root, and its PATH is not ours to trust
    for candidate in ("/usr/sbin/nft", "/sbin/nft"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nft")


def available() -> str | None:
    """None if the `nft` command is there, else why not."""
    return None if _binary() is not None else "the nft command is not installed (Debian: the 'nftables' package)"


def run(commands: str) -> None:
    """Run nft commands given as text (one transaction: all or nothing); raises NftError."""
    _nft(["-f", "-"], commands)


def list_json(what: str) -> list[dict[str, Any]]:
    """`list <what>` as nft's JSON objects (the "nftables" array)."""
    out = _nft(["-j", "list", *what.split()])
    data = json.loads(out) if out.strip() else {"nftables": []}
    return list(data.get("nftables", []))


def _nft(args: list[str], stdin: str | None = None) -> str:
    binary = _binary()
    if binary is None:
        raise NftError(available() or "nft unavailable")
    try:
        done = subprocess.run([binary, *args],  # noqa: S603 (nft from fixed folders; the rules are ours)
                              input=stdin, capture_output=True, text=True, timeout=_TIMEOUT,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError) as exc:
        raise NftError(f"nft could not run: {exc}") from None
    if done.returncode != 0:
        raise NftError(done.stderr.strip() or f"nft failed ({done.returncode}): {' '.join(args)[:200]}")
    return done.stdout
