"""What MCP sessions hear from the services, wired by the app (`kernelpool.app._Server`): a kernel
stopped for misbehaving, the change stream (saved notebooks, kernels a person interrupted or
restarted in the web view), and the usage of the event store kept for resumable streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from kernelpool.config import Settings
from kernelpool.mcp.events import SessionEventStore
from kernelpool.mcp.notices import Notices
from kernelpool.mcp.resources import notebook_uri
from kernelpool.notebooks.changes import Change
from sandbox.limits import parse_memory


def _tell_stopped(notices: Notices, user: str, notebook: str, cause: str) -> None:
    """A kernel that no call was running on was stopped for misbehaving: its user's sessions hear
    it as they hear of a kernel that died during a call (kernelpool/mcp/execution.py)."""
    text = f"the kernel of {notebook} died: {cause}; the next call starts a fresh one"
    asyncio.get_running_loop().create_task(notices.to_user(user, "error", text, {"notebook": notebook}))


def _to_sessions(notices: Notices) -> Callable[[Change], None]:
    """What MCP sessions hear of the change stream: a saved notebook is an updated resource for the
    sessions of its user that subscribed to it; a kernel a person interrupted or restarted in the web
    view is a notice to all of that user's sessions (sent from a task of their own: a change
    listener only notes the change)."""
    sending: set[asyncio.Task[int]] = set()  # held until done: the loop keeps only weak references

    def on_change(change: Change) -> None:
        if change.kind == "saved":
            send = notices.resource_updated(change.user, notebook_uri(change.path))
        elif change.kind in ("interrupted", "restarted"):
            gone = ": its variables are gone" if change.kind == "restarted" else ""
            send = notices.to_user(change.user, "notice", f"the kernel of {change.path} was {change.kind} by you "
                                   f"in the web view{gone}", {"notebook": change.path})
        else:
            return
        task = asyncio.get_running_loop().create_task(send)
        sending.add(task)
        task.add_done_callback(sending.discard)

    return on_change


def _event_store(settings: Settings, notices: Notices) -> SessionEventStore | None:
    if settings.resume_events_per_session == 0:
        return None

    what = "bytes kept for stream resumption"

    def usage(user: str, used: int, limit: int) -> None:
        if notices.crossed(user, what, used, limit, settings.near_limit_ratio):
            asyncio.get_running_loop().create_task(notices.near(user, what, used, limit))

    return SessionEventStore(
        max_events=settings.resume_events_per_session, max_bytes=parse_memory(settings.resume_bytes_per_session),
        max_user_bytes=parse_memory(settings.resume_bytes_per_user), max_age=settings.resume_max_age,
        session_lifetime=settings.session_idle_timeout, on_user_usage=usage,
    )
