"""Replicas that own users, behind a real HAProxy, on one real PostgreSQL (no Docker): two
`kernelpool serve` processes on loopback with data folders of their own (testkit/replicas.py).

What a team relies on: every kind of request of a user reaches its home replica (both protocol
families, initialize, POST, GET, DELETE; pasted, OAuth-era and pre-key tokens); a replica given
a user it does not own answers 421 and runs nothing; a revocation is refused everywhere within a
second; a user moved loses no notebook; a replica that dies costs its users their sessions only.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import signal
import time
import urllib.parse
from collections.abc import Iterator

import httpx2
import pytest

from testkit import browser
from testkit.client import mcp_client, text
from testkit.haproxy import unavailable as no_haproxy
from testkit.replicas import Cluster
from testkit.server import ROOT
from tests.conftest import SANDBOX_SKIP
from tests.oauth_flow import Person, RawClient, pkce

pytestmark = [pytest.mark.skipif(no_haproxy() is not None, reason=no_haproxy() or ""), pytest.mark.timeout(600)]

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


@pytest.fixture(scope="module")
def cluster(postgres: object, server_args: list[str]) -> Iterator[Cluster]:
    c = Cluster(postgres, ("r1", "r2"), KERNELPOOL_POOL_SIZE="0")  # type: ignore[arg-type]
    try:
        c.start(*server_args)
        c.add_user("alice", "r1")
        c.add_user("bob", "r2")
        c.add_user("carol")  # placed: the least loaded (r1 and r2 have one user each: the first by name)
        yield c
    finally:
        c.cleanup()


async def where(cluster: Cluster, user: str, token: str | None = None, mode: str = "auto") -> str:
    """Which replica ran `user`'s code: the data folder its kernel works in."""
    async with mcp_client(cluster.url, token or cluster.tokens[user], mode=mode) as c:
        r = await c.call_tool("use_notebook", {"notebook": "where.ipynb", "mode": "create"})
        assert not r.is_error or "already exists" in text(r), text(r)
        r = await c.call_tool("execute_code", {"notebook": "where.ipynb", "code": "import os; print(os.getcwd())"})
        assert not r.is_error, text(r)
    cwd = text(r).strip()
    return next(name for name, s in cluster.replicas.items() if cwd.startswith(s.data_dir))


def test_users_are_placed_and_the_map_follows(cluster: Cluster) -> None:
    assert cluster.homes == {"alice": "r1", "bob": "r2", "carol": "r1"}
    listed = cluster.cli("replicas").stdout
    assert "r1\trunning\tusers=2" in listed and "r2\trunning\tusers=1" in listed, listed
    keys = {name: token.split("_")[2] for name, token in cluster.tokens.items()}
    assert cluster.haproxy.show_map("users.map") == {keys["alice"]: "r1", keys["bob"]: "r2", keys["carol"]: "r1"}
    refused = cluster.cli("users", "add", "dave", "--replica", "r9", check=False)
    assert refused.returncode == 2 and "'r9' is not running (never seen); running: r1, r2" in refused.stderr
    assert "dave" not in cluster.cli("users", "list").stdout


def _sign_in_by_link(cluster: Cluster, http: httpx2.Client, user: str) -> httpx2.Response:
    """The sign-in link's page and its button, through the proxy; the response to the button (a
    redirect, not followed)."""
    link = cluster.cli("users", "login-link", user).stdout.strip()
    path = urllib.parse.urlsplit(link).path
    r = http.get(path)
    assert r.status_code == 200, r.text[:500]
    csrf = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert csrf, r.text[:1000]
    return http.post(path, data={"csrf": csrf.group(1)})


