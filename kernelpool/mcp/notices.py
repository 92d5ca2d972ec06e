"""What the server tells MCP sessions of its own accord: log messages and resource updates.

Per (user, Mcp-Session-Id): the level the client set with `logging/setLevel` (default
`info`), the resources it subscribed to, and the SDK's handle for sending to that session
(the newest request's `ServerSession`; its standalone channel is the session's GET stream,
whose messages the event store keeps for resumption). Everything is keyed by user first: a
notice about one user's kernel or notebook is only ever sent to that user's sessions.

Callers: the tool layer (a call's kernel died, hit its timeout, had its output cut), the
resource handlers (subscriptions), the notebook service (a notebook changed), the app
(shutting down, near a limit).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, get_args

from mcp import MCPDeprecationWarning
from mcp.server.session import ServerSession
from mcp.types import LoggingLevel, RequestId

from kernelpool.mcp.wire import clean

log = logging.getLogger(__name__)

LEVELS: tuple[LoggingLevel, ...] = get_args(LoggingLevel)  # severity ascending
DEFAULT_LEVEL: LoggingLevel = "info"
LOGGER = "kernelpool"


@dataclass
class _Session:
    level: LoggingLevel = DEFAULT_LEVEL
    handle: ServerSession | None = None
    watching: set[str] = field(default_factory=set)
    last_used: float = field(default_factory=time.monotonic)


def _passes(level: LoggingLevel, threshold: LoggingLevel) -> bool:
    return LEVELS.index(level) >= LEVELS.index(threshold)


class Notices:
    def __init__(self, idle_timeout: float) -> None:
        self._idle_timeout = idle_timeout
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._near: set[tuple[str, str]] = set()  # (user, limit) already announced as near

    def attach(self, user: str, session_id: str, handle: ServerSession) -> None:
        """Remember the newest handle of a session; called for every request that carries a session id."""
        entry = self._sessions.setdefault((user, session_id), _Session())
        entry.handle = handle
        entry.last_used = time.monotonic()

    def set_level(self, user: str, session_id: str, level: LoggingLevel) -> None:
        self._sessions.setdefault((user, session_id), _Session()).level = level

    def level(self, user: str, session_id: str | None) -> LoggingLevel:
        entry = self._sessions.get((user, session_id)) if session_id else None
        return entry.level if entry else DEFAULT_LEVEL

    def subscribe(self, user: str, session_id: str, uri: str) -> None:
        self._sessions.setdefault((user, session_id), _Session()).watching.add(uri)

    def unsubscribe(self, user: str, session_id: str, uri: str) -> bool:
        entry = self._sessions.get((user, session_id))
        if entry is None or uri not in entry.watching:
            return False
        entry.watching.discard(uri)
        return True

    async def to_call(self, handle: ServerSession, request_id: RequestId, user: str, session_id: str | None,
                      level: LoggingLevel, text: str, data: dict[str, Any] | None = None) -> None:
        """A log message about one tool call, on that call's own stream (it reaches the caller with the call)."""
        if session_id is not None and not _passes(level, self.level(user, session_id)):
            return
        try:
            await send_log(handle, level, _payload(text, data), related_request_id=request_id)
        except Exception as exc:  # a client that went away must not fail the call
            log.debug("log message not sent: %s", exc)

    async def to_user(self, user: str, level: LoggingLevel, text: str, data: dict[str, Any] | None = None,
                      skip_session: str | None = None) -> int:
        """A log message to every session of `user` (on each session's standalone stream); returns how many."""
        sent = 0
        for (owner, sid), entry in list(self._sessions.items()):
            if owner != user or sid == skip_session or entry.handle is None or not _passes(level, entry.level):
                continue
            if await self._send_log(entry.handle, level, text, data):
                sent += 1
        return sent

    async def to_everyone(self, level: LoggingLevel, text: str) -> list[str]:
        """A log message to every session (the app, at shutdown); returns the ids of those it was handed to."""
        sent = []
        for (_, sid), entry in list(self._sessions.items()):
            if entry.handle is not None and _passes(level, entry.level) and await self._send_log(entry.handle, level, text, None):
                sent.append(sid)
        return sent

    async def resource_updated(self, user: str, uri: str) -> int:
        sent = 0
        for (owner, _), entry in list(self._sessions.items()):
            if owner == user and uri in entry.watching and entry.handle is not None:
                try:
                    await entry.handle.send_resource_updated(clean(uri))
                    sent += 1
                except Exception as exc:
                    log.debug("resource update not sent: %s", exc)
        return sent

    def crossed(self, user: str, what: str, used: float, limit: float, ratio: float) -> bool:
        """True once when `used` reaches `ratio` of `limit`; again only after it fell back below."""
        key = (user, what)
        if limit <= 0 or used < ratio * limit:
            self._near.discard(key)
            return False
        if key in self._near:
            return False
        self._near.add(key)
        return True

    async def usage(self, user: str, what: str, used: float, limit: float, ratio: float) -> None:
        """Tell `user`'s sessions when a per-user limit is near (see `crossed`)."""
        if self.crossed(user, what, used, limit, ratio):
            await self.near(user, what, used, limit)

    async def near(self, user: str, what: str, used: float, limit: float) -> None:
        await self.to_user(user, "warning", f"near a limit: {what} at {used:g} of {limit:g}",
                           {"limit": what, "used": used, "max": limit})

    def expire(self) -> int:
        cutoff = time.monotonic() - self._idle_timeout
        stale = [k for k, e in self._sessions.items() if e.last_used < cutoff]
        for key in stale:
            del self._sessions[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._sessions)

    @staticmethod
    async def _send_log(handle: ServerSession, level: LoggingLevel, text: str, data: dict[str, Any] | None) -> bool:
        try:
            await send_log(handle, level, _payload(text, data))
            return True
        except Exception as exc:
            log.debug("log message not sent: %s", exc)
            return False


def _payload(text: str, data: dict[str, Any] | None) -> dict[str, Any]:
    # notifications pass no middleware: made valid Unicode here (kernelpool/mcp/wire.py)
    payload: dict[str, Any] = clean({"message": text, **(data or {})})
    return payload


async def send_log(handle: ServerSession, level: LoggingLevel, data: Any, related_request_id: RequestId | None = None) -> None:
    """`ServerSession.send_log_message` without its deprecation warning: the capability is deprecated in
    protocol 2026-07-28 (where the SDK sends only what the request opted in to), but the clients of
    today negotiate 2025-11-25, where it is current."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        coro = handle.send_log_message(level, clean(data), LOGGER, related_request_id=related_request_id)
    await coro
