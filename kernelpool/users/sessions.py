"""MCP sessions: which ids the server issued to which user, the per-user cap, and each session's context.

A session (protocol 2025-11-25 and older) is opened by a request without `Mcp-Session-Id`; the
app counts it against its user's `max_sessions_per_user` before the SDK creates it (`reserve`),
and records the id the SDK hands out (`opened`). Only such ids get a context (the session's
active notebook): a sessionless client (protocol 2026-07-28) that sends an id it made up, or one
issued to someone else, gets none. The SDK has no hook for a closed session, so ids it no longer
holds (`live`) are forgotten at the next look, and contexts also after `idle_timeout` unused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Hashable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from kernelpool.errors import LimitReached


class _Used(Protocol):
    last_used: float  # time.monotonic() of the last use


_K = TypeVar("_K", bound=Hashable)
_E = TypeVar("_E", bound=_Used)


def forget_idle(entries: dict[_K, _E], idle_timeout: float) -> int:
    """Drop the entries unused for `idle_timeout` seconds; returns how many. For the per-session
    tables that housekeeping expires: the contexts here, the notice subscriptions (mcp/notices.py)."""
    cutoff = time.monotonic() - idle_timeout
    stale = [key for key, entry in entries.items() if entry.last_used < cutoff]
    for key in stale:
        del entries[key]
    return len(stale)


@dataclass
class SessionContext:
    path: str | None = None  # the active notebook's, relative to the user's folder
    last_used: float = field(default_factory=time.monotonic)


class SessionContexts:
    def __init__(self, idle_timeout: float, max_per_user: int = 100,
                 live: Callable[[], Container[str]] | None = None) -> None:
        self._idle_timeout = idle_timeout
        self._max_per_user = max_per_user
        self._live = live  # the ids the SDK holds open now (set by the app)
        self._issued: dict[str, set[str]] = {}  # user -> session ids the server issued to that user
        self._opening: dict[str, int] = {}  # user -> sessions being opened (counted against the cap)
        self._contexts: dict[tuple[str, str], SessionContext] = {}

    # ---- issued sessions and the per-user cap -----------------------------------------------

    def set_live(self, live: Callable[[], Container[str]]) -> None:
        self._live = live

    def reserve(self, user: str) -> None:
        """Count a session being opened against `user`'s cap, or raise LimitReached. Pair with `opened`."""
        self._prune(user)
        if len(self._issued.get(user, ())) + self._opening.get(user, 0) >= self._max_per_user:
            raise LimitReached(
                "MCP sessions per user", self._max_per_user,
                f"close sessions you no longer use (MCP clients end theirs with an HTTP DELETE carrying its "
                f"Mcp-Session-Id), or wait until idle ones expire ({self._idle_timeout:g} s unused)")
        self._opening[user] = self._opening.get(user, 0) + 1

    def opened(self, user: str, session_id: str | None) -> None:
        """The session reserved for `user` was opened with `session_id`, or not at all (None)."""
        self._opening[user] -= 1
        if not self._opening[user]:
            del self._opening[user]
        if session_id is not None:
            self._issued.setdefault(user, set()).add(session_id)

    def is_issued(self, user: str, session_id: str | None) -> bool:
        return session_id is not None and session_id in self._issued.get(user, ())

    def issued_to(self, user: str) -> set[str]:
        """The ids of `user`'s open sessions (closed when the user moves to another replica)."""
        self._prune(user)
        return set(self._issued.get(user, ()))

    def open_count(self, user: str) -> int:
        self._prune(user)
        return len(self._issued.get(user, ()))

    def _prune(self, user: str) -> None:
        ids = self._issued.get(user)
        if not ids or self._live is None:
            return
        live = self._live()
        for sid in [s for s in ids if s not in live]:
            ids.discard(sid)
            self._contexts.pop((user, sid), None)
        if not ids:
            del self._issued[user]

    # ---- contexts ---------------------------------------------------------------------------

    def get(self, user: str, session_id: str | None) -> SessionContext | None:
        if session_id is None:
            return None
        ctx = self._contexts.get((user, session_id))
        if ctx is not None:
            ctx.last_used = time.monotonic()
        return ctx

    def set_notebook(self, user: str, session_id: str, path: str | None) -> bool:
        """Set the session's active notebook; False (and nothing kept) for an id not issued to `user`."""
        if not self.is_issued(user, session_id):
            return False
        ctx = self._contexts.setdefault((user, session_id), SessionContext())
        ctx.path = path
        ctx.last_used = time.monotonic()
        return True

    def active_notebook(self, user: str, session_id: str | None) -> str | None:
        ctx = self.get(user, session_id)
        return ctx.path if ctx else None

    def expire(self) -> int:
        """Forget closed sessions and contexts idle past the timeout (housekeeping); returns how many contexts."""
        for user in list(self._issued):
            self._prune(user)
        return forget_idle(self._contexts, self._idle_timeout)

    def __len__(self) -> int:
        return len(self._contexts)
