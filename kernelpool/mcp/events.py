"""The event store of the streamable-HTTP transport: what lets a client resume a dropped stream.

The MCP SDK stores every message it sends on an SSE stream through `EventStore.store_event`
(and an empty "priming" event first, whose id the client keeps), and answers a GET with
`Last-Event-ID` through `replay_events_after`. Its interface names only a stream id, which is
the JSON-RPC request id ("1", "2", ...): the same in every session. So each call is attributed
to the MCP session it belongs to through `EventScope`, an ASGI wrapper around the MCP app that
puts an `_Owner` in a context variable for each HTTP request (the session's task inherits the
one of the `initialize` request that created it). A client can only replay events of its own
session; an event id from another session, or one no longer kept, replays nothing.

Kept in memory, not persisted: the SDK keeps sessions in process memory, so after a restart
every `Mcp-Session-Id` answers 404 and no stored event could be replayed anyway.

Bounded per session (events, bytes), per user (bytes, all of the user's sessions together)
and by age; the oldest events go first. Callers: the app (wiring, housekeeping, waiting for its
shutdown notice to be written), the notice service (usage near the user's bound).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.streamable_http import (
    GET_STREAM_KEY,
    EventCallback,
    EventId,
    EventMessage,
    EventStore,
    StreamId,
)
from mcp.types import JSONRPCMessage
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_SESSION_HEADER = b"mcp-session-id"
_LAST_EVENT_HEADER = b"last-event-id"
_EVENT_ID = re.compile(rb"^id: ([0-9a-f]+)-", re.MULTILINE)  # an SSE event's id field, an id of ours


@dataclass(eq=False)
class _Event:
    id: str
    seq: int
    stream: str
    message: JSONRPCMessage | None  # None: a priming event (a cursor, sent with empty data)
    size: int
    at: float


@dataclass(eq=False)
class _Owner:
    """The events of one MCP session (or of one request that did not open a session)."""

    key: str
    session_id: str | None = None
    user: str | None = None
    events: deque[_Event] = field(default_factory=deque)
    bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    standalone: int = 0  # seq of the newest event stored for the session's standalone (GET) stream
    written: int = 0  # seq of the newest of those handed to the client's connection
    listening: int = 0  # open GET responses that carry the standalone stream


_CURRENT: contextvars.ContextVar[_Owner | None] = contextvars.ContextVar("kernelpool_event_owner", default=None)


class SessionEventStore(EventStore):
    def __init__(self, *, max_events: int, max_bytes: int, max_user_bytes: int, max_age: float,
                 session_lifetime: float, on_user_usage: Callable[[str, int, int], None] | None = None) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_user_bytes = max_user_bytes
        self.max_age = max_age
        self._session_lifetime = session_lifetime
        self._on_user_usage = on_user_usage
        self._seq = itertools.count(1)
        self._owners: dict[str, _Owner] = {}
        self._by_session: dict[str, _Owner] = {}
        self._index: dict[str, tuple[_Owner, _Event]] = {}
        self._user_bytes: dict[str, int] = {}
        self.evicted = 0
        self.last_seq = 0

    # ---- owners (called by EventScope) --------------------------------------------------

    def owner_for(self, session_id: str | None) -> _Owner:
        if session_id is not None:
            known = self._by_session.get(session_id)
            if known is not None:
                return known
        # registered only once it stores an event: a request with a made-up session id costs nothing
        return _Owner(key=secrets.token_hex(8), session_id=session_id)

    def bind(self, owner: _Owner, session_id: str) -> None:
        """The response to `owner`'s request opened session `session_id`."""
        owner.session_id = session_id
        if owner.key in self._owners:
            self._by_session[session_id] = owner

    # ---- the SDK's interface ------------------------------------------------------------

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        owner = self._current()
        now = time.monotonic()
        size = 64 if message is None else len(message.model_dump_json(by_alias=True, exclude_unset=True)) + 64
        seq = self.last_seq = next(self._seq)
        if stream_id == GET_STREAM_KEY:
            owner.standalone = seq
        event = _Event(id=f"{seq:x}-{owner.key[:6]}", seq=seq, stream=stream_id, message=message, size=size, at=now)
        self._register(owner)
        owner.events.append(event)
        owner.bytes += size
        owner.last_used = now
        self._index[event.id] = (owner, event)
        if owner.user is not None:
            self._user_bytes[owner.user] = self._user_bytes.get(owner.user, 0) + size
        self._trim(owner, now)
        if owner.user is not None and self._on_user_usage is not None:
            self._on_user_usage(owner.user, self._user_bytes.get(owner.user, 0), self.max_user_bytes)
        return event.id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        owner = self._current()
        found = self._index.get(last_event_id)
        if found is None or found[0] is not owner or (owner.user is not None and owner.user != _user()):
            log.info("resumption refused: event %r is not one of this session's kept events", last_event_id[:40])
            return None
        owner.last_used = time.monotonic()
        after = found[1]
        pending = [e for e in owner.events if e.seq > after.seq and e.stream == after.stream and e.message is not None]
        for event in pending:
            assert event.message is not None  # noqa: S101 (narrows the type: `pending` kept only these)
            await send_callback(EventMessage(event.message, event.id))
        return after.stream

    async def standalone_written(self, session_ids: list[str], after: int, timeout: float) -> int:
        """Wait until each session's standalone events stored after seq `after` were handed to its open
        GET stream (a session without one has nothing to wait for), at most `timeout` seconds; returns
        how many sessions were still behind. Called by the app before the streams end at shutdown."""
        owners = [o for o in (self._by_session.get(sid) for sid in session_ids) if o is not None]
        deadline = time.monotonic() + timeout
        while True:
            behind = [o for o in owners if o.listening and not after < o.standalone <= o.written]
            if not behind or time.monotonic() >= deadline:
                return len(behind)
            await asyncio.sleep(0.01)

    def carries_standalone(self, last_event_id: str | None) -> bool:
        """Whether a GET with this Last-Event-ID (None: a fresh one) streams a session's standalone events."""
        found = self._index.get(last_event_id) if last_event_id is not None else None
        return last_event_id is None or (found is not None and found[1].stream == GET_STREAM_KEY)

    # ---- bounds -------------------------------------------------------------------------

    def expire(self) -> int:
        """Drop events past their age, and owners with nothing left whose session must be over; housekeeping."""
        now = time.monotonic()
        dropped = 0
        for key, owner in list(self._owners.items()):
            dropped += self._trim(owner, now)
            if not owner.events and now - owner.last_used > self._session_lifetime + self.max_age:
                del self._owners[key]
                if owner.session_id is not None and self._by_session.get(owner.session_id) is owner:
                    del self._by_session[owner.session_id]
        return dropped

    def user_bytes(self, user: str) -> int:
        return self._user_bytes.get(user, 0)

    def count(self) -> int:
        # not __len__: the SDK tests the store for truth (`if self._event_store:`), an empty one must pass
        return len(self._index)

    def _current(self) -> _Owner:
        owner = _CURRENT.get()
        if owner is None:  # a code path outside EventScope: keep its events apart from everyone's
            owner = _Owner(key=secrets.token_hex(8))
            _CURRENT.set(owner)
        if owner.user is None:
            owner.user = _user()
        return owner

    def _register(self, owner: _Owner) -> None:
        if owner.key not in self._owners:
            self._owners[owner.key] = owner
        if owner.session_id is not None and owner.session_id not in self._by_session:
            self._by_session[owner.session_id] = owner

    def _trim(self, owner: _Owner, now: float) -> int:
        dropped = 0
        cutoff = now - self.max_age
        while owner.events and (len(owner.events) > self.max_events or owner.bytes > self.max_bytes
                                or owner.events[0].at < cutoff):
            self._drop_oldest(owner)
            dropped += 1
        user = owner.user
        while user is not None and self._user_bytes.get(user, 0) > self.max_user_bytes:
            oldest = min((o for o in self._owners.values() if o.user == user and o.events),
                         key=lambda o: o.events[0].seq, default=None)
            if oldest is None:
                break
            self._drop_oldest(oldest)
            dropped += 1
        self.evicted += dropped
        return dropped

    def _drop_oldest(self, owner: _Owner) -> None:
        event = owner.events.popleft()
        owner.bytes -= event.size
        self._index.pop(event.id, None)
        if owner.user is not None:
            left = self._user_bytes.get(owner.user, 0) - event.size
            if left > 0:
                self._user_bytes[owner.user] = left
            else:
                self._user_bytes.pop(owner.user, None)