def test_the_web_view_sends_a_browser_to_its_persons_home_replica(cluster: Cluster) -> None:
    """bob's notebooks live on r2. His browser, kept on r1 by HAProxy's sticky cookie, signs in
    there with a one-time link; r1 sends it home: HAProxy's cookie now names r2, and the sign-in is
    handed over through the store with a ticket whose secret is half in the URL and half in a
    cookie. On r2 the view shows his notebook, which r1 does not have. A ticket is used once; a
    URL without its cookie signs nobody in; a ticket that reaches a replica not the person's home
    (HAProxy could not reach it) gets a page saying so, not another redirect."""
    for cfg in ("compose/haproxy/haproxy.cfg", "kubernetes/base/haproxy.cfg"):  # the deployments keep the server's cookie
        with open(os.path.join(ROOT, "deploy", cfg)) as f:
            assert "cookie kp_replica insert indirect nocache httponly preserve" in f.read(), cfg
    async def a_cell() -> None:  # bob's notebook, with a cell, on r2 only
        async with mcp_client(cluster.url, cluster.tokens["bob"], mode="auto") as c:
            r = await c.call_tool("use_notebook", {"notebook": "where.ipynb", "mode": "create"})
            assert not r.is_error or "already exists" in text(r), text(r)
            r = await c.call_tool("insert_execute_code_cell", {"notebook": "where.ipynb", "cell_index": -1,
                                                               "cell_source": "print('bob at home')"})
            assert not r.is_error, text(r)

    asyncio.run(a_cell())
    assert not os.path.exists(os.path.join(cluster.replicas["r1"].data_dir, "users", "bob", "where.ipynb"))
    assert os.path.exists(os.path.join(cluster.replicas["r2"].data_dir, "users", "bob", "where.ipynb"))
    def browser_on_r1() -> httpx2.Client:
        http = httpx2.Client(base_url=cluster.haproxy.base, timeout=30)
        http.cookies.set("kp_replica", "r1", domain="127.0.0.1")  # HAProxy's sticky cookie: kept on r1
        return http

    with browser_on_r1() as http:
        r = _sign_in_by_link(cluster, http, "bob")
        assert r.status_code == 303 and r.headers["location"] == "/view", r.text[:500]
        r = http.get("/view/bob/notebooks/where.ipynb")  # on r1: not bob's home
        assert r.status_code == 303 and r.headers["location"].startswith("/view/handoff/"), (r.status_code, r.text[:300])
        handoff, half = r.headers["location"], http.cookies.get("kp_handoff")
        assert http.cookies.get("kp_replica") == "r2" and half and half not in handoff
        # the URL alone (as in a log or a Referer) signs nobody in, and does not spend the ticket
        assert httpx2.get(f"{cluster.replicas['r2'].base}{handoff}", timeout=30).status_code == 401
        r = http.get(handoff)  # through the proxy, now to r2
        assert r.status_code == 303 and r.headers["location"] == "/view/bob/notebooks/where.ipynb", (r.status_code, r.text[:300])
        assert "kp_handoff" not in http.cookies, "the hand-off's half is dropped once used"
        r = http.get("/view/bob/notebooks/where.ipynb")
        assert r.status_code == 200 and "bob at home" in r.text, (r.status_code, r.text[:500])
        r = http.get("/view/bob/notebooks")
        assert r.status_code == 200 and "where.ipynb" in r.text
        # used once
        r = httpx2.get(f"{cluster.replicas['r2'].base}{handoff}", cookies={"kp_handoff": half}, timeout=30)
        assert r.status_code == 401, "a ticket is used once"
    with browser_on_r1() as http:
        assert _sign_in_by_link(cluster, http, "bob").status_code == 303
        r = http.get("/view")
        handoff, half = r.headers["location"], http.cookies.get("kp_handoff")
        assert r.status_code == 303 and handoff.startswith("/view/handoff/") and half
        # reaching r1 (HAProxy could not reach r2): a page that says so, not another redirect
        r = httpx2.get(f"{cluster.replicas['r1'].base}{handoff}", cookies={"kp_handoff": half}, timeout=30)
        assert r.status_code == 503 and "replica r2" in r.text and "not reachable" in r.text, r.text[:500]
    # alice, at home on r1 from the start, is never handed over
    with browser_on_r1() as http:
        assert _sign_in_by_link(cluster, http, "alice").status_code == 303
        r = http.get("/view/alice/notebooks")
        assert r.status_code == 200 and http.cookies.get("kp_replica") == "r1", r.status_code


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_every_call_of_a_user_reaches_its_home(cluster: Cluster, mode: str) -> None:
    for user in ("alice", "bob", "carol"):
        for _ in range(3):
            assert await where(cluster, user, mode=mode) == cluster.homes[user]


