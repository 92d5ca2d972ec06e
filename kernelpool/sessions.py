"""Per-MCP-session context: the session's active notebook.

Keyed by (user, Mcp-Session-Id), so a session id presented with another user's token finds
nothing (the SDK refuses that anyway). Sessionless clients (protocol 2026-07-28) have no id and
so no context: they pass `notebook` explicitly. The SDK has no hook for a closed session, so
contexts are forgotten after `idle_timeout` seconds unused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SessionContext:
    notebook: str | None = None
    last_used: float = field(default_factory=time.monotonic)


class SessionContexts:
    def __init__(self, idle_timeout: float) -> None:
        self._idle_timeout = idle_timeout
        self._contexts: dict[tuple[str, str], SessionContext] = {}

    def get(self, user: str, session_id: str | None) -> SessionContext | None:
        if session_id is None:
            return None
        ctx = self._contexts.get((user, session_id))
        if ctx is not None:
            ctx.last_used = time.monotonic()
        return ctx

    def set_notebook(self, user: str, session_id: str, notebook: str | None) -> None:
        ctx = self._contexts.setdefault((user, session_id), SessionContext())
        ctx.notebook = notebook
        ctx.last_used = time.monotonic()

    def active_notebook(self, user: str, session_id: str | None) -> str | None:
        ctx = self.get(user, session_id)
        return ctx.notebook if ctx else None

    def expire(self) -> int:
        cutoff = time.monotonic() - self._idle_timeout
        stale = [k for k, c in self._contexts.items() if c.last_used < cutoff]
        for key in stale:
            del self._contexts[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._contexts)
