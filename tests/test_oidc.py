"""Signing in through a team's OpenID Connect provider (the `oidc_*` settings), against a real one.

One provider process serves the module: panva's oidc-provider (tests/node/oidc-provider.mjs,
pinned in tests/node), on loopback over plain HTTP, with test accounts and its own small login
page; one headless Chromium. Three kernelpool servers use it: `oidc_kp` lets in verified
example.com addresses and the group `kernelpool` and creates their users; `strict_kp` names
users by e-mail address, reads its client secret from a file and creates nobody; `down_kp`'s
provider is not there. A person goes from an MCP client's authorization request through
kernelpool's sign-in page, the provider's login and kernelpool's consent page back to the client,
which then runs code as the user the provider named. Answers that were not asked for, used
twice, or carry a token for another nonce are refused, and nothing is created for anyone the
rule does not let in. The module's first tests check the claim rules and settings directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import pytest_asyncio

from kernelpool.config import load_settings
from kernelpool.users.upstream import Refused, rule_admits, user_name
from kernelpool.web.oidc import UpstreamSignIn, _secure, client_secret
from testkit import browser
from testkit.client import mcp_client, text
from testkit.server import KernelpoolServer, free_port, make_data_dir, server_env
from tests import node_env
from tests.conftest import SANDBOX_SKIP
from tests.oauth_flow import Person, RawClient, pkce, sdk_client

NAME = "Test IdP"
REDIRECT = "http://127.0.0.1:43112/callback"
CALLBACK = "/signin/oidc/callback"
SECRETS = {"kp-main": secrets.token_urlsafe(24), "kp-strict": secrets.token_urlsafe(24)}
ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": {"preferred_username": "alice", "email": "alice@example.com", "email_verified": True, "groups": ["kernelpool"]},
    "newton": {"preferred_username": "newton", "email": "newton@example.com", "email_verified": True, "groups": []},
    "grace": {"preferred_username": "grace", "email": "grace@elsewhere.org", "email_verified": True,
              "groups": ["staff", "kernelpool"]},
    "otto": {"preferred_username": "otto", "email": "otto@example.com", "email_verified": True, "groups": []},
    "mallory": {"preferred_username": "mallory", "email": "mallory@elsewhere.org", "email_verified": True, "groups": ["staff"]},
    "eve": {"preferred_username": "eve", "email": "eve@example.com", "email_verified": False, "groups": []},
    "badname": {"preferred_username": "Bad.Name", "email": "badname@example.com", "email_verified": True, "groups": []},
}


# --- the rules, directly ---------------------------------------------------------------------

def _settings(**given: Any) -> Any:
    base = {"oidc_issuer": "https://idp.example.com/realms/team", "oidc_client_id": "kp", "oidc_client_secret": "s"}
    return load_settings(**(base | given))


def test_the_user_claim_names_a_valid_user_or_nobody() -> None:
    settings = _settings()
    assert user_name(settings, {"preferred_username": "alice"}) == "alice"
    for claims in ({}, {"preferred_username": ""}, {"preferred_username": 7}, {"preferred_username": "Alice"},
                   {"preferred_username": "alice.smith"}, {"preferred_username": "a" * 32}, {"preferred_username": "1a"}):
        with pytest.raises(Refused):
            user_name(settings, claims)
    by_mail = _settings(oidc_user_claim="email", oidc_user_domain="example.com")
    assert user_name(by_mail, {"email": "bob@Example.COM", "email_verified": True}) == "bob"
    for mail in ({"email": "bob@example.com", "email_verified": False}, {"email": "bob@example.com"},
                 {"email": "bob@example.com.evil.test", "email_verified": True}, {"email": "bob", "email_verified": True},
                 {"email": "Bob@example.com", "email_verified": True}):
        with pytest.raises(Refused):
            user_name(by_mail, mail)


def test_the_rule_wants_a_verified_domain_or_a_group() -> None:
    settings = _settings(oidc_allowed_domains="Example.com", oidc_allowed_groups="kernelpool,/team/kp")
    assert rule_admits(settings, {"email": "a@example.COM", "email_verified": True}) == "e-mail domain example.com"
    assert rule_admits(settings, {"email": "a@example.com", "email_verified": False}) is None
    assert rule_admits(settings, {"email": "a@example.com", "email_verified": "false"}) is None
    assert rule_admits(settings, {"email": "a@sub.example.com", "email_verified": True}) is None
    assert rule_admits(settings, {"groups": ["x", "/team/kp"]}) == "group /team/kp"
    assert rule_admits(settings, {"groups": "kernelpool"}) == "group kernelpool"
    assert rule_admits(settings, {"groups": ["KERNELPOOL", "kernelpool-admins"]}) is None
    assert rule_admits(_settings(), {}) == "no rule set"


def test_oidc_settings_that_are_refused() -> None:
    for given, why in (
        ({"oidc_issuer": "http://idp.example.com"}, "https"),
        ({"oidc_client_secret": None}, "oidc_client_secret"),
        ({"oidc_client_secret_file": "/run/secrets/kp"}, "one of"),
        ({"oidc_scopes": "email,profile"}, "openid"),
        ({"oidc_create_users": True}, "oidc_allowed_domains or oidc_allowed_groups"),
        ({"host": "0.0.0.0"}, "needs public_url"),
        ({"oauth": False}, "needs oauth on"),
    ):
        with pytest.raises(ValueError, match=why):
            _settings(**given)
    assert _settings(oidc_issuer="http://localhost:8080/").oidc_issuer == "http://localhost:8080/"  # kept exactly
    assert _settings(host="0.0.0.0", public_url="https://kp.example.com").oidc_issuer
    assert "s" not in repr(_settings().oidc_client_secret).replace("SecretStr", "")


def test_the_provider_endpoints_and_the_secret_file(tmp_path: Any) -> None:
    assert _secure("https://idp.example.com/token") and _secure("http://localhost:8080/token")
    assert _secure("http://127.0.0.1:9/jwks") and _secure("http://[::1]:9/jwks")
    for url in ("http://idp.example.com/token", "http://10.0.0.5/jwks", "ftp://idp.example.com/x", "https:///x", None, 7):
        assert not _secure(url), url
    secret = tmp_path / "secret"
    secret.write_text("  the-secret\n")
    assert client_secret(_settings(oidc_client_secret=None, oidc_client_secret_file=str(secret))) == "the-secret"
    secret.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        client_secret(_settings(oidc_client_secret=None, oidc_client_secret_file=str(secret)))
    with pytest.raises(ValueError, match="No such file"):
        client_secret(_settings(oidc_client_secret=None, oidc_client_secret_file=str(tmp_path / "missing")))


async def test_id_tokens_verify_only_with_the_providers_published_key_pairs() -> None:
    """What authlib is asked to check, given a provider's keys (no network: the discovery
    document and its keys are as loaded): another key, the client secret as an HMAC key, no
    signature, another audience, issuer or nonce, an expired token, each refused."""
    from joserfc import jwt
    from joserfc.errors import JoseError
    from joserfc.jwk import OctKey, RSAKey

    issuer = "https://idp.example.com"
    settings = _settings(oidc_issuer=issuer, oidc_client_secret="the-client-secret-of-kernelpool!")
    signin = UpstreamSignIn(settings, cast(Any, None), cast(Any, None), base_url="https://kp.example.com")
    key, other = RSAKey.generate_key(2048, parameters={"kid": "k1"}), RSAKey.generate_key(2048, parameters={"kid": "k1"})
    signin.client.server_metadata.update({
        "issuer": issuer, "authorization_endpoint": f"{issuer}/auth", "token_endpoint": f"{issuer}/token",
        "jwks_uri": f"{issuer}/jwks", "jwks": {"keys": [key.as_dict(private=False)]}, "_loaded_at": time.time(),
        "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"]})
    await signin._metadata()
    assert signin.client.server_metadata["id_token_signing_alg_values_supported"] == ["RS256"]
    now = int(time.time())
    claims = {"iss": issuer, "sub": "s1", "aud": "kp", "exp": now + 300, "iat": now, "nonce": "n1"}

    async def verify(id_token: str, nonce: str = "n1") -> Any:
        # as the callback has authlib check it (authorize_access_token passes these on)
        return await signin.client.parse_id_token({"id_token": id_token, "access_token": "at"}, nonce=nonce,
                                                  claims_options=signin.claims_options())

    assert (await verify(jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)))["sub"] == "s1"
    both = claims | {"aud": ["kp", "another-client"], "azp": "kp"}
    assert (await verify(jwt.encode({"alg": "RS256", "kid": "k1"}, both, key)))["sub"] == "s1"
    unsigned = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key).rsplit(".", 1)[0] + "."
    forged = [
        jwt.encode({"alg": "RS256", "kid": "k1"}, claims, other),
        jwt.encode({"alg": "HS256"}, claims, OctKey.import_key("the-client-secret-of-kernelpool!")),
        unsigned,
        *(jwt.encode({"alg": "RS256", "kid": "k1"}, claims | change, key) for change in (
            {"aud": "another-client"}, {"aud": "another-client", "azp": "kp"}, {"aud": ["another-client"], "azp": "kp"}, {"iss": "https://idp.attacker.example"}, {"nonce": "n2"},
            {"exp": now - 3600, "iat": now - 7200})),
    ]
    for token in forged:
        with pytest.raises(JoseError):
            await verify(token)


# --- a real provider, real servers, a real browser --------------------------------------------

@dataclass
class Provider:
    issuer: str
    proc: subprocess.Popen[str]


@pytest.fixture(scope="module")
def folder() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kp-oidc-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {name: free_port() for name in ("provider", "main", "strict", "down")}


@pytest.fixture(scope="module")
def provider(folder: str, ports: dict[str, int]) -> Iterator[Provider]:
    why = node_env.missing() or browser.missing()
    if why:
        pytest.skip(f"OpenID provider tests: {why}")
    node_env.ensure_installed()
    config = {
        "port": ports["provider"],
        "clients": [{"client_id": client, "client_secret": SECRETS[client],
                     "redirect_uris": [f"http://127.0.0.1:{ports[server]}{CALLBACK}"]}
                    for client, server in (("kp-main", "main"), ("kp-strict", "strict"))],
        "accounts": {name: {"password": f"pw-{name}", "claims": claims} for name, claims in ACCOUNTS.items()},
    }
    with open(os.path.join(folder, "provider.log"), "w") as log:
        proc = subprocess.Popen([shutil.which("node") or "node", "oidc-provider.mjs"], cwd=node_env.NODE_DIR,
                                stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "KP_OIDC": json.dumps(config)})
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the OpenID provider did not start in 30 s"
        yield Provider(json.loads(proc.stdout.readline())["issuer"], proc)
    finally:
        proc.terminate()
        proc.wait(10)


def _oidc_env(provider: Provider, client: str, **extra: str) -> dict[str, str]:
    return server_env(KERNELPOOL_POOL_SIZE="0", KERNELPOOL_OIDC_ISSUER=provider.issuer, KERNELPOOL_OIDC_CLIENT_ID=client,
                      KERNELPOOL_OIDC_SCOPES="openid,email,profile,groups", **extra)


@pytest.fixture(scope="module")
def servers(server_args: list[str], provider: Provider, ports: dict[str, int], folder: str) -> Iterator[dict[str, KernelpoolServer]]:
    """Both servers, started right after the provider: their ports were chosen for its redirect
    URIs, and a port is free only until another process on this shared machine takes it."""
    secret_file = os.path.join(folder, "client-secret")
    with open(secret_file, "w") as f:
        f.write(SECRETS["kp-strict"] + "\n")
    main = KernelpoolServer(make_data_dir(), _oidc_env(
        provider, "kp-main", KERNELPOOL_OIDC_NAME=NAME, KERNELPOOL_OIDC_CLIENT_SECRET=SECRETS["kp-main"],
        KERNELPOOL_OIDC_ALLOWED_DOMAINS="example.com", KERNELPOOL_OIDC_ALLOWED_GROUPS="kernelpool",
        KERNELPOOL_OIDC_CREATE_USERS="true", KERNELPOOL_LOG_LEVEL="debug"))  # debug: nothing secret even there
    strict = KernelpoolServer(make_data_dir(), _oidc_env(
        provider, "kp-strict", KERNELPOOL_OIDC_NAME=NAME, KERNELPOOL_OIDC_CLIENT_SECRET_FILE=secret_file,
        KERNELPOOL_OIDC_USER_CLAIM="email", KERNELPOOL_OIDC_USER_DOMAIN="example.com",
        # an alice of its own beside main's: Unix accounts and cgroups of other names
        KERNELPOOL_ACCOUNT_PREFIX=f"kps{os.getpid() % 100000}-", KERNELPOOL_CGROUP_PREFIX=f"kernelpool-test-{os.getpid()}-s"))
    try:
        for server, port in ((main, ports["main"]), (strict, ports["strict"])):
            server.add_user("alice")
            server.start(*server_args, port=port)
        yield {"main": main, "strict": strict}
    finally:
        main.cleanup()
        strict.cleanup()


@pytest.fixture(scope="module")
def oidc_kp(servers: dict[str, KernelpoolServer]) -> KernelpoolServer:
    """Lets in verified example.com addresses and the group kernelpool, and creates their users."""
    return servers["main"]


@pytest.fixture(scope="module")
def strict_kp(servers: dict[str, KernelpoolServer]) -> KernelpoolServer:
    """Names users by their example.com address, reads its client secret from a file, creates nobody."""
    return servers["strict"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium(provider: Provider) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        b = await browser.launch(playwright)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(chromium: Any) -> AsyncIterator[Any]:
    context = await chromium.new_context()  # a browser of its own: no cookie of another test
    try:
        yield await context.new_page()
    finally:
        await context.close()


@dataclass
class OidcPerson(Person):
    """Someone who signs in to kernelpool with their account at the provider."""

    issuer: str = ""
    password: str = ""

    async def authorize(self, url: str, redirect_prefix: str, *, decision: str = "Allow") -> dict[str, str]:
        got = await browser.capture_redirect(self.page, redirect_prefix)
        try:
            await self.page.goto(url)
            if "/signin" in self.page.url:
                await self.through_provider()
            await browser.consent(self.page, decision)
            return await asyncio.wait_for(got, 30)
        finally:
            await self.page.unroute(f"{redirect_prefix}*")

    async def through_provider(self, name: str = NAME) -> None:
        """On kernelpool's sign-in page: the provider's button, then its login (unless the
        provider remembers this browser); ends on the page kernelpool shows after the answer."""
        await self.page.get_by_role("button", name=f"Sign in with {name}").click()
        if self.page.url.startswith(f"{self.issuer}/interaction/"):
            await self.page.get_by_label("Account").fill(self.user)
            await self.page.get_by_label("Password").fill(self.password)
            await self.page.get_by_role("button", name="Log in").click()
        await self.page.wait_for_load_state()


def person(page: Any, provider: Provider, login: str) -> OidcPerson:
    return OidcPerson(page, login, "", issuer=provider.issuer, password=f"pw-{login}")


async def attempt(kp: KernelpoolServer, someone: OidcPerson) -> str:
    """An authorization request of a new client, and a sign-in through the provider: the title of
    the page the browser ends on (kernelpool's consent page, or why not)."""
    client = RawClient(kp.base, REDIRECT)
    await client.register()
    await client.http.aclose()
    await someone.page.goto(client.authorize_url(pkce()[1]))
    await someone.through_provider()
    return str(await someone.page.title())


async def signed_in_as_nobody(kp: KernelpoolServer, page: Any) -> bool:
    """Whether a new authorization request in this browser asks it to sign in (rather than
    going straight to the consent page of someone signed in)."""
    client = RawClient(kp.base, REDIRECT)
    await client.register()
    await client.http.aclose()
    await page.goto(client.authorize_url(pkce()[1]))
    return str(await page.title()) == "Sign in · kernelpool"


def audit(kp: KernelpoolServer, *, after: float = 0.0, wanted: str = "") -> list[dict[str, Any]]:
    """The auth.oidc rows of the audit log since `after` (waiting briefly for one with `wanted`)."""
    deadline = time.monotonic() + 5
    while True:
        rows = [json.loads(line) for line in kp.cli("audit", "--json").stdout.splitlines()]
        rows = [r for r in rows if r["tool"].startswith("auth.oidc") and r["ts"] >= after]
        if wanted in json.dumps(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def whole_log(kp: KernelpoolServer) -> str:
    with open(kp.log_path) as f:  # KernelpoolServer.log() is its tail only
        return f.read()


def users(kp: KernelpoolServer) -> dict[str, int]:
    return {line.split("\t")[0]: int(line.split("\t")[1].removeprefix("uid="))
            for line in kp.cli("users", "list").stdout.splitlines() if line}


async def run_as(client: Any, notebook: str) -> tuple[str, int]:
    """Run 1+1, and ask the kernel its uid."""
    r = await client.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
    assert not r.is_error, text(r)
    r = await client.call_tool("execute_code", {"notebook": notebook, "code": "1+1"})
    assert not r.is_error, text(r)
    uid = await client.call_tool("execute_code", {"notebook": notebook, "code": "import os; os.getuid()"})
    return text(r), int(text(uid))


aio = pytest.mark.asyncio(loop_scope="module")


@aio
async def test_an_mcp_client_signs_in_through_the_provider_and_runs_code(
        oidc_kp: KernelpoolServer, provider: Provider, page: Any) -> None:
    since = time.time()
    callbacks: list[str] = []
    page.on("request", lambda request: callbacks.append(request.url) if CALLBACK in request.url else None)
    alice = person(page, provider, "alice")
    async with sdk_client(oidc_kp.url, alice, REDIRECT) as (client, storage):
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"execute_code", "use_notebook"} <= tools
        result, uid = await run_as(client, "oidc/alice.ipynb")
    assert result == "2"
    if SANDBOX_SKIP is None:
        assert uid == users(oidc_kp)["alice"], "the code ran as the user the provider named"
    assert storage.tokens is not None and storage.tokens.access_token.startswith("kp_")
    assert "oauth client='kernelpool test (Python SDK)'" in oidc_kp.cli("tokens", "list", "alice").stdout
    rows = audit(oidc_kp, after=since, wanted="signed in as alice")
    assert [(r["user"], r["tool"], r["outcome"]) for r in rows] == [("alice", "auth.oidc", "ok")], rows
    assert "sub 'sub-alice'" in rows[0]["detail"] and "e-mail domain example.com" in rows[0]["detail"]
    # neither the code, nor the client secret, nor a token is in the audit log or the server's log
    code = param(callbacks[0], "code")
    logged = oidc_kp.cli("audit", "--json").stdout + whole_log(oidc_kp)
    for secret in (code, SECRETS["kp-main"], storage.tokens.access_token, storage.tokens.refresh_token):
        assert secret and secret not in logged
    assert "code_verifier" not in logged and " DEBUG " in logged  # authlib would print the PKCE verifier


@aio
async def test_first_sign_ins_create_users_that_work(oidc_kp: KernelpoolServer, provider: Provider, page: Any) -> None:
    since = time.time()
    assert "newton" not in users(oidc_kp) and "grace" not in users(oidc_kp)
    newton = person(page, provider, "newton")  # a verified example.com address
    async with sdk_client(oidc_kp.url, newton, REDIRECT) as (client, _):
        result, uid = await run_as(client, "first.ipynb")
    assert result == "2"
    created = users(oidc_kp)
    assert "newton" in created
    if SANDBOX_SKIP is None:
        assert uid == created["newton"]
        folder = os.stat(os.path.join(oidc_kp.data_dir, "users", "newton"))
        assert folder.st_uid == created["newton"] and folder.st_mode & 0o777 == 0o700
        assert os.path.exists(os.path.join(oidc_kp.data_dir, "users", "newton", "first.ipynb"))
    async with await page.context.browser.new_context() as other:  # grace is let in by her group
        grace = person(await other.new_page(), provider, "grace")
        assert (await attempt(oidc_kp, grace)).startswith("Allow")
    assert "grace" in users(oidc_kp)
    rows = audit(oidc_kp, after=since, wanted="signed in as grace")
    made = {r["user"]: r["detail"] for r in rows if r["tool"] == "auth.oidc.create"}
    assert set(made) == {"newton", "grace"}
    assert "e-mail domain example.com" in made["newton"] and "group kernelpool" in made["grace"]


@aio
async def test_people_the_rule_does_not_let_in_are_refused_and_nothing_is_created(
        oidc_kp: KernelpoolServer, provider: Provider, chromium: Any) -> None:
    before = users(oidc_kp)
    since = time.time()
    for login, says in (("mallory", "not among those allowed"), ("eve", "not among those allowed"),
                        ("badname", "'Bad.Name' (your preferred_username) is not a valid kernelpool user name")):
        async with await chromium.new_context() as context:
            someone = person(await context.new_page(), provider, login)
            assert await attempt(oidc_kp, someone) == "Not allowed · kernelpool", login
            assert says in await someone.page.inner_text("main"), login
            assert await signed_in_as_nobody(oidc_kp, someone.page), login
    assert users(oidc_kp) == before
    rows = audit(oidc_kp, after=since, wanted="Bad.Name")
    assert len(rows) == 3 and all(r["outcome"] == "refused" and r["user"] is None for r in rows), rows
    assert "mallory: no rule admits them" in rows[0]["detail"] and "eve: no rule admits them" in rows[1]["detail"]


@aio
async def test_a_removed_user_who_signs_in_again_is_a_new_user_once_their_files_are_gone(
        oidc_kp: KernelpoolServer, provider: Provider, chromium: Any) -> None:
    since = time.time()
    raw = RawClient(oidc_kp.base, REDIRECT)
    await raw.register()
    async with await chromium.new_context() as context:
        otto = person(await context.new_page(), provider, "otto")
        first = await raw.tokens(otto)
        async with mcp_client(oidc_kp.url, first["access_token"], mode="auto") as client:
            assert (await run_as(client, "kept.ipynb"))[0] == "2"
        old_uid = users(oidc_kp)["otto"]
        oidc_kp.cli("users", "remove", "otto")  # without --delete-files: DATA/users/otto stays
        deadline = time.monotonic() + 1.0
        while await raw.mcp_status(first["access_token"]) != 401:
            assert time.monotonic() < deadline, "a removed user's token still works after a second"
            await asyncio.sleep(0.05)
        # the same browser: kernelpool signed it out with the removal; the provider still knows it.
        # The provider may have given the name to someone else: the kept files are not theirs
        assert await attempt(oidc_kp, otto) == "Not allowed · kernelpool"
        assert "files of an earlier kernelpool user otto are still on this server" in await otto.page.inner_text("main")
        assert "otto" not in users(oidc_kp)
        # the administrator decides: the files go (what `users remove --delete-files` does)
        shutil.rmtree(os.path.join(oidc_kp.data_dir, "users", "otto"))
        second = await raw.tokens(otto)
    await raw.http.aclose()
    new_uid = users(oidc_kp)["otto"]
    assert new_uid > old_uid, "a name added again gets a uid never given before, as with users add"
    async with mcp_client(oidc_kp.url, second["access_token"], mode="auto") as client:
        result, uid = await run_as(client, "again.ipynb")
    assert result == "2" and (SANDBOX_SKIP is not None or uid == new_uid)
    assert await raw_status(oidc_kp, first["access_token"]) == 401
    rows = audit(oidc_kp, after=since, wanted=f"uid {new_uid}")
    made = [r["detail"] for r in rows if r["tool"] == "auth.oidc.create"]
    assert len(made) == 2 and f"uid {old_uid}" in made[0] and f"uid {new_uid}" in made[1], made
    assert any("not created, the folder of a removed otto is not empty" in r["detail"] for r in rows), rows


async def raw_status(kp: KernelpoolServer, access_token: str) -> int:
    raw = RawClient(kp.base, REDIRECT)
    try:
        return await raw.mcp_status(access_token)
    finally:
        await raw.http.aclose()


async def start_upstream(page: Any, kp: KernelpoolServer) -> str:
    """Begin an upstream sign-in in this browser as the sign-in page's button does (with the
    page's form token), without following it: the provider URL kernelpool sends the browser to.
    Its state is then this browser's one pending upstream sign-in."""
    client = RawClient(kp.base, REDIRECT)
    await client.register()
    await client.http.aclose()
    await page.goto(client.authorize_url(pkce()[1]))  # the sign-in page, or the consent page if signed in
    txn = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)["txn"][0]
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    r = await page.request.post(f"{kp.base}/signin/oidc", form={"csrf": csrf, "txn": txn}, max_redirects=0)
    assert r.status == 303, await r.text()
    return str(r.headers["location"])


