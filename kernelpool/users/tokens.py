"""Bearer tokens: minted here, stored only as SHA-256 hashes, checked against the store.

A token is `kp_<id>_<secret>`: the id names it for listing and revoking; the secret is 32
random bytes, so a fast hash is enough (nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from kernelpool.store import Store


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(store: Store, user: str, expires_at: float | None = None) -> tuple[str, str]:
    """Mint a token for `user`; returns (token id, token). The token is never stored."""
    token_id = secrets.token_hex(4)
    token = f"kp_{token_id}_{secrets.token_urlsafe(32)}"
    await store.add_token(token_id, user, hash_token(token), expires_at)
    return token_id, token


@dataclass(frozen=True)
class Verdict:
    """What a presented token is worth: the user it names, or why it is refused."""

    user: str | None
    expires_at: float | None = None
    refused: str | None = None  # "unknown", "revoked" or "expired"


async def check_token(store: Store, token: str) -> Verdict:
    """Look a presented token up by its hash: a revocation takes effect on the next request."""
    row = await store.token_by_hash(hash_token(token))
    if row is None:
        return Verdict(None, refused="unknown")
    if row.revoked_at is not None:
        return Verdict(None, refused="revoked")
    if row.expires_at is not None and row.expires_at <= time.time():
        return Verdict(None, refused="expired")
    return Verdict(row.user, row.expires_at)
