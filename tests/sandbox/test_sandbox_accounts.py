"""Real passwd/group entries (root only); every account made here is removed in teardown."""

from __future__ import annotations

import grp
import pwd

import pytest

from sandbox import (
    AccountError,
    Identity,
    account_exists,
    can_manage_accounts,
    ensure_account,
    remove_account,
)


@pytest.fixture(autouse=True)
def _needs_shadow_utils(root_only: None) -> None:
    if not can_manage_accounts():
        pytest.skip("needs useradd/userdel/groupadd/groupdel")


def test_create_idempotent_remove(make_account: list[Identity], spare_uids: tuple[int, int]) -> None:
    uid = spare_uids[0]
    ident = Identity(name=f"kptest-{uid}", uid=uid, gid=uid, home=f"/tmp/kptest-home-{uid}")
    make_account.append(ident)
    ensure_account(ident)
    entry = pwd.getpwnam(ident.name)
    assert (entry.pw_uid, entry.pw_gid, entry.pw_dir) == (uid, uid, ident.home)
    assert entry.pw_shell.endswith(("nologin", "false"))
    assert grp.getgrnam(ident.name).gr_gid == uid
    assert account_exists(ident.name)
    ensure_account(ident)  # idempotent
    remove_account(ident.name)
    assert not account_exists(ident.name)
    with pytest.raises(KeyError):
        grp.getgrnam(ident.name)
    remove_account(ident.name)  # idempotent


def test_conflicts_are_refused(make_account: list[Identity], spare_uids: tuple[int, int]) -> None:
    uid, other = spare_uids
    ident = Identity(name=f"kptest-{uid}", uid=uid, gid=uid, home="/tmp/x")
    make_account.append(ident)
    ensure_account(ident)
    # same name, another uid
    with pytest.raises(AccountError, match="exists with uid"):
        ensure_account(Identity(name=ident.name, uid=other, gid=uid, home="/tmp/x"))
    # same name, another gid
    with pytest.raises(AccountError, match="gid"):
        ensure_account(Identity(name=ident.name, uid=uid, gid=other, home="/tmp/x"))
    # another name, a uid already taken
    intruder = Identity(name=f"kptest-{other}", uid=uid, gid=other, home="/tmp/x")
    make_account.append(intruder)
    with pytest.raises(AccountError, match=f"uid {uid} already belongs"):
        ensure_account(intruder)
    assert not account_exists(intruder.name)
    assert pwd.getpwnam(ident.name).pw_uid == uid


@pytest.mark.parametrize("name", ["-r", "Root", "a b", "x" * 40, "", "kp;rm"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(AccountError, match="invalid account name"):
        ensure_account(Identity(name=name, uid=61999, gid=61999, home="/tmp/x"))
