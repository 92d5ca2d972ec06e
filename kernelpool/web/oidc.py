"""Signing people in through a team's OpenID Connect provider (`oidc_issuer`), with authlib.

The sign-in page's "Sign in with <name>" posts to `/signin/oidc` (with the form's CSRF token
and the authorization request it belongs to). That sends the browser to the provider's
authorization endpoint, found by discovery (ISSUER/.well-known/openid-configuration, whose
`issuer` must be ISSUER exactly): authorization code flow with PKCE (S256), a state and a
nonce, which authlib keeps in the browser's server-side `Browser.scratch` (so no session
middleware, and a callback is taken only in the browser that started it, once; one upstream
sign-in at a time per browser: starting another forgets the first).
`/signin/oidc/callback` has authlib exchange the code (with the client secret) and verify the ID
token: signature by the provider's published keys (asymmetric algorithms only), issuer,
audience (which must contain our client id), expiry, nonce. `kernelpool.users.upstream` maps its claims to a user and applies the
rule; the browser is then signed in and goes on to the consent page. Each outcome is audited
(`auth.oidc`, `auth.oidc.create`), never a code or token, and authlib's logger stays above
debug (`kernelpool.logs`), where it would print the PKCE verifier. Callers: `kernelpool.web.server`.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Any

import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.starlette_client import OAuth
from joserfc.errors import JoseError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from kernelpool.config import Settings
from kernelpool.users.upstream import Refused, UpstreamUsers, shown
from kernelpool.web.pages import page
from kernelpool.web.signin import UNKNOWN_REQUEST, SignIn, Web, csrf_refused, redirect

CALLBACK = "/signin/oidc/callback"
# ID tokens signed with the provider's published key pairs; never "none", never a shared secret
ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
ENDPOINTS = ("authorization_endpoint", "token_endpoint", "jwks_uri")


class ProviderError(Exception):
    """The provider cannot be reached, or answers what no provider should."""


def provider_name(settings: Settings) -> str | None:
    """The name on the sign-in button, or None when no provider is configured."""
    if not settings.oidc_issuer:
        return None
    return settings.oidc_name or urllib.parse.urlsplit(settings.oidc_issuer).hostname or settings.oidc_issuer


def client_secret(settings: Settings) -> str:
    """The client secret, from the setting or read from oidc_client_secret_file (once, at start-up)."""
    if settings.oidc_client_secret is not None:
        return settings.oidc_client_secret.get_secret_value()
    if settings.oidc_client_secret_file is None:
        raise ValueError("oidc_issuer needs oidc_client_secret or oidc_client_secret_file")
    try:
        secret = settings.oidc_client_secret_file.read_text().strip()
    except OSError as exc:
        raise ValueError(f"oidc_client_secret_file {settings.oidc_client_secret_file}: {exc.strerror or exc}") from None
    if not secret:
        raise ValueError(f"oidc_client_secret_file {settings.oidc_client_secret_file} is empty")
    return secret


def _secure(url: Any) -> bool:
    # what the issuer must be too (Settings._https): https, or http to this machine's loopback
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
        return False
    if parts.scheme == "https" or parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


class UpstreamSignIn:
    """The two routes of an upstream sign-in (see the module docstring)."""

    def __init__(self, settings: Settings, web: Web, upstream: UpstreamUsers, *, base_url: str) -> None:
        if settings.oidc_issuer is None:
            raise ValueError("an upstream sign-in needs oidc_issuer")
        self.web, self.upstream = web, upstream
        self.issuer = settings.oidc_issuer
        self.name = provider_name(settings) or self.issuer
        self.redirect_uri = f"{base_url}{CALLBACK}"
        self.client: Any = OAuth().register(
            "upstream", client_id=settings.oidc_client_id, client_secret=client_secret(settings),
            server_metadata_url=f"{self.issuer.rstrip('/')}/.well-known/openid-configuration",
            client_kwargs={"scope": " ".join(settings.oidc_scopes), "code_challenge_method": "S256", "timeout": 10.0,
                           "follow_redirects": False})

    def claims_options(self) -> dict[str, Any]:
        """What the ID token's issuer and audience must be. Given to authlib, which otherwise checks
        the issuer but lets an audience without our client id pass when `azp` names it."""
        return {"iss": {"essential": True, "values": [self.issuer]},
                "aud": {"essential": True, "values": [self.client.client_id]}}

    def routes(self) -> list[BaseRoute]:
        return [Route("/signin/oidc", self.start, methods=["POST"]), Route(CALLBACK, self.callback, methods=["GET"])]

    async def _audit(self, user: str | None, outcome: str, detail: str, event: str = "oidc") -> None:
        await self.web.grants.audit(user, event, outcome, f"{self.issuer}: {detail}")

    def _page(self, cookie: str | None, status: int, title: str, text: str) -> Response:
        response = page("message.html", status, title=title, text=text)
        self.web.browsers.set_cookie(response, cookie)
        return response

    async def _unreachable(self, cookie: str | None, exc: Exception) -> Response:
        await self._audit(None, "refused", f"provider not reachable: {type(exc).__name__}: {exc}")
        return self._page(cookie, 502, f"{self.name} cannot be reached",
                          f"kernelpool could not reach {self.name} to sign you in. Try again later, or sign in "
                          f"another way. If this goes on, tell the administrator of this kernelpool server.")

    async def _metadata(self) -> None:
        """The provider's discovery document, loaded once (again after a failure), and checked."""
        try:
            metadata: dict[str, Any] = await self.client.load_server_metadata()
        except (httpx2.HTTPError, ValueError) as exc:
            raise ProviderError(f"discovery: {exc}") from exc
        problem = None
        if metadata.get("issuer") != self.issuer:
            problem = f"its discovery document names the issuer {shown(metadata.get('issuer'))}, not {self.issuer!r}"
        elif bad := [k for k in ENDPOINTS if not _secure(metadata.get(k))]:
            problem = f"its discovery document has no https {', '.join(bad)}"
        if problem is not None:
            self.client.server_metadata.clear()  # asked again at the next sign-in
            raise ProviderError(problem)
        algorithms = [a for a in metadata.get("id_token_signing_alg_values_supported") or ["RS256"] if a in ASYMMETRIC]
        metadata["id_token_signing_alg_values_supported"] = algorithms or ["RS256"]

    async def start(self, request: Request) -> Response:
        web = self.web
        browser, cookie = web.browsers.get(request)
        form = await request.form()
        if not web.browsers.csrf_ok(browser, form.get("csrf")):
            return csrf_refused(web, cookie)
        txn = str(form.get("txn", ""))
        if txn and web.pending.claim(txn, browser.key) is None:
            return self._page(cookie, 400, "Sign-in request not found", UNKNOWN_REQUEST)
        try:
            await self._metadata()
        except ProviderError as exc:
            return await self._unreachable(cookie, exc)
        request.scope["session"] = browser.scratch  # where authlib keeps the state, nonce and PKCE verifier
        found = await self.client.create_authorization_url(self.redirect_uri)
        await self.client.save_authorize_data(request, redirect_uri=self.redirect_uri, **found)
        return redirect(found["url"], cookie, web.browsers)

    async def callback(self, request: Request) -> Response:
        web = self.web
        browser, cookie = web.browsers.get(request)
        request.scope["session"] = browser.scratch
        refused = await self._check_answer(request, browser.scratch, cookie)
        if refused is not None:
            return refused
        try:
            await self._metadata()
            token = await self.client.authorize_access_token(request, claims_options=self.claims_options())
        except OAuthError as exc:  # the provider refused the code (invalid_grant: used, or not ours)
            await self._audit(None, "refused", f"the provider answered {exc.error}: {shown(exc.description)}")
            return self._page(cookie, 403, f"{self.name} did not sign you in",
                              f"{self.name} would not confirm this sign-in ({exc.error}). Start again from your MCP client.")
        except JoseError as exc:
            await self._audit(None, "refused", f"ID token refused: {exc.error}: {shown(exc.description)}")
            return self._page(cookie, 400, "Sign-in answer not valid",
                              f"The answer from {self.name} could not be verified, so nobody was signed in. "
                              f"Start again from your MCP client.")
        except (ProviderError, httpx2.HTTPError, ValueError) as exc:
            return await self._unreachable(cookie, exc)
        claims = dict(token.get("userinfo") or {})
        if not claims:  # authlib verifies an ID token only when there is one: there must be
            await self._audit(None, "refused", "the token response has no ID token")
            return self._page(cookie, 400, "Sign-in answer not valid", f"{self.name} sent no ID token. Tell the administrator.")
        return await self._admit(browser, cookie, claims)

    async def _check_answer(self, request: Request, session: dict[str, Any], cookie: str | None) -> Response | None:
        """The refusal of an answer that is not one to a sign-in this browser started (its state),
        names another issuer (RFC 9207), or says the provider did not sign the person in; else None."""
        params = request.query_params
        state = params.get("state")
        if not state or await self.client.framework.get_state_data(session, state) is None:
            await self._audit(None, "refused", "an answer with a state this browser did not start (or used already)")
            return self._page(cookie, 400, "Sign-in answer not expected",
                              f"This answer from {self.name} does not belong to a sign-in started in this browser, "
                              f"or was used already. Start again from your MCP client.")
        iss, error = params.get("iss"), params.get("error")
        if iss is not None and iss != self.issuer:
            await self.client.framework.clear_state_data(session, state)  # this sign-in is over
            await self._audit(None, "refused", f"an answer from another issuer {shown(iss)}")
            return self._page(cookie, 400, "Sign-in answer not valid",
                              f"This answer does not come from {self.name}. Start again from your MCP client.")
        if error is None:
            return None
        await self.client.framework.clear_state_data(session, state)
        await self._audit(None, "refused", f"the provider answered {shown(error)}: {shown(params.get('error_description'))}")
        return self._page(cookie, 403, f"{self.name} did not sign you in",
                          f"{self.name} answered: {error[:100]}. Start again from your MCP client.")

    async def _admit(self, browser: Any, cookie: str | None, claims: dict[str, Any]) -> Response:
        who = f"sub {shown(claims.get('sub'))}"
        try:
            admitted = await self.upstream.admit(claims)
        except Refused as exc:
            await self._audit(None, "refused", f"{who}: {exc.detail}")
            return self._page(cookie, exc.status, "Not allowed", exc.text)
        row = admitted.row
        if admitted.created:
            await self._audit(row.name, "ok", f"{who}: user {row.name} created (uid {row.uid}), by {admitted.rule}",
                              event="oidc.create")
        self.web.browsers.sign_in(browser, row.name, row.uid)
        await self._audit(row.name, "ok", f"{who}: signed in as {row.name}, by {admitted.rule}")
        return SignIn(self.web).after_sign_in(browser, cookie, row.name)
