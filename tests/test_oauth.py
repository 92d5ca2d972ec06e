"""kernelpool as an OAuth 2.1 authorization server, with real clients and a real browser.

One server (alice, bob, carol) and one headless Chromium serve the whole module; each test
signs in through the browser as a person would. The Python SDK's OAuth client does the whole
flow by DCR; a client driven by hand over HTTP tries what a well-behaved library never sends
(no PKCE, a wrong verifier, a code used twice or late, another resource, an old refresh token,
a consent without its CSRF token) and each must be refused with nothing issued.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest
import pytest_asyncio

from testkit import browser
from testkit.client import mcp_client, text
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.oauth_flow import DocumentHost, Person, RawClient, pkce, sdk_client

pytestmark = [
    pytest.mark.skipif(browser.missing() is not None, reason=f"browser tests: {browser.missing()}"),
    pytest.mark.asyncio(loop_scope="module"),
]

REDIRECT = "http://127.0.0.1:43111/callback"


@pytest.fixture(scope="module")
def documents() -> Iterator[DocumentHost]:
    folder = tempfile.mkdtemp(prefix="kp-cimd-")
    host = DocumentHost(folder)
    try:
        yield host
    finally:
        host.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def oauth_kp(server_args: list[str], documents: DocumentHost) -> Iterator[KernelpoolServer]:
    server = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="0", KERNELPOOL_OAUTH_CODE_TTL="3",
                                                          **documents.env()))
    try:
        for name in ("alice", "bob", "carol"):
            server.add_user(name)
        server.start(*server_args)
        yield server
    finally:
        server.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Any]:
    async with browser.chromium() as b:
        yield b


@pytest_asyncio.fixture(loop_scope="module")
async def alice(chromium: Any, oauth_kp: KernelpoolServer) -> AsyncIterator[Person]:
    context = await chromium.new_context()  # a browser of her own: cookies start empty
    try:
        yield Person(await context.new_page(), "alice", oauth_kp.tokens["alice"])
    finally:
        await context.close()


@pytest_asyncio.fixture(loop_scope="module")
async def raw(oauth_kp: KernelpoolServer) -> AsyncIterator[RawClient]:
    client = RawClient(oauth_kp.base, REDIRECT)
    await client.register()
    try:
        yield client
    finally:
        await client.http.aclose()


async def test_python_sdk_signs_in_by_dcr_and_runs_code(oauth_kp: KernelpoolServer, alice: Person) -> None:
    async with sdk_client(oauth_kp.url, alice, REDIRECT) as (client, storage):
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"execute_code", "use_notebook"} <= tools
        r = await client.call_tool("use_notebook", {"notebook": "oauth/sdk.ipynb", "mode": "create"})
        assert not r.is_error, text(r)
        r = await client.call_tool("execute_code", {"notebook": "oauth/sdk.ipynb", "code": "1+1"})
        assert not r.is_error and text(r) == "2", text(r)
    assert storage.client is not None and storage.client.token_endpoint_auth_method == "none"
    assert storage.tokens is not None and storage.tokens.access_token.startswith("kp_")
    assert storage.tokens.refresh_token and storage.tokens.expires_in and storage.tokens.expires_in <= 3600
    listed = oauth_kp.cli("tokens", "list", "alice").stdout
    assert "oauth client='kernelpool test (Python SDK)'" in listed and "active" in listed
    audit = oauth_kp.cli("audit", "--user", "alice").stdout
    for event in ("auth.signin", "auth.consent", "auth.token"):
        assert event in audit
    assert storage.tokens.access_token not in audit and storage.tokens.refresh_token not in audit


async def test_the_401_and_the_metadata_lead_a_client_here(oauth_kp: KernelpoolServer) -> None:
    async with httpx2.AsyncClient(timeout=10) as http:
        r = await http.post(oauth_kp.url, json={})
        assert r.status_code == 401
        challenge = r.headers["www-authenticate"]
        assert f'resource_metadata="{oauth_kp.base}/.well-known/oauth-protected-resource/mcp"' in challenge
        assert 'scope="kernelpool"' in challenge
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            prm = (await http.get(oauth_kp.base + path)).json()
            assert prm["resource"] == oauth_kp.url and prm["authorization_servers"] == [oauth_kp.base]
        meta = (await http.get(f"{oauth_kp.base}/.well-known/oauth-authorization-server")).json()
    assert meta["issuer"] == oauth_kp.base
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["client_id_metadata_document_supported"] is True
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["registration_endpoint"] == f"{oauth_kp.base}/register"


async def test_the_response_names_the_issuer_and_codes_are_single_use(raw: RawClient, alice: Person) -> None:
    verifier, challenge = pkce()
    query = await alice.authorize(raw.authorize_url(challenge, state="s1"), REDIRECT)
    assert query["iss"] == raw.base and query["state"] == "s1"
    first = await raw.exchange(query["code"], verifier)
    assert first.status_code == 200, first.text
    access = first.json()["access_token"]
    assert await raw.mcp_status(access) == 200
    again = await raw.exchange(query["code"], verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # a code used twice ends what it gave (RFC 6749 §4.1.2), within a second
    await asyncio.sleep(1.0)
    assert await raw.mcp_status(access) == 401


async def test_refused_without_pkce_with_a_wrong_verifier_or_late(raw: RawClient, alice: Person) -> None:
    async with httpx2.AsyncClient(timeout=10, follow_redirects=False) as http:
        r = await http.get(raw.authorize_url(None))
    assert r.status_code in (302, 400)
    assert "code=" not in r.headers.get("location", "") and "code_challenge" in (r.headers.get("location", "") + r.text)
    verifier, challenge = pkce()
    query = await alice.authorize(raw.authorize_url(challenge), REDIRECT)
    wrong = await raw.exchange(query["code"], pkce()[0])
    assert wrong.status_code == 400 and "code_verifier" in wrong.json()["error_description"]
    # the code is spent by the failed try: the right verifier is too late now
    assert (await raw.exchange(query["code"], verifier)).status_code == 400
    verifier, challenge = pkce()
    query = await alice.authorize(raw.authorize_url(challenge), REDIRECT)
    await asyncio.sleep(3.5)  # KERNELPOOL_OAUTH_CODE_TTL=3 on this server (at most 60 s in production)
    late = await raw.exchange(query["code"], verifier)
    assert late.status_code == 400 and "expired" in late.json()["error_description"]


async def test_unregistered_redirect_and_another_resource_are_refused(raw: RawClient, alice: Person) -> None:
    async with httpx2.AsyncClient(timeout=10, follow_redirects=False) as http:
        r = await http.get(raw.authorize_url(pkce()[1], redirect_uri="http://127.0.0.1:43111/elsewhere"))
        assert r.status_code == 400 and "not registered" in r.json()["error_description"]
        r = await http.get(raw.authorize_url(pkce()[1], redirect_uri="https://attacker.example/callback"))
        assert r.status_code == 400 and "location" not in r.headers
        r = await http.get(raw.authorize_url(pkce()[1], resource="https://other.example/mcp"))
    # the redirect URI is registered, so the error goes back to the client, without a code
    assert r.status_code == 302 and "error=invalid_target" in r.headers["location"] and "code=" not in r.headers["location"]
    verifier, challenge = pkce()
    query = await alice.authorize(raw.authorize_url(challenge), REDIRECT)
    other = await raw.exchange(query["code"], verifier, resource="https://other.example/mcp")
    assert other.status_code == 400 and other.json()["error"] == "invalid_target"
    # a loopback redirect URI matches on any port (RFC 8252), and nothing else about it may change
    verifier, challenge = pkce()
    query = await alice.authorize(raw.authorize_url(challenge, redirect_uri="http://127.0.0.1:50999/callback"),
                                  "http://127.0.0.1:50999/callback")
    assert "code" in query


async def test_a_rotated_out_refresh_token_revokes_the_grant(raw: RawClient, alice: Person) -> None:
    tokens = await raw.tokens(alice)
    r = await raw.refresh(tokens["refresh_token"])
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["refresh_token"] != tokens["refresh_token"] and rotated["access_token"] != tokens["access_token"]
    assert await raw.mcp_status(rotated["access_token"]) == 200
    reused = await raw.refresh(tokens["refresh_token"])
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    await asyncio.sleep(1.0)
    assert await raw.mcp_status(rotated["access_token"]) == 401
    assert (await raw.refresh(rotated["refresh_token"])).status_code == 400


async def test_consent_needs_its_csrf_token_and_deny_gives_nothing(raw: RawClient, alice: Person) -> None:
    url = raw.authorize_url(pkce()[1])
    await alice.page.goto(url)
    if "/signin" in alice.page.url:
        await browser.sign_in_with_token(alice.page, "", alice.user, alice.token)
    assert "/consent" in alice.page.url
    txn = alice.page.url.split("txn=")[1]
    # the same browser (its cookie goes along) posting the form without its token
    r = await alice.page.request.post(f"{raw.base}/consent", form={"txn": txn, "decision": "allow"}, max_redirects=0)
    assert r.status == 403 and "location" not in r.headers
    query = await alice.authorize(url, REDIRECT, decision="Deny")
    assert query["error"] == "access_denied" and "code" not in query


async def test_alice_token_never_reaches_bob(oauth_kp: KernelpoolServer, raw: RawClient, alice: Person) -> None:
    async with mcp_client(oauth_kp.url, oauth_kp.tokens["bob"], mode="auto") as bob:
        assert not (await bob.call_tool("use_notebook", {"notebook": "bobs.ipynb", "mode": "create"})).is_error
        assert not (await bob.call_tool("execute_code", {"notebook": "bobs.ipynb", "code": "secret = 42"})).is_error
    tokens = await raw.tokens(alice)
    async with mcp_client(oauth_kp.url, tokens["access_token"], mode="auto") as c:
        r = await c.call_tool("read_notebook", {"notebook": "bobs.ipynb"})
        assert r.is_error and "not found" in text(r)
        listed = (await c.call_tool("list_notebooks", {})).structured_content
        assert all(n["path"] != "bobs.ipynb" for n in listed["notebooks"])
        kernels = (await c.call_tool("list_kernels", {})).structured_content
        assert all(k["notebook"] != "bobs.ipynb" for k in kernels["kernels"])
        resources = await c.list_resources()
        assert all("bobs" not in str(res.uri) for res in resources.resources)
        r = await c.call_tool("execute_code", {"notebook": "bobs.ipynb", "code": "print(secret)"})
        assert r.is_error and "42" not in text(r)


async def test_revoked_grant_and_removed_user_are_refused_within_a_second(
        oauth_kp: KernelpoolServer, raw: RawClient, chromium: Any) -> None:
    context = await chromium.new_context()
    try:
        carol = Person(await context.new_page(), "carol", oauth_kp.tokens["carol"])
        tokens = await raw.tokens(carol)
        assert await raw.mcp_status(tokens["access_token"]) == 200
        grant = next(line.split("\t")[0] for line in oauth_kp.cli("tokens", "list", "carol").stdout.splitlines()
                     if "oauth client" in line and "active" in line)
        oauth_kp.cli("tokens", "revoke", grant)
        start = time.monotonic()
        while await raw.mcp_status(tokens["access_token"]) != 401:
            assert time.monotonic() - start < 1.0, "a revoked grant still works after a second"
            await asyncio.sleep(0.05)
        assert (await raw.refresh(tokens["refresh_token"])).status_code == 400
        tokens = await raw.tokens(carol)
        oauth_kp.cli("users", "remove", "carol")
        start = time.monotonic()
        while await raw.mcp_status(tokens["access_token"]) != 401:
            assert time.monotonic() - start < 1.0, "a removed user's token still works after a second"
            await asyncio.sleep(0.05)
        assert (await raw.refresh(tokens["refresh_token"])).status_code == 400
    finally:
        await context.close()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_pasted_tokens_work_as_before(oauth_kp: KernelpoolServer, mode: str) -> None:
    async with mcp_client(oauth_kp.url, oauth_kp.tokens["bob"], mode=mode) as c:
        r = await c.call_tool("list_notebooks", {})
        assert not r.is_error, text(r)


async def test_a_login_link_signs_in_once(oauth_kp: KernelpoolServer, raw: RawClient, chromium: Any) -> None:
    context = await chromium.new_context()
    try:
        page = await context.new_page()
        verifier, challenge = pkce()
        got = await browser.capture_redirect(page, REDIRECT)
        await page.goto(raw.authorize_url(challenge))
        assert "/signin" in page.url
        link = oauth_kp.cli("users", "login-link", "bob", "--base-url", oauth_kp.base).stdout.strip()
        assert link.startswith(f"{oauth_kp.base}/login/")
        await page.goto(link)
        await page.get_by_role("button", name="Sign in as bob").click()
        await browser.consent(page)
        query = await asyncio.wait_for(got, 30)
        r = await raw.exchange(query["code"], verifier)
        assert r.status_code == 200
        async with mcp_client(oauth_kp.url, r.json()["access_token"], mode="auto") as c:
            assert "bobs.ipynb" in text(await c.call_tool("list_notebooks", {}))
        # used once: the same link again signs no one in
        other = await context.browser.new_context()
        await (page := await other.new_page()).goto(link)
        assert "not valid" in await page.title()
        await other.close()
    finally:
        await context.close()


async def test_python_sdk_signs_in_by_client_metadata_document(oauth_kp: KernelpoolServer, documents: DocumentHost,
                                                              alice: Person) -> None:
    url = documents.publish("/sdk-client.json", client_name="kernelpool test (CIMD)", redirect_uris=[REDIRECT],
                            token_endpoint_auth_method="none", grant_types=["authorization_code", "refresh_token"])
    async with sdk_client(oauth_kp.url, alice, REDIRECT, client_metadata_url=url) as (client, storage):
        assert not (await client.call_tool("use_notebook", {"notebook": "oauth/cimd.ipynb", "mode": "create"})).is_error
        r = await client.call_tool("execute_code", {"notebook": "oauth/cimd.ipynb", "code": "1+1"})
        assert not r.is_error and text(r) == "2", text(r)
    assert storage.client is not None and storage.client.client_id == url  # no registration happened
    assert "oauth client='kernelpool test (CIMD)'" in oauth_kp.cli("tokens", "list", "alice").stdout


async def _authorize_status(base: str, client_id: str) -> httpx2.Response:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s",
              "code_challenge": pkce()[1], "code_challenge_method": "S256"}
    async with httpx2.AsyncClient(timeout=30, follow_redirects=False) as http:
        return await http.get(f"{base}/authorize", params=params)


async def test_client_metadata_documents_that_are_refused(oauth_kp: KernelpoolServer, documents: DocumentHost) -> None:
    good = documents.publish("/good.json", client_name="ok", redirect_uris=[REDIRECT])
    r = await _authorize_status(oauth_kp.base, good)
    assert r.status_code == 302 and "/signin?txn=" in r.headers["location"]
    cases = {
        # loopback and private addresses: the real server is there, but never reached
        f"https://localhost:{documents.port}/good.json": "private, loopback or link-local",
        f"https://127.0.0.1:{documents.port}/good.json": "private, loopback or link-local",
        "https://10.1.2.3/client.json": "private, loopback or link-local",
        "https://169.254.169.254/latest/meta-data.json": "private, loopback or link-local",
        "https://[::1]/client.json": "private, loopback or link-local",
        documents.url("/huge.json"): "larger than",
        documents.url("/missing.json"): "HTTP 404",
        documents.publish("/not-mine.json", client_id="https://elsewhere.example/c.json", redirect_uris=[REDIRECT]):
            "not its own URL",
        documents.publish("/secret.json", redirect_uris=[REDIRECT], token_endpoint_auth_method="client_secret_post"):
            "only public clients",
        documents.publish("/js.json", redirect_uris=["javascript:alert(1)"]): "not found",
    }
    for client_id, why in cases.items():
        start = time.monotonic()
        r = await _authorize_status(oauth_kp.base, client_id)
        assert r.status_code == 400 and "location" not in r.headers, (client_id, r.status_code, r.text)
        assert why in r.json()["error_description"], (client_id, r.text)
        assert time.monotonic() - start < 6, client_id
    audit = oauth_kp.cli("audit").stdout
    assert "huge.json" in audit and "refused" in audit


async def test_tools_and_server_are_presented_to_clients(oauth_kp: KernelpoolServer) -> None:
    async with mcp_client(oauth_kp.url, oauth_kp.tokens["bob"], mode="legacy") as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        info = c.server_info
    for tool in tools.values():
        assert tool.title and tool.annotations is not None, tool.name
        assert tool.annotations.read_only_hint is not None and tool.annotations.destructive_hint is not None, tool.name
    assert tools["read_notebook"].annotations.read_only_hint is True
    assert tools["delete_cell"].annotations.destructive_hint is True
    for name in ("list_notebooks", "list_kernels", "use_notebook", "insert_cell", "move_cell"):
        assert tools[name].output_schema is not None, name
    assert set(tools["list_notebooks"].output_schema["properties"]) == {"notebooks", "active"}
    assert info is not None and info.title == "kernelpool"
    assert info.icons and info.icons[0].src == f"{oauth_kp.base}/icon.svg"
    async with httpx2.AsyncClient() as http:
        icon = await http.get(f"{oauth_kp.base}/icon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


async def _signin_form(http: httpx2.AsyncClient, base: str, client_id: str) -> tuple[str, str]:
    """Start an authorization as a browser would: (txn, the form's CSRF token)."""
    r = await http.get(f"{base}/authorize", params={
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s",
        "code_challenge": pkce()[1], "code_challenge_method": "S256"})
    txn = r.headers["location"].split("txn=")[1]
    page = (await http.get(f"{base}/signin", params={"txn": txn})).text
    return txn, page.split('name="csrf" value="')[1].split('"')[0]


async def test_a_flood_of_bad_sign_ins_gets_429(server_args: list[str]) -> None:
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_AUTH_FAILURES_BEFORE_BACKOFF="3", KERNELPOOL_TRUSTED_PROXIES="127.0.0.1/32"))
    try:
        server.add_user("erin")
        server.start(*server_args)

        async def flood() -> None:
            raw = RawClient(server.base, REDIRECT)
            await raw.register()
            async with httpx2.AsyncClient(timeout=10, follow_redirects=False) as http:
                txn, csrf = await _signin_form(http, server.base, raw.client_id)
                form = {"csrf": csrf, "txn": txn, "user": "erin", "token": "kp_bad_bad"}
                # per user: each try from another address, so only the user's count can stop them
                statuses = [(await http.post(f"{server.base}/signin", data=form,
                                             headers={"X-Forwarded-For": f"192.0.2.{i}"})).status_code for i in range(5)]
                assert statuses[:3] == [401, 401, 401] and statuses[3:] == [429, 429], statuses
                # even the right token is held back while the user is in back-off
                right = form | {"token": server.tokens["erin"]}
                r = await http.post(f"{server.base}/signin", data=right, headers={"X-Forwarded-For": "192.0.2.99"})
                assert r.status_code == 429 and "Too many failed sign-ins for erin" in r.text
                # per address: one address trying several names
                for i in range(3):
                    r = await http.post(f"{server.base}/signin", data=form | {"user": f"nobody{i}"},
                                        headers={"X-Forwarded-For": "198.51.100.7"})
                    assert r.status_code == 401
                r = await http.post(f"{server.base}/signin", data=form | {"user": "nobody9"},
                                    headers={"X-Forwarded-For": "198.51.100.7"})
                assert r.status_code == 429 and r.headers["retry-after"]
                # the form without its CSRF token is refused before any of that
                r = await http.post(f"{server.base}/signin", data={"txn": txn, "user": "erin", "token": "x"},
                                    headers={"X-Forwarded-For": "203.0.113.5"})
                assert r.status_code == 403
            await raw.http.aclose()

        await flood()
        audit = server.cli("audit", "--user", "erin").stdout
        assert "auth.signin" in audit and "refused" in audit and server.tokens["erin"] not in audit
    finally:
        server.cleanup()