def param(url: str, name: str) -> str:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))[name]


async def held_answer(kp: KernelpoolServer, someone: OidcPerson) -> str:
    """Sign in at the provider, and keep its answer (the redirect back to kernelpool, with the
    code) from reaching kernelpool: its URL. The provider's own redirects are followed by hand
    with the browser's cookies (a browser's route handlers never see redirected requests)."""
    url = await start_upstream(someone.page, kp)
    await someone.page.goto(url)
    url = str(someone.page.url)
    assert url.startswith(f"{someone.issuer}/interaction/"), url
    r = await someone.page.request.post(url, form={"login": someone.user, "password": someone.password}, max_redirects=0)
    while True:
        assert r.status in (302, 303), (r.status, await r.text())
        url = urllib.parse.urljoin(url, str(r.headers["location"]))
        if url.startswith(kp.base):
            return url
        r = await someone.page.request.get(url, max_redirects=0)


def _with(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query)) | params
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@aio
async def test_an_answer_is_taken_once_and_only_by_the_browser_that_asked(
        oidc_kp: KernelpoolServer, provider: Provider, chromium: Any) -> None:
    since = time.time()
    async with await chromium.new_context() as mine, await chromium.new_context() as theirs:
        alice = person(await mine.new_page(), provider, "alice")
        # the button's form without its token: refused before anything is sent to the provider
        r = await alice.page.request.post(f"{oidc_kp.base}/signin/oidc", form={"txn": ""}, max_redirects=0)
        assert r.status == 403 and "location" not in r.headers
        answer = await held_answer(oidc_kp, alice)
        assert answer.startswith(f"{oidc_kp.base}{CALLBACK}?") and param(answer, "code")
        # someone else's browser given alice's answer (login CSRF): refused, nobody signed in
        victim = await theirs.new_page()
        await victim.goto(answer)
        assert await victim.title() == "Sign-in answer not expected · kernelpool"
        # a state this browser never had, then the real answer, then the real answer again
        await alice.page.goto(_with(answer, state="forged-state"))
        assert await alice.page.title() == "Sign-in answer not expected · kernelpool"
        await alice.page.goto(answer)
        assert (await alice.page.title()).startswith("Allow"), await alice.page.inner_text("main")
        await alice.page.goto(answer)
        assert await alice.page.title() == "Sign-in answer not expected · kernelpool"
    rows = audit(oidc_kp, after=since, wanted="signed in as alice")
    assert [r["outcome"] for r in rows] == ["refused", "refused", "ok", "refused"], rows
    assert param(answer, "code") not in json.dumps(rows) + whole_log(oidc_kp)


