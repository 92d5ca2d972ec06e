"""OAuth grants: one person's consent to one client, with its codes and tokens, all stored hashed.

A grant is made when a person allows a client (`kernelpool.web`); its single-use code is
exchanged for an access token (a row of `tokens` with the grant's id, checked like a pasted
token by `users.tokens`) and a refresh token. A refresh token is used once: using it again
(someone kept an old one) revokes the whole grant, and so does a code used twice. Revoking a
grant ends its access tokens at once (`Store.token_by_hash` joins the grant). Also here: the
clients registered by DCR, and one-time sign-in links (`kernelpool users login-link`).
Callers: `kernelpool.mcp.oauth` (the SDK's provider), `kernelpool.web`, the CLI.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from kernelpool.store import Store
from kernelpool.users.tokens import Minted, hash_token, mint_token


@dataclass(frozen=True)
class GrantRow:
    id: str
    user: str
    client_id: str
    client_name: str | None
    scopes: list[str]
    resource: str
    created_at: float
    used_at: float | None
    revoked_at: float | None
    revoked_why: str | None


@dataclass(frozen=True)
class CodeRow:
    grant: GrantRow
    redirect_uri: str
    redirect_explicit: bool
    code_challenge: str
    expires_at: float


@dataclass(frozen=True)
class Issued:
    access: Minted
    access_expires_at: float
    refresh: Minted
    refresh_expires_at: float | None


# the queries are whole literals (no SQL is ever put together from strings)
_GRANT_BY_ID = ("SELECT id, user, client_id, client_name, scopes, resource, created_at, used_at, revoked_at, revoked_why"
                " FROM oauth_grants WHERE id = ?")
_LIVE_GRANT = ("SELECT id, user, client_id, client_name, scopes, resource, created_at, used_at, revoked_at, revoked_why"
               " FROM oauth_grants WHERE id = ? AND revoked_at IS NULL AND user NOT IN (SELECT user FROM removing)")
_GRANTS = ("SELECT id, user, client_id, client_name, scopes, resource, created_at, used_at, revoked_at, revoked_why"
           " FROM oauth_grants WHERE CAST(? AS TEXT) IS NULL OR user = ? ORDER BY created_at")
_GRANT_BY_HASH = ("SELECT id, user, client_id, client_name, scopes, resource, created_at, used_at, revoked_at, revoked_why"
                   " FROM oauth_grants WHERE revoked_at IS NULL AND id IN"
                   " (SELECT grant_id FROM tokens WHERE hash = ? UNION SELECT grant_id FROM oauth_refresh WHERE hash = ?)")


def _grant(row: Any) -> GrantRow:
    values = list(row)
    values[4] = values[4].split()
    return GrantRow(*values)


class GrantStore:
    """The OAuth tables of the store's database (schema migration 4)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def _rows(self, sql: str, *args: Any) -> list[Any]:
        return await self._store.rows(sql, *args)

    async def _write(self, sql: str, *args: Any) -> int:
        return await self._store.write(sql, *args)

    # clients registered by DCR (RFC 7591)
    async def add_client(self, client_id: str, metadata: dict[str, Any]) -> None:
        await self._write("INSERT INTO oauth_clients(client_id, metadata, created_at) VALUES (?, ?, ?)",
                          client_id, json.dumps(metadata), time.time())

    async def client(self, client_id: str) -> dict[str, Any] | None:
        rows = await self._rows("SELECT metadata FROM oauth_clients WHERE client_id = ?", client_id)
        return json.loads(rows[0][0]) if rows else None

    # grants
    async def create_grant(self, user: str, client_id: str, client_name: str | None, scopes: list[str],
                           resource: str) -> str:
        grant_id = secrets.token_hex(4)
        await self._write("INSERT INTO oauth_grants(id, user, client_id, client_name, scopes, resource, created_at)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?)", grant_id, user, client_id, client_name, " ".join(scopes),
                          resource, time.time())
        return grant_id

    async def grant(self, grant_id: str) -> GrantRow | None:
        rows = await self._rows(_GRANT_BY_ID, grant_id)
        return _grant(rows[0]) if rows else None

    async def grants(self, user: str | None = None) -> list[GrantRow]:
        return [_grant(r) for r in await self._rows(_GRANTS, user, user)]

    async def revoke_grant(self, grant_id: str, why: str) -> bool:
        """End a grant: its access tokens are refused from the next check on (within a second), its
        refresh tokens and codes are no use. False when there was no standing grant of that id."""
        async with self._store.access_transaction() as tx:
            changed = await tx.write("UPDATE oauth_grants SET revoked_at = ?, revoked_why = ? WHERE id = ? AND revoked_at IS NULL",
                                     time.time(), why, grant_id)
            await tx.write("DELETE FROM oauth_refresh WHERE grant_id = ?", grant_id)
        return changed > 0

    # codes
    async def issue_code(self, grant_id: str, redirect_uri: str, *, explicit: bool, code_challenge: str,
                         ttl: float) -> str:
        code = secrets.token_urlsafe(32)
        await self._write("INSERT INTO oauth_codes(hash, grant_id, redirect_uri, redirect_explicit, code_challenge, expires_at)"
                          " VALUES (?, ?, ?, ?, ?, ?)", hash_token(code), grant_id, redirect_uri, int(explicit),
                          code_challenge, time.time() + ttl)
        return code

    async def take_code(self, code: str) -> CodeRow | None:
        """The code's grant, marking the code used. A code used before revokes its grant (RFC 6749
        §4.1.2: tokens issued from it are ended) and gives None, as does an unknown one."""
        key = hash_token(code)
        rows = await self._rows("SELECT grant_id, redirect_uri, redirect_explicit, code_challenge, expires_at, used_at"
                                " FROM oauth_codes WHERE hash = ?", key)
        if not rows:
            return None
        grant_id, redirect_uri, explicit, challenge, expires_at, used_at = rows[0]
        if used_at is not None or not await self._write("UPDATE oauth_codes SET used_at = ? WHERE hash = ? AND used_at IS NULL",
                                                        time.time(), key):
            await self.revoke_grant(grant_id, "authorization code used twice")
            return None
        live = await self._rows(_LIVE_GRANT, grant_id)
        if not live:
            return None
        return CodeRow(_grant(live[0]), redirect_uri, bool(explicit), challenge, expires_at)

    # tokens
    async def issue_tokens(self, grant: GrantRow, *, access_ttl: float, refresh_ttl: float | None) -> Issued:
        """A new access token (in `tokens`, bound to the grant's resource) and refresh token."""
        now = time.time()
        # the access token carries its user's key, so that a proxy routes it to the user's replica
        ukey = await self._store.value("SELECT ukey FROM users WHERE name = ?", grant.user)
        access, refresh = mint_token(ukey), mint_token()
        refresh_expires = now + refresh_ttl if refresh_ttl else None
        async with self._store.transaction() as tx:
            await tx.write("INSERT INTO tokens(id, user, hash, created_at, expires_at, grant_id, resource, keyed)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                           access.id, grant.user, access.hash, now, now + access_ttl, grant.id, grant.resource)
            await tx.write("INSERT INTO oauth_refresh(hash, grant_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                           refresh.hash, grant.id, now, refresh_expires)
            await tx.write("UPDATE oauth_grants SET used_at = ? WHERE id = ?", now, grant.id)
        return Issued(access, now + access_ttl, refresh, refresh_expires)

    async def refresh_grant(self, token: str, client_id: str) -> tuple[GrantRow | None, str | None]:
        """(the grant, None) for a live refresh token of `client_id`, which is used up by this call;
        (None, why) otherwise. An old, rotated-out refresh token revokes its grant."""
        key = hash_token(token)
        rows = await self._rows("SELECT r.grant_id, r.expires_at, r.used_at FROM oauth_refresh r JOIN oauth_grants g"
                                " ON g.id = r.grant_id WHERE r.hash = ? AND g.client_id = ?", key, client_id)
        if not rows:
            return None, "unknown refresh token"
        grant_id, expires_at, used_at = rows[0]
        if used_at is not None or not await self._write("UPDATE oauth_refresh SET used_at = ? WHERE hash = ? AND used_at IS NULL",
                                                        time.time(), key):
            await self.revoke_grant(grant_id, "a rotated-out refresh token was used again")
            return None, "refresh token already used: the grant is revoked"
        if expires_at is not None and expires_at <= time.time():
            return None, "refresh token expired"
        live = await self._rows(_LIVE_GRANT, grant_id)
        return (_grant(live[0]), None) if live else (None, "the grant was revoked")

    async def grant_of_token(self, token: str) -> GrantRow | None:
        """The standing grant of an OAuth access or refresh token (for RFC 7009 revocation)."""
        key = hash_token(token)
        rows = await self._rows(_GRANT_BY_HASH, key, key)
        return _grant(rows[0]) if rows else None

    async def prune(self) -> None:
        """Forget what can no longer be used: expired access tokens, codes and refresh tokens, and
        grants revoked, or never exchanged, a day ago. Called by the app's housekeeping."""
        now = time.time()
        async with self._store.transaction() as tx:
            await tx.write("DELETE FROM tokens WHERE grant_id IS NOT NULL AND expires_at < ?", now)
            await tx.write("DELETE FROM oauth_codes WHERE expires_at < ?", now)
            # used refresh tokens stay while they would be valid: one presented again revokes its grant
            await tx.write("DELETE FROM oauth_refresh WHERE expires_at < ?", now)
            await tx.write("DELETE FROM oauth_grants WHERE created_at < ? AND (revoked_at IS NOT NULL OR id NOT IN"
                           " (SELECT grant_id FROM oauth_refresh))", now - 86400)
            await tx.write("DELETE FROM login_links WHERE expires_at < ?", now)

    async def audit(self, user: str | None, event: str, outcome: str = "ok", detail: str | None = None) -> None:
        """One auth event in the audit log (tool `auth.<event>`). Never a token, code or secret."""
        await self._store.audit(user, f"auth.{event}", None, outcome, 0.0, detail)

    # one-time sign-in links
    async def create_link(self, user: str, ttl: float, *, secret: str | None = None) -> str:
        """A one-time sign-in link's secret (random, unless the caller made it: the view's hand-off)."""
        secret = secret or secrets.token_urlsafe(32)
        now = time.time()
        await self._write("INSERT INTO login_links(hash, user, created_at, expires_at) VALUES (?, ?, ?, ?)",
                          hash_token(secret), user, now, now + ttl)
        return secret

    async def link_user(self, secret: str, *, take: bool) -> str | None:
        """The user a sign-in link is for while it is unused and unexpired; `take` uses it up."""
        key = hash_token(secret)
        rows = await self._rows("SELECT user FROM login_links WHERE hash = ? AND used_at IS NULL AND expires_at > ?"
                                " AND user NOT IN (SELECT user FROM removing)", key, time.time())
        if not rows:
            return None
        if take and not await self._write("UPDATE login_links SET used_at = ? WHERE hash = ? AND used_at IS NULL",
                                          time.time(), key):
            return None
        return str(rows[0][0])
