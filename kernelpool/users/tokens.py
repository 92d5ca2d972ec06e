"""Bearer tokens: minted here, stored only as SHA-256 hashes, checked against the store.

A token is `kp_<id>_<secret>`: the id names it for listing and revoking; the secret is 32
random bytes, so a fast hash is enough (nothing to brute-force). Every token kernelpool hands
out, pasted or OAuth (access and refresh, `users.grants`), is made by `mint_token`, so that its
format can change in one place.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from kernelpool.store import Store

# the one OAuth scope a token of kernelpool's carries (the MCP resource and the authorization server
# name it alike)
SCOPE = "kernelpool"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Minted:
    """A new token: its id (for listing and revoking), the token itself (handed out once, never
    stored) and its hash (what is stored)."""

    id: str
    token: str
    hash: str


def mint_token(user_key: str | None = None) -> Minted:
    """A new opaque `kp_` token: `kp_<id>_<user key>_<secret>`, or `kp_<id>_<secret>` without a
    key (refresh tokens, which only the token endpoint sees). The user key is the third field
    split on `_`, where a proxy finds it (HAProxy: `word(3,_)`; see docs/scale-out.md); the id
    stays the second. Callers: `create_token` (pasted tokens), `users.grants` (OAuth)."""
    token_id = secrets.token_hex(4)
    key = f"{user_key}_" if user_key else ""
    token = f"kp_{token_id}_{key}{secrets.token_urlsafe(32)}"
    return Minted(token_id, token, hash_token(token))


async def create_token(store: Store, user: str, expires_at: float | None = None) -> tuple[str, str]:
    """Mint a token for `user`, with the user's key; returns (token id, token). The token is never stored."""
    row = await store.get_user(user)
    minted = mint_token(row.ukey if row is not None else None)
    await store.add_token(minted.id, user, minted.hash, expires_at, keyed=bool(row and row.ukey))
    return minted.id, minted.token


@dataclass(frozen=True)
class Verdict:
    """What a presented token is worth: the user it names, or why it is refused."""

    user: str | None
    expires_at: float | None = None
    refused: str | None = None  # "unknown", "revoked" or "expired"
    uid: int | None = None  # the user's: a name removed and added again comes back with another
    grant_id: str | None = None  # an OAuth access token's grant; None for a pasted token
    resource: str | None = None  # the resource an OAuth access token was issued for (RFC 8707)
    home: str | None = None  # the user's home replica (None: not placed, or a single node)


async def check_token(store: Store, token: str) -> Verdict:
    """Look a presented token up by its hash: a revocation takes effect on the next request."""
    row = await store.token_by_hash(hash_token(token))
    if row is None:
        return Verdict(None, refused="unknown")
    if row.revoked_at is not None:
        return Verdict(None, refused="revoked")
    if row.expires_at is not None and row.expires_at <= time.time():
        return Verdict(None, refused="expired")
    return Verdict(row.user, row.expires_at, uid=row.uid, grant_id=row.grant_id, resource=row.resource, home=row.home)


class TokenChecker:
    """`check_token` with a memory of accepted tokens, so that a request reads no table.

    Every `recheck` seconds (on the next request) the store's change mark is read; when it moved
    (a revocation or a user removal, by the CLI or by this server), everything remembered is
    forgotten. A revoked token is thus refused within `recheck` seconds plus one query, and an
    expired one at once (its expiry is kept with it). Refusals are not remembered.
    """

    def __init__(self, store: Store, *, recheck: float = 0.5, max_entries: int = 10_000) -> None:
        self._store = store
        self._recheck = recheck
        self._max = max_entries
        self._known: dict[str, Verdict] = {}
        self._mark: tuple[int, ...] | None = None
        self._checked_at = float("-inf")
        self._generation = 0  # bumped at each forgetting: a lookup that straddled one is not kept

    async def check(self, token: str) -> Verdict:
        now = time.monotonic()
        if now - self._checked_at >= self._recheck:
            self._checked_at = now
            mark = await self._store.change_mark()
            if mark != self._mark:
                self._mark = mark
                self._known.clear()
                self._generation += 1
        key = hash_token(token)
        known = self._known.get(key)
        if known is not None and (known.expires_at is None or known.expires_at > time.time()):
            return known
        generation = self._generation
        verdict = await check_token(self._store, token)
        if verdict.user is not None and generation == self._generation:
            if len(self._known) >= self._max:
                self._known.pop(next(iter(self._known)))
            self._known[key] = verdict
        return verdict