@aio
async def test_a_used_code_another_issuer_or_the_provider_saying_no_signs_nobody_in(
        oidc_kp: KernelpoolServer, provider: Provider, chromium: Any) -> None:
    since = time.time()
    async with await chromium.new_context() as context:
        alice = person(await context.new_page(), provider, "alice")
        callbacks: list[str] = []
        alice.page.on("request", lambda request: callbacks.append(request.url) if CALLBACK in request.url else None)
        assert (await attempt(oidc_kp, alice)).startswith("Allow")
        used = param(callbacks[0], "code")
        # the code again, under a state this browser does hold: the provider refuses it
        state = param(await start_upstream(alice.page, oidc_kp), "state")
        await alice.page.goto(f"{oidc_kp.base}{CALLBACK}?" + urllib.parse.urlencode({"code": used, "state": state}))
        assert await alice.page.title() == f"{NAME} did not sign you in · kernelpool"
        state = param(await start_upstream(alice.page, oidc_kp), "state")
        await alice.page.goto(f"{oidc_kp.base}{CALLBACK}?" + urllib.parse.urlencode(
            {"code": used, "state": state, "iss": "https://idp.attacker.example"}))
        assert await alice.page.title() == "Sign-in answer not valid · kernelpool"
        state = param(await start_upstream(alice.page, oidc_kp), "state")
        await alice.page.goto(f"{oidc_kp.base}{CALLBACK}?" + urllib.parse.urlencode(
            {"error": "access_denied", "error_description": "the person said no", "state": state}))
        assert await alice.page.title() == f"{NAME} did not sign you in · kernelpool"
        await alice.page.goto(f"{oidc_kp.base}{CALLBACK}?" + urllib.parse.urlencode({"code": "x", "state": state}))
        assert await alice.page.title() == "Sign-in answer not expected · kernelpool", "a refused answer ends its sign-in"
    details = [r["detail"] for r in audit(oidc_kp, after=since, wanted="access_denied") if r["outcome"] == "refused"]
    assert len(details) == 4, details
    assert "invalid_grant" in details[0] and "another issuer" in details[1] and "access_denied" in details[2]


