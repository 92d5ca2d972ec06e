"""Docker's DOCKER-USER chain, through the `iptables` command (iptables has no library interface).

Where Docker runs, the iptables FORWARD policy is DROP: each kernel link of "egress" mode is
then also accepted in DOCKER-USER, with a comment naming the server's prefix, so that start-up
can clear what a crashed server left. Used by `sandbox.network` only.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

from sandbox.errors import NetworkError

CHAIN = "DOCKER-USER"


def iptables(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `iptables -w 10 ARGS`; FileNotFoundError when there is no iptables command."""
    exe = shutil.which("iptables")
    if exe is None:
        raise FileNotFoundError("iptables")
    return subprocess.run([exe, "-w", "10", *args],  # noqa: S603 (iptables from PATH; the rules are ours)
                          capture_output=True, text=True, timeout=30, check=False)


def chain_exists() -> bool:
    """True where Docker runs (its chain is there)."""
    try:
        return iptables("-n", "-L", CHAIN).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def change_rules(op: str, link: str, comment: str, *, missing_ok: bool = False) -> None:
    """Insert ("-I") or delete ("-D") the two DOCKER-USER rules that let `link`'s traffic be forwarded."""
    rules = [
        ["-i", link, "-m", "comment", "--comment", comment, "-j", "ACCEPT"],
        ["-o", link, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-m", "comment", "--comment", comment,
         "-j", "ACCEPT"],
    ]
    for rule in rules:
        try:
            out = iptables(op, CHAIN, *rule)
        except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
            if missing_ok:
                return
            raise NetworkError(f"could not change Docker's {CHAIN} chain: {exc}") from exc
        if out.returncode != 0 and not missing_ok:
            raise NetworkError(f"iptables {op} {CHAIN} {' '.join(rule)}: {out.stderr.strip()}")


def remove_all(comment: str) -> None:
    """Delete every DOCKER-USER rule carrying `comment` (what a crashed server left)."""
    if not chain_exists():
        return
    listing = iptables("-S", CHAIN).stdout.splitlines()
    for line in listing:
        words = shlex.split(line)
        if words[:2] == ["-A", CHAIN] and comment in words:
            iptables("-D", *words[1:])


def docker_rules(comment: str) -> list[str]:
    """The DOCKER-USER rules carrying `comment` (for tests and `kernelpool doctor`)."""
    if not chain_exists():
        return []
    return [line for line in iptables("-S", CHAIN).stdout.splitlines() if comment in line]