def _user() -> str | None:
    token = get_access_token()
    return token.client_id if token is not None else None


class EventScope:
    """ASGI wrapper around the MCP app: tells the event store which session each request belongs to."""

    def __init__(self, app: ASGIApp, store: SessionEventStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session_id = next((v.decode("latin-1") for k, v in scope["headers"] if k == _SESSION_HEADER), None)
        owner = self.store.owner_for(session_id)
        token = _CURRENT.set(owner)
        try:
            if session_id is not None and scope.get("method") == "GET":
                await self._get(scope, receive, send, owner)
                return
            if session_id is not None:
                await self.app(scope, receive, send)
                return

            async def send_and_bind(message: Message) -> None:
                if message["type"] == "http.response.start":
                    opened = next((v.decode("latin-1") for k, v in message.get("headers", []) if k.lower() == _SESSION_HEADER), None)
                    if opened is not None:
                        self.store.bind(owner, opened)
                await send(message)

            await self.app(scope, receive, send_and_bind)
        finally:
            _CURRENT.reset(token)

    async def _get(self, scope: Scope, receive: Receive, send: Send, owner: _Owner) -> None:
        """A session's GET: when it carries the standalone stream, note which events reached the
        connection (the shutdown notice waits for that, `SessionEventStore.standalone_written`)."""
        last = next((v.decode("latin-1") for k, v in scope["headers"] if k == _LAST_EVENT_HEADER), None)
        if not self.store.carries_standalone(last):
            await self.app(scope, receive, send)
            return

        async def send_and_note(message: Message) -> None:
            await send(message)
            found = _EVENT_ID.search(message.get("body", b"")) if message["type"] == "http.response.body" else None
            if found is not None:
                owner.written = max(owner.written, int(found.group(1), 16))

        owner.listening += 1
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            owner.listening -= 1
