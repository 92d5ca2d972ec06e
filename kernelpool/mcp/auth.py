"""The MCP SDK's `TokenVerifier`, backed by kernelpool's token store (`users.tokens`)."""

from __future__ import annotations

from collections.abc import Callable

from mcp.server.auth.provider import AccessToken

from kernelpool.store import Store
from kernelpool.users.tokens import SCOPE, TokenChecker


class StoreTokenVerifier:
    """Checks each request's token (`TokenChecker`: remembered, a revocation counts within 0.5 s).

    Pasted tokens and OAuth access tokens are looked up alike, by hash; an OAuth access token
    passes only for the MCP resource it was issued for (`resource`, RFC 8707: a token minted
    when this server had another public URL is refused). `on_failure(reason)` hears of each
    refusal ("unknown", "revoked", "expired", "resource"); the app's auth guard logs those per
    client address, at a bounded rate.
    """

    def __init__(self, store: Store, on_failure: Callable[[str], None] | None = None, *,
                 resource: str | None = None) -> None:
        self._checker = TokenChecker(store)
        self._on_failure = on_failure
        self._resource = resource

    async def verify_token(self, token: str) -> AccessToken | None:
        verdict = await self._checker.check(token)
        refused = verdict.refused or ("unknown" if verdict.user is None else None)
        if refused is None and verdict.grant_id is not None and verdict.resource != self._resource:
            refused = "resource"
        if refused is not None or verdict.user is None:
            if self._on_failure is not None:
                self._on_failure(refused or "unknown")
            return None
        expires = int(verdict.expires_at) if verdict.expires_at is not None else None
        # the uid rides along: the tool wrapper re-reads the users when it is not the one it knows
        return AccessToken(token=token, client_id=verdict.user, subject=verdict.user, scopes=[SCOPE], expires_at=expires,
                           resource=verdict.resource, claims={"uid": verdict.uid, "grant": verdict.grant_id, "home": verdict.home})
