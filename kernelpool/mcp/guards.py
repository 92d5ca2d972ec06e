"""ASGI guards in front of the MCP endpoint: sessions counted per user, and back-off after failed logins.

`SessionGate` wraps the SDK's session manager (inside its auth); `AuthGuard` wraps the whole
app. Both are mounted by `kernelpool.app`.
"""

from __future__ import annotations

import json
import math

from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernelpool.errors import LimitReached
from kernelpool.mcp.auth import SCOPE, StoreTokenVerifier
from kernelpool.users.sessions import SessionContexts
from kernelpool.users.throttle import AuthThrottle


class SessionGate:
    """Around the SDK's session manager (inside its auth): a request that would open an MCP session
    is counted against its user's `max_sessions_per_user` first, and the id it gets is recorded as
    issued to that user (`SessionContexts`)."""

    def __init__(self, app: ASGIApp, sessions: SessionContexts) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = getattr(getattr(scope.get("user"), "access_token", None), "client_id", None)
        if user is None or not opens_session(scope):
            await self.app(scope, receive, send)
            return
        try:
            self.sessions.reserve(user)
        except LimitReached as exc:
            body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": str(exc)}}
            await JSONResponse(body, status_code=429)(scope, receive, send)
            return
        recorded = False

        async def watch(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                sid = None
                if message["status"] < 400:
                    sid = next((v.decode("latin-1") for k, v in message.get("headers", []) if k.lower() == b"mcp-session-id"), None)
                self.sessions.opened(user, sid)  # before the client can see the id and use it
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not recorded:
                self.sessions.opened(user, None)


def opens_session(scope: Scope) -> bool:
    # as the SDK decides it: a POST without a session id, in a handshake protocol (or none named)
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    headers = dict(scope["headers"])
    if b"mcp-session-id" in headers:
        return False
    version = headers.get(b"mcp-protocol-version")
    return version is None or version.decode("latin-1") in HANDSHAKE_PROTOCOL_VERSIONS


def with_scope(message: Message) -> Message:
    """A 401's `WWW-Authenticate: Bearer ...` naming the scope to ask for (the MCP authorization
    spec asks for it; the SDK's challenge names only `resource_metadata`)."""
    headers = [(k, v + f', scope="{SCOPE}"'.encode()) if k.lower() == b"www-authenticate"
               and v.lower().startswith(b"bearer") and b"scope=" not in v else (k, v) for k, v in message.get("headers", [])]
    return {**message, "headers": headers}


class AuthGuard:
    """Failed authentication per client address (`AuthThrottle`): counts the 401s the app answers,
    and answers 429 with Retry-After to an address in back-off, unless its request's token is valid."""

    def __init__(self, app: ASGIApp, throttle: AuthThrottle, verifier: StoreTokenVerifier) -> None:
        self.app = app
        self.throttle = throttle
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        address = self.throttle.client_address(scope)
        wait = self.throttle.retry_after(address)
        if wait > 0 and not await self._valid_token(scope):
            self.throttle.refused(address)
            body = {"error": "too many failed authentications from your address",
                    "retry_after": math.ceil(wait)}
            await Response(json.dumps(body), status_code=429, media_type="application/json",
                           headers={"Retry-After": str(math.ceil(wait))})(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.throttle.failed(address, "invalid or missing token")
                message = with_scope(message)
            await send(message)

        await self.app(scope, receive, watch)

    async def _valid_token(self, scope: Scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if scope["path"] == "/metrics":
            return False  # the metrics token is checked by its endpoint; a user token is no use there
        return await self.verifier.verify_token(token.strip()) is not None
