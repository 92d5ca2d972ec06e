"""Bearer tokens: minted here, stored only as SHA-256 hashes, verified for the MCP SDK.

A token is `kp_<id>_<secret>`: the id names it for listing and revoking; the secret is 32
random bytes, so a fast hash is enough (nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time

from mcp.server.auth.provider import AccessToken

from kernelpool.store import Store

log = logging.getLogger(__name__)

SCOPE = "kernelpool"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(store: Store, user: str, expires_at: float | None = None) -> tuple[str, str]:
    """Mint a token for `user`; returns (token id, token). The token is never stored."""
    token_id = secrets.token_hex(4)
    token = f"kp_{token_id}_{secrets.token_urlsafe(32)}"
    await store.add_token(token_id, user, hash_token(token), expires_at)
    return token_id, token


class StoreTokenVerifier:
    """The SDK's `TokenVerifier`: looks the token's hash up in the store on every request,
    so that a revocation takes effect at once."""

    def __init__(self, store: Store, on_failure: object = None) -> None:
        self._store = store
        self._on_failure = on_failure

    async def verify_token(self, token: str) -> AccessToken | None:
        row = await self._store.token_by_hash(hash_token(token))
        now = time.time()
        if row is None or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
            reason = "unknown" if row is None else ("revoked" if row.revoked_at is not None else "expired")
            # logged by the app's auth guard, per client address and at a bounded rate
            if callable(self._on_failure):
                self._on_failure(reason)
            return None
        return AccessToken(
            token=token,
            client_id=row.user,
            subject=row.user,
            scopes=[SCOPE],
            expires_at=int(row.expires_at) if row.expires_at is not None else None,
        )
