"""The event store's bounds and ownership, driven through the same ASGI wrapper (`EventScope`) and
SDK interface (`store_event`, `replay_events_after`) the server uses; the end-to-end behaviour is
in tests/test_resume.py. The authenticated user is set the way the SDK's auth middleware sets it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http import GET_STREAM_KEY, EventMessage
from mcp.types import JSONRPCNotification
from sse_starlette.event import ServerSentEvent

from kernelpool.mcp.events import EventScope, SessionEventStore


def _store(**overrides: Any) -> SessionEventStore:
    limits = {"max_events": 100, "max_bytes": 1 << 20, "max_user_bytes": 4 << 20, "max_age": 60.0, "session_lifetime": 60.0}
    return SessionEventStore(**(limits | overrides))


def _note(i: int, pad: int = 0) -> JSONRPCNotification:
    return JSONRPCNotification(jsonrpc="2.0", method="notifications/progress",
                               params={"progressToken": "t", "progress": i, "message": "x" * pad})


async def _request(store: SessionEventStore, user: str, session: str | None,
                   work: Callable[[], Awaitable[Any]], opens: str | None = None) -> Any:
    """Run `work` as one HTTP request of `user` (in `session`; `opens` is the session its response opens)."""
    out: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        token = auth_context_var.set(AuthenticatedUser(AccessToken(token="t", client_id=user, scopes=[])))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"mcp-session-id", opens.encode())] if opens else []})
            out["value"] = await work()
        finally:
            auth_context_var.reset(token)

    async def receive() -> Any:
        raise AssertionError("EventScope reads no request body")

    async def send(message: Any) -> None:
        return None

    headers = [(b"mcp-session-id", session.encode())] if session else []
    await EventScope(app, store)({"type": "http", "headers": headers}, receive, send)
    return out["value"]


async def _replay(store: SessionEventStore, user: str, session: str, after: str) -> tuple[str | None, list[int]]:
    got: list[int] = []

    async def collect(event: EventMessage) -> None:
        message = event.message
        assert isinstance(message, JSONRPCNotification) and message.params is not None
        got.append(message.params["progress"])

    async def work() -> str | None:
        return await store.replay_events_after(after, collect)

    return await _request(store, user, session, work), got


async def _store_many(store: SessionEventStore, user: str, session: str | None, stream: str, n: int, pad: int = 0,
                      opens: str | None = None) -> list[str]:
    async def work() -> list[str]:
        return [await store.store_event(stream, _note(i, pad)) for i in range(n)]

    return await _request(store, user, session, work, opens)


async def test_replay_is_per_stream_and_per_session() -> None:
    store = _store()
    prime = await _request(store, "alice", None, lambda: store.store_event("1", None), opens="S1")
    ids = await _store_many(store, "alice", "S1", "1", 5)
    await _store_many(store, "alice", "S1", "2", 3)  # another request of the same session
    assert await _replay(store, "alice", "S1", prime) == ("1", [0, 1, 2, 3, 4])
    assert await _replay(store, "alice", "S1", ids[2]) == ("1", [3, 4])
    # another session, of the same user or of another, replays nothing of S1
    await _store_many(store, "alice", None, "1", 1, opens="S2")
    await _store_many(store, "bob", None, "1", 1, opens="S3")
    assert await _replay(store, "alice", "S2", prime) == (None, [])
    assert await _replay(store, "bob", "S3", prime) == (None, [])
    assert await _replay(store, "alice", "S1", "no-such-event") == (None, [])


async def test_bounded_per_session_by_events_and_bytes() -> None:
    store = _store(max_events=10)
    ids = await _store_many(store, "alice", None, "1", 25, opens="S1")
    assert store.count() == 10
    assert await _replay(store, "alice", "S1", ids[0]) == (None, []), "evicted: nothing to resume from"
    assert await _replay(store, "alice", "S1", ids[15]) == ("1", list(range(16, 25)))

    store = _store(max_bytes=20_000)
    await _store_many(store, "alice", None, "1", 20, pad=5000, opens="S1")
    assert 3 <= store.count() <= 4 and store.user_bytes("alice") <= 20_000


async def test_bounded_per_user_across_sessions_and_never_at_others_cost() -> None:
    store = _store(max_user_bytes=50_000)
    await _store_many(store, "bob", None, "1", 5, pad=5000, opens="B1")
    bob_bytes = store.user_bytes("bob")
    first = await _store_many(store, "alice", None, "1", 8, pad=5000, opens="A1")
    second = await _store_many(store, "alice", None, "1", 8, pad=5000, opens="A2")
    assert store.user_bytes("alice") <= 50_000
    assert store.user_bytes("bob") == bob_bytes, "one user filling the store evicts only her own events"
    # alice's oldest events went first (A1's), while A2's are all kept
    assert await _replay(store, "alice", "A1", first[0]) == (None, [])
    assert await _replay(store, "alice", "A2", second[0]) == ("1", [1, 2, 3, 4, 5, 6, 7])
    assert store.evicted >= 6


async def test_events_expire_by_age() -> None:
    store = _store(max_age=0.2, session_lifetime=0.1)
    ids = await _store_many(store, "alice", None, "1", 3, opens="S1")
    time.sleep(0.3)
    assert store.expire() == 3 and store.count() == 0 and store.user_bytes("alice") == 0
    assert await _replay(store, "alice", "S1", ids[0]) == (None, [])


async def test_usage_is_reported_per_user() -> None:
    seen: list[tuple[str, int, int]] = []
    store = _store(on_user_usage=lambda user, used, limit: seen.append((user, used, limit)))
    await _store_many(store, "alice", None, "1", 2, opens="S1")
    assert [s[0] for s in seen] == ["alice", "alice"] and seen[-1][1] == store.user_bytes("alice") and seen[-1][2] == 4 << 20


async def test_shutdown_waits_until_the_standalone_stream_carried_its_notice() -> None:
    """The app's shutdown notice (`standalone_written`) waits for the sessions whose GET stream is open,
    until the events stored for that stream since it began were written to it, and no longer than asked."""
    store = _store()
    await _store_many(store, "alice", None, "1", 1, opens="S1")
    await _store_many(store, "bob", None, "1", 1, opens="S2")  # S2 never opens its GET stream
    to_write: asyncio.Queue[EventMessage | None] = asyncio.Queue()
    written: list[bytes] = []

    async def standalone(scope: Any, receive: Any, send: Any) -> None:
        # what the SDK's GET handler sends, encoded the way sse-starlette encodes it; a keep-alive ping first
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": ServerSentEvent(comment="ping").encode(), "more_body": True})
        while (event := await to_write.get()) is not None:
            data = ServerSentEvent(data=event.message.model_dump_json(by_alias=True, exclude_unset=True),
                                   event="message", id=event.event_id).encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})

    async def wire(message: Any) -> None:
        written.append(message.get("body", b""))

    scope = {"type": "http", "method": "GET", "headers": [(b"mcp-session-id", b"S1")]}
    stream = asyncio.create_task(EventScope(standalone, store)(scope, None, wire))
    await asyncio.sleep(0.05)
    after = store.last_seq
    assert await store.standalone_written(["S1", "S2"], after, 0.1) == 1, "S1's notice is not stored yet"
    ids = await _store_many(store, "alice", "S1", GET_STREAM_KEY, 2)
    await _store_many(store, "bob", "S2", GET_STREAM_KEY, 1)
    await _store_many(store, "alice", "S1", "7", 1)  # a call's own stream: not the GET stream's to carry
    await to_write.put(EventMessage(_note(0), ids[0]))
    assert await store.standalone_written(["S1", "S2"], after, 0.1) == 1, "one of S1's two events is not written"
    await to_write.put(EventMessage(_note(1), ids[1]))
    assert await store.standalone_written(["S1", "S2"], after, 5) == 0
    assert ids[1].encode() in written[-1]
    await to_write.put(None)
    await stream
    ids = await _store_many(store, "alice", "S1", GET_STREAM_KEY, 1)
    assert await store.standalone_written(["S1"], store.last_seq - 1, 5) == 0, "S1's GET stream is closed"