@aio
async def test_an_id_token_for_another_nonce_is_refused(oidc_kp: KernelpoolServer, provider: Provider, chromium: Any) -> None:
    since = time.time()
    async with await chromium.new_context() as context:
        alice = person(await context.new_page(), provider, "alice")
        # the provider asked with another nonce: what an attacker's injected code carries, a
        # token minted for another request
        url = await start_upstream(alice.page, oidc_kp)
        await alice.page.goto(_with(url, nonce="a-nonce-kernelpool-never-sent"))
        await alice.page.get_by_label("Account").fill("alice")
        await alice.page.get_by_label("Password").fill("pw-alice")
        await alice.page.get_by_role("button", name="Log in").click()
        await alice.page.wait_for_load_state()
        assert await alice.page.title() == "Sign-in answer not valid · kernelpool"
        assert await signed_in_as_nobody(oidc_kp, alice.page)
    rows = audit(oidc_kp, after=since, wanted="nonce")
    assert len(rows) == 1 and rows[0]["outcome"] == "refused" and "ID token refused" in rows[0]["detail"]
    assert "nonce" in rows[0]["detail"], rows


@aio
async def test_a_server_naming_users_by_email_lets_in_its_users_only(
        strict_kp: KernelpoolServer, provider: Provider, chromium: Any) -> None:
    before = users(strict_kp)
    since = time.time()
    for login, title, says in (
        ("alice", "Allow raw test client?", "Signed in as alice"),
        ("newton", "Not allowed", "There is no kernelpool user newton, and this server does not create users"),
        ("eve", "Not allowed", "The provider has not verified your e-mail address 'eve@example.com'"),
        ("grace", "Not allowed", "'grace@elsewhere.org' is not an address at example.com"),
    ):
        async with await chromium.new_context() as context:
            someone = person(await context.new_page(), provider, login)
            assert (await attempt(strict_kp, someone)).startswith(title), login
            assert says in await someone.page.inner_text("main"), login
    assert users(strict_kp) == before
    rows = audit(strict_kp, after=since, wanted="grace")
    assert [(r["user"], r["outcome"]) for r in rows] == [("alice", "ok"), (None, "refused"), (None, "refused"),
                                                          (None, "refused")], rows
    assert SECRETS["kp-strict"] not in whole_log(strict_kp)