def test_initialize_get_and_delete_of_a_session_reach_the_home(cluster: Cluster) -> None:
    for user in ("alice", "bob"):
        auth = {"Authorization": f"Bearer {cluster.tokens[user]}"}
        with httpx2.Client(base_url=cluster.haproxy.base, headers=ACCEPT | auth, timeout=30) as http:
            r = http.post("/mcp", json=INIT)
            assert r.status_code == 200, r.text
            sid = r.headers["mcp-session-id"]
            session = {"mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
            r = http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
            assert r.status_code == 202, r.text
            r = http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=session)
            assert r.status_code == 200 and "execute_code" in r.text, r.text
            with http.stream("GET", "/mcp", headers=session | {"Accept": "text/event-stream"}) as stream:
                assert stream.status_code == 200, stream.read()  # the standalone stream, on the home
            assert http.delete("/mcp", headers=session).status_code == 200
            assert http.post("/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers=session).status_code == 404


def test_a_replica_given_a_user_it_does_not_own_answers_421_and_runs_nothing(cluster: Cluster) -> None:
    wrong = cluster.replicas["r2"]
    before = cluster.cli("audit", "--user", "alice", "--json").stdout.count("\n")
    for body in (INIT, {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                        "params": {"name": "execute_code", "arguments": {"notebook": "x.ipynb", "code": "1"}}}):
        r = httpx2.post(f"{wrong.base}/mcp", json=body, headers=ACCEPT | {"Authorization": f"Bearer {cluster.tokens['alice']}",
                                                                          "mcp-protocol-version": "2026-07-28"}, timeout=30)
        assert r.status_code == 421, r.text
        message = r.json()["error"]["message"]
        assert "user 'alice' lives on replica 'r1', and this is replica 'r2'" in message and "Nothing was run" in message
        assert "mcp-session-id" not in r.headers
    assert not os.path.exists(cluster.folder("alice", "r2"))
    assert cluster.cli("audit", "--user", "alice", "--json").stdout.count("\n") == before
    # a bad token is a 401 on any replica, not a 421: who it is is not known
    r = httpx2.post(f"{wrong.base}/mcp", json=INIT, headers=ACCEPT | {"Authorization": "Bearer kp_00000000_nope"}, timeout=30)
    assert r.status_code == 401


async def test_a_token_from_before_user_keys_routes_by_its_id(cluster: Cluster) -> None:
    """A token minted before this change (`kp_<id>_<secret>`, keyed 0) still reaches its user's home."""
    token_id = secrets.token_hex(4)
    old = f"kp_{token_id}_{secrets.token_urlsafe(32)}"
    digest = hashlib.sha256(old.encode()).hexdigest()
    # no command mints one any more: the row is written as the old version wrote it (both values
    # are hex digits made here: nothing to quote)
    row = f"VALUES ('{token_id}', 'bob', '{digest}', 1, 0)"
    cluster.postgres.psql(cluster.database, f'INSERT INTO tokens(id, "user", hash, created_at, keyed) {row}')
    deadline = time.monotonic() + 10
    while cluster.haproxy.show_map("tokens.map").get(token_id) != "r2":
        assert time.monotonic() < deadline, cluster.haproxy.show_map("tokens.map")
        await asyncio.sleep(0.2)
    for mode in ("legacy", "auto"):
        assert await where(cluster, "bob", old, mode) == "r2"


async def test_oauth_works_through_the_proxy_from_the_shared_store_and_its_tokens_route_home(cluster: Cluster) -> None:
    """A client registers, a person signs in and consents in the browser (kept on one replica by
    HAProxy's cookie), and the client exchanges the code and refreshes at the other replica: the
    grant, code and refresh token are in PostgreSQL. The access tokens carry bob's key and reach
    his home through the proxy."""
    if browser.missing() is not None:
        pytest.skip(f"browser: {browser.missing()}")
    from playwright.async_api import async_playwright

    redirect = "http://127.0.0.1:43112/callback"
    client = RawClient(cluster.haproxy.base, redirect)
    async with async_playwright() as playwright:
        chromium = await browser.launch(playwright)
        try:
            await client.register("replicas test client")
            bob = Person(await (await chromium.new_context()).new_page(), "bob", cluster.tokens["bob"])
            verifier, challenge = pkce()
            query = await bob.authorize(client.authorize_url(challenge), redirect)
            signed_in_on = {c["name"]: c["value"] for c in await bob.page.context.cookies()}["kp_replica"]
        finally:
            await chromium.close()
    other = next(name for name in cluster.replicas if name != signed_in_on)
    there = RawClient(cluster.replicas[other].base, redirect, client_id=client.client_id)
    back = RawClient(cluster.replicas[signed_in_on].base, redirect, client_id=client.client_id)
    try:
        r = await there.exchange(query["code"], verifier, resource=f"{cluster.haproxy.base}/mcp")
        assert r.status_code == 200, r.text
        tokens = r.json()
        assert tokens["access_token"].split("_")[2] == cluster.tokens["bob"].split("_")[2]  # bob's key: HAProxy's word(3,_)
        assert await where(cluster, "bob", tokens["access_token"]) == "r2"
        r = await back.refresh(tokens["refresh_token"])
        assert r.status_code == 200, r.text
        assert await where(cluster, "bob", r.json()["access_token"], "legacy") == "r2"
    finally:
        for raw in (there, back, client):
            await raw.http.aclose()


async def test_a_revoked_token_is_refused_on_every_replica_within_a_second(cluster: Cluster) -> None:
    token = cluster.cli("tokens", "create", "carol", on="r2").stdout.strip()
    assert await where(cluster, "carol", token) == "r1"
    for server in cluster.replicas.values():  # each replica has it remembered: accepted (r2: 421)
        r = httpx2.post(server.url, json=INIT, headers=ACCEPT | {"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code in (200, 421), r.text
    cluster.cli("tokens", "revoke", token.split("_")[1], on="r2")
    revoked = time.monotonic()
    pending = {name: s.url for name, s in cluster.replicas.items()} | {"proxy": cluster.url}
    while pending:
        for name, url in list(pending.items()):
            r = httpx2.post(url, json=INIT, headers=ACCEPT | {"Authorization": f"Bearer {token}"}, timeout=30)
            if r.status_code == 401:
                del pending[name]
        assert time.monotonic() - revoked < 1.0, f"still accepted after a second by {sorted(pending)}"
        await asyncio.sleep(0.02)


async def test_a_moved_user_loses_no_notebook_and_its_sessions_close_with_a_reason(cluster: Cluster) -> None:
    async with mcp_client(cluster.url, cluster.tokens["alice"], mode="auto") as c:
        for i in range(3):
            await c.call_tool("use_notebook", {"notebook": f"n{i}.ipynb", "mode": "create"})
            r = await c.call_tool("insert_execute_code_cell", {"notebook": f"n{i}.ipynb", "cell_index": -1,
                                                               "cell_source": f"print({i} * 7)"})
            assert not r.is_error, text(r)
        await c.call_tool("execute_code", {"notebook": "n0.ipynb", "code": "open('data.bin', 'wb').write(bytes(range(256)) * 5000)"})
    os.makedirs(os.path.join(cluster.folder("alice", "r1"), "sub"), exist_ok=True)
    before = _files(cluster.folder("alice", "r1"))
    assert {"n0.ipynb", "n1.ipynb", "n2.ipynb", "data.bin"} <= set(before)
    auth = {"Authorization": f"Bearer {cluster.tokens['alice']}"}
    with httpx2.Client(base_url=cluster.haproxy.base, headers=ACCEPT | auth, timeout=60) as http:
        sid = http.post("/mcp", json=INIT).headers["mcp-session-id"]
        session = {"mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
        http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        moved = cluster.cli("users", "move", "alice", "--to", "r2", on="r2")
        assert "moved alice to r2" in moved.stderr, moved.stderr
        assert http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=session).status_code == 404
    assert _files(cluster.folder("alice", "r2")) == before
    assert not os.path.exists(cluster.folder("alice", "r1"))
    assert cluster.home("alice") == "r2"
    assert cluster.haproxy.show_map("users.map")[cluster.tokens["alice"].split("_")[2]] == "r2"
    assert await where(cluster, "alice") == "r2"
    async with mcp_client(cluster.url, cluster.tokens["alice"], mode="legacy") as c:
        r = await c.call_tool("execute_cell", {"notebook": "n2.ipynb", "cell_index": 0})
        assert text(r).strip() == "14"
    # the old home refuses her now, with the reason
    r = httpx2.post(cluster.replicas["r1"].url, json=INIT, headers=ACCEPT | auth, timeout=30)
    assert r.status_code == 421 and "lives on replica 'r2'" in r.text


async def test_a_move_packs_as_the_user_so_what_it_cannot_read_fails_the_move_and_nothing_is_lost(cluster: Cluster) -> None:
    """tar runs as the user's uid: a link to a root-only file travels as a link, and a file the user
    made unreadable to itself fails the move with the cause; the user stays home, files and all."""
    if SANDBOX_SKIP is not None:
        pytest.skip(SANDBOX_SKIP)
    folder = cluster.folder("carol", "r1")
    assert await where(cluster, "carol") == "r1"  # her folder exists on r1
    uid = cluster.replicas["r1"].uid("carol")
    os.symlink("/etc/shadow", os.path.join(folder, "leak"))
    locked = os.path.join(folder, "locked.txt")
    with open(locked, "w") as f:
        f.write("mine")
    os.chown(locked, uid, uid)
    os.chmod(locked, 0)
    before = _files(folder)
    refused = cluster.cli("users", "move", "carol", "--to", "r2", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "moving carol failed" in refused.stderr and "locked.txt" in refused.stderr and "Permission denied" in refused.stderr
    assert "It stays on r1, files and all" in refused.stderr
    assert cluster.home("carol") == "r1" and _files(folder) == before
    assert await where(cluster, "carol") == "r1"  # served again at once
    os.chmod(locked, 0o600)
    moved = cluster.cli("users", "move", "carol", "--to", "r2")
    assert "moved carol to r2" in moved.stderr
    target = cluster.folder("carol", "r2")
    assert os.readlink(os.path.join(target, "leak")) == "/etc/shadow"  # the link, never the root-only file
    assert os.stat(os.path.join(target, "locked.txt")).st_uid == uid
    with open(os.path.join(target, "locked.txt")) as f:
        assert _files(target) == before and f.read() == "mine"
    assert await where(cluster, "carol") == "r2"
    # and back home (the other tests expect her there), the link still a link
    on_r2 = _files(target)
    back = cluster.cli("users", "move", "carol", "--to", "r1")
    assert "moved carol to r1" in back.stderr, back.stderr
    assert _files(folder) == on_r2 and not os.path.exists(target)
    assert await where(cluster, "carol") == "r1"


async def test_a_replica_that_dies_costs_its_users_their_sessions_only(cluster: Cluster, server_args: list[str]) -> None:
    r2 = cluster.replicas["r2"]
    auth = {"Authorization": f"Bearer {cluster.tokens['bob']}"}
    async with mcp_client(cluster.url, cluster.tokens["bob"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "keep.ipynb", "mode": "create"})
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "keep.ipynb", "cell_index": -1, "cell_source": "print(6 * 7)"})
        assert text(r).strip() == "42"
    with httpx2.Client(base_url=cluster.haproxy.base, headers=ACCEPT | auth, timeout=60) as http:
        sid = http.post("/mcp", json=INIT).headers["mcp-session-id"]
        r2.stop(signal.SIGKILL)
        assert await where(cluster, "carol") == "r1"  # r1's users do not notice
        r = http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                      headers={"mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"})
        assert r.status_code >= 500, r.text  # HAProxy: its home is down
        r2.start(*server_args, port=r2.port)
        deadline = time.monotonic() + 20
        while (r := http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                              headers={"mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"})).status_code >= 500:
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.3)
        assert r.status_code == 404, r.text  # the session died with the process: the client starts a new one
    async with mcp_client(cluster.url, cluster.tokens["bob"], mode="legacy") as c:
        r = await c.call_tool("read_notebook", {"notebook": "keep.ipynb", "response_format": "detailed"})
        assert "42" in text(r)
        r = await c.call_tool("execute_cell", {"notebook": "keep.ipynb", "cell_index": 0})
        assert text(r).strip() == "42"


def _files(folder: str) -> dict[str, str]:
    """Every file below `folder` (relative path -> sha256), folders (-> 'dir') and symbolic links
    (-> 'link to TARGET': never followed, so a link is compared as the link it is)."""
    found: dict[str, str] = {}
    for top, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = os.path.join(top, name)
            if os.path.islink(path):
                found[os.path.relpath(path, folder)] = f"link to {os.readlink(path)}"
            elif name in dirs:
                found[os.path.relpath(path, folder)] = "dir"
            else:
                with open(path, "rb") as fh:
                    found[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return {k: v for k, v in found.items() if not k.startswith((".ipynb_checkpoints", ".local", ".cache", ".ipython"))}
