"""Who a person signed in by a team's OpenID Connect provider is: the kernelpool user that the
verified claims of their ID token name, let in by the server's rule, created at a first sign-in
where the settings allow it.

`kernelpool.web.oidc` hands over the claims of an ID token that authlib has already verified
(signature by the provider's keys, issuer, audience, expiry, nonce); this module decides on
those claims alone and never sees a token. A user is created through `UserService.add`, the
same path as `kernelpool users add`: a uid never given before (so a removed user who signs in
again is a new user with a new uid), the account, the folders. What it never does by itself is
hand a removed user's kept files (`users remove` without `--delete-files`) to a new account of
the same name: a provider may give a name to someone else. Callers: `kernelpool.web.oidc`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from kernelpool.config import Settings
from kernelpool.errors import InvalidArgument, KernelpoolError, UserExists
from kernelpool.store import Store, UserRow
from kernelpool.users.accounts import UserService, check_name
from sandbox.errors import SandboxError

ASK = "Ask the administrator of this kernelpool server."


class Refused(Exception):
    """A person not let in: `text` says why to them, `detail` to the audit log (never a token)."""

    def __init__(self, text: str, detail: str, status: int = 403) -> None:
        super().__init__(detail)
        self.text, self.detail, self.status = text, detail, status


@dataclass(frozen=True)
class Admitted:
    row: UserRow
    created: bool
    rule: str  # which rule let them in, for the audit log


def shown(value: Any) -> str:
    """A claim's value as the audit log and pages show it: quoted, and cut."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _verified(claims: dict[str, Any]) -> bool:
    # a boolean by the specification; a few providers send the string
    return claims.get("email_verified") in (True, "true")


def user_name(settings: Settings, claims: dict[str, Any]) -> str:
    """The kernelpool user name the claims give (`oidc_user_claim`, and `oidc_user_domain`), or
    Refused. Nothing is changed in the value (no case folding, no characters replaced): two
    people at the provider never become one user here."""
    claim = settings.oidc_user_claim
    value = claims.get(claim)
    if not isinstance(value, str) or not value:
        raise Refused(f"Your account at the provider gives no {claim!r}, which names your kernelpool user. {ASK}",
                      f"no {claim} claim in the ID token")
    name = value
    domain = settings.oidc_user_domain
    if domain:
        local, at, host = value.rpartition("@")
        if not at or host.lower() != domain.lower():
            raise Refused(f"Your {claim} {value!r} is not an address at {domain}, the domain of this server's users. {ASK}",
                          f"{claim} {shown(value)} is not at {domain}")
        if claim == "email" and not _verified(claims):
            raise Refused(f"The provider has not verified your e-mail address {value!r}. {ASK}",
                          f"email {shown(value)} not verified")
        name = local
    try:
        return check_name(name)
    except InvalidArgument:
        raise Refused(f"{name!r} (your {claim}) is not a valid kernelpool user name: it must be 1 to 31 characters, a "
                      f"lowercase letter, then lowercase letters, digits, '-' or '_'. {ASK}",
                      f"{claim} {shown(value)} is not a valid user name") from None


def rule_admits(settings: Settings, claims: dict[str, Any]) -> str | None:
    """Which rule lets this person in ("e-mail domain example.com", "group staff", or "no rule
    set" when neither oidc_allowed_domains nor oidc_allowed_groups is), or None: not let in.
    A domain counts only with a verified address."""
    domains = {d.lower() for d in settings.oidc_allowed_domains}
    groups = set(settings.oidc_allowed_groups)
    if not domains and not groups:
        return "no rule set"
    email = claims.get("email")
    if domains and isinstance(email, str) and _verified(claims):
        host = email.rpartition("@")[2].lower()
        if host in domains:
            return f"e-mail domain {host}"
    theirs = claims.get(settings.oidc_groups_claim)
    if isinstance(theirs, str):
        theirs = [theirs]
    if groups and isinstance(theirs, list):
        found = sorted(groups.intersection(g for g in theirs if isinstance(g, str)))
        if found:
            return f"group {found[0]}"
    return None


class UpstreamUsers:
    """The users of upstream sign-ins, created through the same `UserService` as `users add`."""

    def __init__(self, settings: Settings, store: Store, users: UserService) -> None:
        self._settings, self._store, self._users = settings, store, users
        self._lock = asyncio.Lock()  # two first sign-ins of one person at once create one user

    async def admit(self, claims: dict[str, Any]) -> Admitted:
        """The user these verified claims sign in as (created if allowed and missing), or Refused;
        a refusal changes nothing."""
        name = user_name(self._settings, claims)
        rule = rule_admits(self._settings, claims)
        if rule is None:
            raise Refused(f"Your account at the provider is not among those allowed to use this kernelpool server. {ASK}",
                          f"{name}: no rule admits them (e-mail {shown(claims.get('email'))}, verified "
                          f"{shown(claims.get('email_verified'))}, {self._settings.oidc_groups_claim} "
                          f"{shown(claims.get(self._settings.oidc_groups_claim))})")
        async with self._lock:
            row = await self._store.get_user(name)
            if row is not None:
                if not await self._store.admits(row.name, row.uid):
                    raise Refused(f"The kernelpool user {name} is being removed. {ASK}", f"{name} is being removed")
                return Admitted(row, created=False, rule=rule)
            if not self._settings.oidc_create_users:
                raise Refused(f"There is no kernelpool user {name}, and this server does not create users at sign-in. {ASK}",
                              f"{name}: no such user (oidc_create_users is off)")
            return Admitted(await self._create(name), created=True, rule=rule)

    def _leftover_files(self, name: str) -> bool:
        # DATA/users/NAME with something in it and no user: a removed user's kept files (an empty
        # folder is the mount point of an emptied per-user volume)
        try:
            with os.scandir(self._users.folder(name)) as entries:
                return next(entries, None) is not None
        except FileNotFoundError:
            return False
        except OSError:
            return True  # not a folder, or unreadable: the administrator looks first

    async def _create(self, name: str) -> UserRow:
        if self._leftover_files(name):
            raise Refused(f"The files of an earlier kernelpool user {name} are still on this server; they are not handed to a "
                          f"new account without the administrator. {ASK}",
                          f"{name}: not created, the folder of a removed {name} is not empty")
        try:
            return await self._users.add(name)
        except UserExists:  # added by the CLI a moment ago
            row = await self._store.get_user(name)
            if row is not None:
                return row
            raise Refused(f"The kernelpool user {name} could not be created just now. Try again.",
                          f"{name}: added and removed meanwhile", 503) from None
        except (KernelpoolError, SandboxError, OSError) as exc:
            raise Refused(f"The kernelpool user {name} could not be created: {exc}. {ASK}",
                          f"{name}: creating the user failed: {exc}", 500) from None