@aio
async def test_a_provider_that_cannot_be_reached_gives_a_clear_page(
        server_args: list[str], ports: dict[str, int], page: Any) -> None:
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_OIDC_ISSUER=f"http://localhost:{ports['down']}",
        KERNELPOOL_OIDC_CLIENT_ID="kp", KERNELPOOL_OIDC_CLIENT_SECRET=secrets.token_urlsafe(8),
        # its first start creates the user "default": an account name of its own
        KERNELPOOL_ACCOUNT_PREFIX=f"kpd{os.getpid() % 100000}-", KERNELPOOL_CGROUP_PREFIX=f"kernelpool-test-{os.getpid()}-d"))
    try:
        server.start(*server_args)
        client = RawClient(server.base, REDIRECT)
        await client.register()
        await client.http.aclose()
        await page.goto(client.authorize_url(pkce()[1]))
        await page.get_by_role("button", name="Sign in with localhost").click()  # the issuer's host by default
        assert await page.title() == "localhost cannot be reached · kernelpool"
        assert "Try again later, or sign in another way" in await page.inner_text("main")
        rows = audit(server, wanted="not reachable")
        assert len(rows) == 1 and rows[0]["outcome"] == "refused" and "provider not reachable" in rows[0]["detail"]
    finally:
        server.cleanup()
