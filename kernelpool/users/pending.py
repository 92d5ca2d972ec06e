"""Authorization requests waiting for a person: made when a client sends someone's browser to
`/authorize` (`kernelpool.mcp.oauth`), finished or refused on the consent page (`kernelpool.web`).

Kept in memory for `ttl` seconds (a restart asks the person to start again from the client).
The first browser that opens a request's sign-in page claims it: another browser given the same
link is refused, so a link passed around cannot be finished by someone else.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Pending:
    client_id: str
    client_name: str | None
    redirect_uri: str
    redirect_explicit: bool
    state: str | None
    scopes: list[str]
    code_challenge: str
    resource: str
    created_at: float = field(default_factory=time.monotonic)
    browser: str | None = None  # the hash of the browser that claimed it


class PendingAuthorizations:
    def __init__(self, ttl: float = 600.0, max_pending: int = 10_000) -> None:
        self._ttl = ttl
        self._max = max_pending
        self._items: OrderedDict[str, Pending] = OrderedDict()

    def add(self, pending: Pending) -> str:
        self._expire()
        key = secrets.token_urlsafe(24)
        self._items[key] = pending
        while len(self._items) > self._max:
            self._items.popitem(last=False)
        return key

    def claim(self, key: str, browser: str) -> Pending | None:
        """The request `key` for `browser`: claimed by it now if nobody has; None if unknown,
        expired, or claimed by another browser."""
        self._expire()
        pending = self._items.get(key)
        if pending is None:
            return None
        if pending.browser is None:
            pending.browser = browser
        return pending if pending.browser == browser else None

    def latest(self, browser: str) -> str | None:
        """The newest request this browser claimed (to go back to it after a sign-in link)."""
        self._expire()
        return next((k for k, p in reversed(self._items.items()) if p.browser == browser), None)

    def finish(self, key: str) -> None:
        self._items.pop(key, None)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if now - oldest.created_at < self._ttl:
                break
            del self._items[key]
