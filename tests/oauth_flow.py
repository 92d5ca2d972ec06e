"""Helpers of the OAuth tests: a client's side of the authorization-code flow done by hand over
HTTP (to try what a real client library never sends), with a real browser for the person's part,
and the Python SDK's OAuth client with its browser step handed to the same browser."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from pydantic import AnyUrl

from testkit import browser


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


@dataclass
class Person:
    """Someone at the browser: a Playwright page, and the kernelpool user and token they sign in with."""

    page: Any
    user: str
    token: str

    async def authorize(self, url: str, redirect_prefix: str, *, decision: str = "Allow") -> dict[str, str]:
        """Open an authorization URL, sign in if asked, answer the consent page; the query the
        browser then brings to the client's redirect URI."""
        got = await browser.capture_redirect(self.page, redirect_prefix)
        try:
            await self.page.goto(url)
            if "/signin" in self.page.url:
                await browser.sign_in_with_token(self.page, "", self.user, self.token)
            await browser.consent(self.page, decision)
            import asyncio

            return await asyncio.wait_for(got, 30)
        finally:
            await self.page.unroute(f"{redirect_prefix}*")


@dataclass
class RawClient:
    """A public client registered by DCR, driven by hand."""

    base: str
    redirect_uri: str
    client_id: str = ""
    http: httpx2.AsyncClient = field(default_factory=lambda: httpx2.AsyncClient(timeout=30, follow_redirects=False))

    async def register(self, name: str = "raw test client") -> dict[str, Any]:
        r = await self.http.post(f"{self.base}/register", json={
            "client_name": name, "redirect_uris": [self.redirect_uri], "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"]})
        assert r.status_code == 201, r.text
        self.client_id = r.json()["client_id"]
        return dict(r.json())

    def authorize_url(self, challenge: str | None, *, state: str = "st", redirect_uri: str | None = None,
                      resource: str | None = None) -> str:
        params = {"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri or self.redirect_uri,
                  "state": state, "scope": "kernelpool", "resource": resource or f"{self.base}/mcp"}
        if challenge is not None:
            params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
        return f"{self.base}/authorize?{urllib.parse.urlencode(params)}"

    async def exchange(self, code: str, verifier: str, **extra: str) -> httpx2.Response:
        return await self.http.post(f"{self.base}/token", data={
            "grant_type": "authorization_code", "code": code, "code_verifier": verifier, "client_id": self.client_id,
            "redirect_uri": self.redirect_uri, "resource": f"{self.base}/mcp", **extra})

    async def refresh(self, refresh_token: str) -> httpx2.Response:
        return await self.http.post(f"{self.base}/token", data={
            "grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": self.client_id})

    async def tokens(self, person: Person) -> dict[str, Any]:
        """The whole flow: authorize in the browser, exchange the code."""
        verifier, challenge = pkce()
        query = await person.authorize(self.authorize_url(challenge), self.redirect_uri)
        r = await self.exchange(query["code"], verifier)
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def mcp_status(self, access_token: str) -> int:
        """The status of an MCP `initialize` made with this access token."""
        r = await self.http.post(f"{self.base}/mcp", headers={
            "Authorization": f"Bearer {access_token}", "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json"}, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
        return r.status_code


class MemoryStorage:
    """The Python SDK client's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@contextlib.asynccontextmanager
async def sdk_client(url: str, person: Person, redirect_uri: str, *, mode: str = "auto",
                     client_metadata_url: str | None = None, storage: MemoryStorage | None = None,
                     verify: Any = True) -> AsyncIterator[tuple[Any, MemoryStorage]]:
    """The Python SDK's own OAuth client (`mcp.client.auth`), its browser step done by `person`."""
    storage = storage or MemoryStorage()
    result: dict[str, str] = {}

    async def redirect_handler(authorization_url: str) -> None:
        result.clear()
        result.update(await person.authorize(authorization_url, redirect_uri))

    async def callback_handler() -> AuthorizationCodeResult:
        return AuthorizationCodeResult(code=result["code"], state=result.get("state"), iss=result.get("iss"))

    metadata = OAuthClientMetadata(client_name="kernelpool test (Python SDK)", redirect_uris=[AnyUrl(redirect_uri)],
                                   token_endpoint_auth_method="none")
    auth = OAuthClientProvider(url, metadata, storage, redirect_handler, callback_handler,
                               client_metadata_url=client_metadata_url)
    async with httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(30, read=300), verify=verify) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:  # type: ignore[arg-type]
            yield client, storage


class DocumentHost:
    """A real HTTPS server on loopback for client ID metadata documents, its certificate from a
    test CA (trustme). The server under test reaches it as `https://cimd.test:PORT/...` through its
    test-only settings (KERNELPOOL_OAUTH_CIMD_TEST_CA and _TEST_RESOLVE): the fetcher itself,
    TLS, size and time limits included, runs as in production."""

    NAME = "cimd.test"

    def __init__(self, folder: str) -> None:
        import http.server
        import os
        import ssl
        import threading

        import trustme

        self.ca = trustme.CA()
        self.ca_path = os.path.join(folder, "cimd-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        self.documents: dict[str, bytes] = {}
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = host.documents.get(self.path)
                if self.path == "/huge.json":  # 10 MB, its length not said: the reader must stop by itself
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    for _ in range(160):
                        self.wfile.write(b" " * 65536)
                    return
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(self.NAME).configure_cert(context)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"https://{self.NAME}:{self.port}{path}"

    def publish(self, path: str, document: dict[str, Any] | None = None, **fields: Any) -> str:
        import json

        url = self.url(path)
        self.documents[path] = json.dumps(document if document is not None else {"client_id": url, **fields}).encode()
        return url

    def env(self) -> dict[str, str]:
        return {"KERNELPOOL_OAUTH_CIMD_TEST_CA": self.ca_path, "KERNELPOOL_OAUTH_CIMD_TEST_RESOLVE": f"{self.NAME}=127.0.0.1"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
