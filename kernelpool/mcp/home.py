"""A replica serves only the users whose home it is (docs/scale-out.md).

`HomeGate` wraps the SDK's session manager inside its auth, as `SessionGate` does, so it runs
before the SDK sees the request: a user homed on another replica is answered 421 Misdirected
Request, with the cause in words, and nothing of the request is served (no session opened, no
tool run); a user being moved away is answered 503 with Retry-After. `end_sessions` closes a
user's MCP sessions here when they move. Mounted by `kernelpool.app` when `replica` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kernelpool.mcp.notices import Notices
from kernelpool.users.sessions import SessionContexts

MOVE_RETRY = 5  # seconds a client is told to wait while its user moves


def misrouted(user: str, home: str | None, here: str) -> str:
    if home is None:
        return (f"misdirected request: user {user!r} has no home replica yet (added before replicas were set up), "
                f"so no replica serves it; this is replica {here!r}. An administrator places it with "
                f"`kernelpool users move {user} --to REPLICA`. Nothing was run.")
    return (f"misdirected request: user {user!r} lives on replica {home!r}, and this is replica {here!r}. The "
            f"proxy sent it here: its map is stale or was bypassed (kernelpool keeps HAProxy's map current; "
            f"see docs/scale-out.md). Nothing was run; send it through the proxy.")


class HomeGate:
    def __init__(self, app: ASGIApp, replica: str, moving: Callable[[str], str | None]) -> None:
        self.app = app
        self.replica = replica
        self.moving = moving  # user -> the replica it is being moved to, while it moves away from here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = getattr(scope.get("user"), "access_token", None)
        if scope["type"] != "http" or token is None:
            await self.app(scope, receive, send)
            return
        user: str = token.client_id
        home = (token.claims or {}).get("home")
        target = self.moving(user)
        if home == self.replica and target is None:
            await self.app(scope, receive, send)
            return
        if home == self.replica:
            text = (f"user {user!r} is being moved from replica {self.replica!r} to {target!r}: its kernels were "
                    f"stopped and its files are being copied. Nothing was run; try again in a few seconds.")
            status, headers = 503, {"Retry-After": str(MOVE_RETRY)}
        else:
            text, status, headers = misrouted(user, home, self.replica), 421, {}
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": text}}
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


async def end_sessions(manager: Any, sessions: SessionContexts, notices: Notices, user: str, text: str) -> int:
    """Tell `user`'s sessions why, then close them (their ids answer 404 from then on, here and on
    every other replica, and the client starts a new session). How many were closed."""
    await notices.to_user(user, "warning", text)
    closed = 0
    for sid in sorted(sessions.issued_to(user)):
        # the SDK's open sessions by id (mcp 2.3.0; see kernelpool.app, which reads the same dict)
        transport = manager._server_instances.get(sid)
        if transport is not None:
            await transport.terminate()
            closed += 1
    return closed
