"""MCP sessions per user: ids are the server's, issued per user and capped per user (sessions being
opened included); contexts expire when idle or when the SDK no longer holds the session."""

from __future__ import annotations

import pytest

from kernelpool.errors import LimitReached
from kernelpool.users import sessions
from kernelpool.users.sessions import SessionContexts
from tests.unit.conftest import Clock


@pytest.fixture(autouse=True)
def _still(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle time passes when the test says so (`clock.advance`), not with the machine's load."""
    monkeypatch.setattr(sessions, "time", clock)


def test_session_contexts_are_per_user_and_expire(clock: Clock) -> None:
    live = {"s1", "s2"}
    ctx = SessionContexts(idle_timeout=0.2, max_per_user=2, live=lambda: live)
    ctx.reserve("alice")
    ctx.opened("alice", "s1")
    assert ctx.set_notebook("alice", "s1", "a.ipynb")
    assert ctx.active_notebook("alice", "s1") == "a.ipynb"
    assert ctx.active_notebook("bob", "s1") is None, "a session id under another user's token finds nothing"
    assert not ctx.set_notebook("bob", "s1", "b.ipynb"), "an id not issued to bob gets no context"
    assert not ctx.set_notebook("alice", "made-up", "a.ipynb") and len(ctx) == 1
    assert ctx.active_notebook("alice", None) is None
    clock.advance(0.19)
    assert ctx.expire() == 0
    clock.advance(0.02)
    assert ctx.expire() == 1
    assert ctx.active_notebook("alice", "s1") is None


def test_sessions_per_user_cap_counts_sessions_being_opened() -> None:
    live = {"s1"}
    ctx = SessionContexts(idle_timeout=60, max_per_user=2, live=lambda: live)
    ctx.reserve("alice")
    ctx.opened("alice", "s1")
    ctx.reserve("alice")  # being opened: counted
    with pytest.raises(LimitReached, match=r"MCP sessions per user limit reached \(2\); close sessions"):
        ctx.reserve("alice")
    ctx.reserve("bob")  # another user's cap is their own
    ctx.opened("alice", None)  # that one failed to open
    ctx.reserve("alice")
    ctx.opened("alice", "s2")
    live.add("s2")
    with pytest.raises(LimitReached):
        ctx.reserve("alice")
    live.discard("s1")  # the SDK closed it (DELETE or idle timeout)
    ctx.reserve("alice")
    assert not ctx.is_issued("alice", "s1")


def test_a_used_context_stays_and_a_closed_session_loses_its_context(clock: Clock) -> None:
    live = {"s1", "s2"}
    ctx = SessionContexts(idle_timeout=0.2, max_per_user=5, live=lambda: live)
    for sid in ("s1", "s2"):
        ctx.reserve("alice")
        ctx.opened("alice", sid)
        ctx.set_notebook("alice", sid, f"{sid}.ipynb")
    clock.advance(0.12)
    assert ctx.active_notebook("alice", "s1") == "s1.ipynb"  # a use keeps it
    clock.advance(0.12)
    assert ctx.expire() == 1 and ctx.active_notebook("alice", "s1") == "s1.ipynb"
    assert ctx.active_notebook("alice", "s2") is None
    live.discard("s1")
    assert ctx.open_count("alice") == 1 and ctx.active_notebook("alice", "s1") is None and len(ctx) == 0
    assert not ctx.set_notebook("alice", "s1", "again.ipynb"), "a closed session's id is not issued any more"
