"""The account files a kernel sees (`sandbox.passwd`): its own user, root and nobody, nothing else."""

from __future__ import annotations

import grp
import pwd

import pytest

from sandbox import Identity
from sandbox.passwd import kernel_files


def test_only_root_the_user_and_nobody() -> None:
    files = kernel_files(Identity("kp-alice", 20001, 20001, "/data/users/alice"))
    users = [line.split(":") for line in files["/etc/passwd"].splitlines()]
    groups = [line.split(":") for line in files["/etc/group"].splitlines()]
    assert [(u[0], u[2], u[3]) for u in users] == [
        (pwd.getpwuid(0).pw_name, "0", "0"), ("kp-alice", "20001", "20001"), (pwd.getpwuid(65534).pw_name, "65534", "65534")]
    assert users[1][5] == "/data/users/alice" and users[1][1] == "x" and len(users[1]) == 7
    assert [(g[0], g[2], g[3]) for g in groups] == [
        (grp.getgrgid(0).gr_name, "0", ""), ("kp-alice", "20001", ""), (grp.getgrgid(65534).gr_name, "65534", "")]
    assert files["/etc/passwd"].endswith("\n") and files["/etc/group"].endswith("\n")


@pytest.mark.parametrize("home", ["/data/a:b/users/alice", "/data/users/al\nroot::0:0::/:/bin/sh"])
def test_a_field_that_would_break_the_format_is_refused(home: str) -> None:
    with pytest.raises(ValueError, match="account entry"):
        kernel_files(Identity("kp-alice", 20001, 20001, home))
