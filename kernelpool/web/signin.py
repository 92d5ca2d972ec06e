"""Signing a person in, and their consent: the pages an authorization request sends the browser to.

`/signin?txn=…` (from `KernelpoolOAuth.authorize`) offers the ways in: a kernelpool token with
its user name, a one-time link (`/login/<secret>`, from `kernelpool users login-link`), and a
team's OpenID provider where one is configured (`kernelpool.web.oidc`). Once signed in, `/consent`
names the client, where the browser goes next and what the client will be able to do; Allow
makes the grant and its code and sends the browser to the client's registered redirect URI
(with `iss`, RFC 9207); Deny sends `access_denied` there. Every POST needs the browser's CSRF
token; failed sign-ins count per client address (the app's `AuthGuard` counts the 401s) and per
user name (429 past `auth_failures_before_backoff`). Every step is audited, never a secret.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from mcp.server.auth.provider import construct_redirect_uri
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kernelpool.config import Settings
from kernelpool.store import Store
from kernelpool.users.grants import GrantStore
from kernelpool.users.pending import Pending, PendingAuthorizations
from kernelpool.users.throttle import AuthThrottle
from kernelpool.users.tokens import check_token
from kernelpool.web.browser import Browser, Browsers
from kernelpool.web.pages import HEADERS, message, page

UNKNOWN_REQUEST = ("This sign-in request is unknown, has expired, or was opened in another browser. "
                   "Start again from your MCP client.")


@dataclass
class Web:
    """What the pages need, built once by the app."""

    settings: Settings
    store: Store
    grants: GrantStore
    pending: PendingAuthorizations
    browsers: Browsers
    user_throttle: AuthThrottle
    issuer: str
    oidc_name: str | None = None  # the upstream OpenID provider's button, where one is configured


VIEW_HOME = "/view"
VIEW_NEXT = "view_next"  # the browser's scratch key: the view's page a sign-in without a request leads to


def view_target(given: object) -> str:
    """Where a sign-in without an authorization request goes: a page of the web view named by
    `next`, else its home; never anywhere else (no open redirect)."""
    if (isinstance(given, str) and re.fullmatch(r"/view(/[A-Za-z0-9._~%/?=&+-]*)?", given) and "//" not in given
            and ".." not in given and not re.search(r"%(2e|2f|5c)", given, re.IGNORECASE)):
        return given
    return VIEW_HOME


def redirect(url: str, cookie: str | None, browsers: Browsers) -> Response:
    response = RedirectResponse(url, status_code=303, headers=HEADERS)
    browsers.set_cookie(response, cookie)
    return response


def client_label(pending: Pending | None) -> str | None:
    return None if pending is None else pending.client_name or pending.client_id


class SignIn:
    def __init__(self, web: Web) -> None:
        self.web = web

    def _page(self, cookie: str | None, template: str, status_code: int = 200, **context: Any) -> Response:
        response = page(template, status_code, **context)
        self.web.browsers.set_cookie(response, cookie)
        return response

    async def _form(self, request: Request, browser: Browser) -> dict[str, Any] | None:
        form = dict(await request.form())
        return form if self.web.browsers.csrf_ok(browser, form.get("csrf")) else None

    async def signin_page(self, request: Request) -> Response:
        web = self.web
        browser, cookie = web.browsers.get(request)
        txn = request.query_params.get("txn", "")
        if not txn:  # no authorization request: a person opening the web view (`next`)
            target = view_target(request.query_params.get("next"))
            if await web.browsers.signed_in(browser):
                return redirect(target, cookie, web.browsers)
            browser.scratch[VIEW_NEXT] = target  # where any way of signing in leads, back in this browser
            return self._page(cookie, "signin.html", title="Sign in", client=None, txn="",
                              csrf=browser.csrf, error=None, user=None)
        pending = web.pending.claim(txn, browser.key)
        if pending is None:
            return self._page(cookie, "message.html", 400, title="Sign-in request not found", text=UNKNOWN_REQUEST)
        if await web.browsers.signed_in(browser):
            return redirect(f"/consent?txn={urllib.parse.quote(txn)}", cookie, web.browsers)
        return self._page(cookie, "signin.html", title="Sign in", client=client_label(pending), txn=txn,
                          csrf=browser.csrf, error=None, user=None, oidc=web.oidc_name)

    async def signin_token(self, request: Request) -> Response:
        web = self.web
        browser, cookie = web.browsers.get(request)
        form = await self._form(request, browser)
        if form is None:
            return csrf_refused(web, cookie)
        txn, user, token = (str(form.get(k, "")) for k in ("txn", "user", "token"))
        pending = web.pending.claim(txn, browser.key) if txn else None
        if pending is None and txn:
            return self._page(cookie, "message.html", 400, title="Sign-in request not found", text=UNKNOWN_REQUEST)
        wait = web.user_throttle.retry_after(user)
        if wait > 0:
            web.user_throttle.refused(user)
            await web.grants.audit(user, "signin", "refused", "token: too many failed sign-ins for this user")
            return self._page(cookie, "message.html", 429, title="Too many failed sign-ins",
                              text=f"Too many failed sign-ins for {user}. Try again in {math.ceil(wait)} seconds.")
        verdict = await check_token(web.store, token.strip())
        if verdict.user is None or verdict.user != user or verdict.uid is None:
            web.user_throttle.failed(user, "wrong token at sign-in")
            await web.grants.audit(user if verdict.user == user else None, "signin", "refused",
                                   f"token: no such user with that token (user name given: {user[:64]!r})")
            return self._page(cookie, "signin.html", 401, title="Sign in", client=client_label(pending), txn=txn,
                              csrf=browser.csrf, user=user, oidc=web.oidc_name,
                              error="That user name and token do not match a kernelpool user.")
        web.browsers.sign_in(browser, user, verdict.uid)
        await web.grants.audit(user, "signin", "ok", "token")
        if pending is None:
            return self.after_sign_in(browser, cookie, user)
        return redirect(f"/consent?txn={urllib.parse.quote(txn)}", cookie, web.browsers)

    async def link_page(self, request: Request) -> Response:
        # a GET only shows the button: link previews and scanners must not use the link up
        web = self.web
        browser, cookie = web.browsers.get(request)
        secret = request.path_params["secret"]
        user = await web.grants.link_user(secret, take=False)
        if user is None:
            return self._page(cookie, "message.html", 404, title="Sign-in link not valid",
                              text="This sign-in link is unknown, used or expired. Ask for a new one.")
        return self._page(cookie, "link.html", title="Sign in", user=user, secret=secret, csrf=browser.csrf)

    async def link_use(self, request: Request) -> Response:
        web = self.web
        browser, cookie = web.browsers.get(request)
        if await self._form(request, browser) is None:
            return csrf_refused(web, cookie)
        user = await web.grants.link_user(request.path_params["secret"], take=True)
        row = await web.store.get_user(user) if user is not None else None
        if user is None or row is None:
            await web.grants.audit(None, "signin", "refused", "link: unknown, used or expired")
            return self._page(cookie, "message.html", 401, title="Sign-in link not valid",
                              text="This sign-in link is unknown, used or expired. Ask for a new one.")
        web.browsers.sign_in(browser, user, row.uid)
        await web.grants.audit(user, "signin", "ok", "link")
        return self.after_sign_in(browser, cookie, user)

    def after_sign_in(self, browser: Browser, cookie: str | None, user: str) -> Response:
        """Back to the authorization request this browser was in, or a page saying who is in."""
        txn = self.web.pending.latest(browser.key)
        if txn is not None:
            return redirect(f"/consent?txn={urllib.parse.quote(txn)}", cookie, self.web.browsers)
        if self.web.settings.web_view:
            return redirect(view_target(browser.scratch.pop(VIEW_NEXT, None)), cookie, self.web.browsers)
        return self._page(cookie, "message.html", title="Signed in",
                          text=f"You are signed in to kernelpool as {user}. Go back to your MCP client.")

    async def consent_page(self, request: Request) -> Response:
        web = self.web
        browser, cookie = web.browsers.get(request)
        txn = request.query_params.get("txn", "")
        pending = web.pending.claim(txn, browser.key)
        if pending is None:
            return self._page(cookie, "message.html", 400, title="Sign-in request not found", text=UNKNOWN_REQUEST)
        user = await web.browsers.signed_in(browser)
        if user is None:
            return redirect(f"/signin?txn={urllib.parse.quote(txn)}", cookie, web.browsers)
        target = urllib.parse.urlsplit(pending.redirect_uri)
        return self._page(cookie, "consent.html", title=f"Allow {client_label(pending)}?", user=user,
                          client=client_label(pending), client_id=pending.client_id,
                          redirect_host=target.netloc or f"{target.scheme}:", txn=txn, csrf=browser.csrf)

    async def consent(self, request: Request) -> Response:
        web = self.web
        browser, cookie = web.browsers.get(request)
        form = await self._form(request, browser)
        if form is None:
            return csrf_refused(web, cookie)
        txn = str(form.get("txn", ""))
        pending = web.pending.claim(txn, browser.key)
        if pending is None:
            return self._page(cookie, "message.html", 400, title="Sign-in request not found", text=UNKNOWN_REQUEST)
        user = await web.browsers.signed_in(browser)
        if user is None:
            return redirect(f"/signin?txn={urllib.parse.quote(txn)}", cookie, web.browsers)
        web.pending.finish(txn)
        if form.get("decision") != "allow":
            await web.grants.audit(user, "consent", "refused", f"client {pending.client_id}: denied by the person")
            target = construct_redirect_uri(pending.redirect_uri, error="access_denied",
                                            error_description="the person denied the request", state=pending.state,
                                            iss=web.issuer)
            return redirect(target, cookie, web.browsers)
        grant_id = await web.grants.create_grant(user, pending.client_id, pending.client_name, pending.scopes,
                                                 pending.resource)
        code = await web.grants.issue_code(grant_id, pending.redirect_uri, explicit=pending.redirect_explicit,
                                           code_challenge=pending.code_challenge, ttl=web.settings.oauth_code_ttl)
        await web.grants.audit(user, "consent", "ok", f"grant {grant_id}, client {pending.client_id}")
        target = construct_redirect_uri(pending.redirect_uri, code=code, state=pending.state, iss=web.issuer)
        return redirect(target, cookie, web.browsers)


def csrf_refused(web: Web, cookie: str | None) -> Response:
    response = message("Form expired", "This form was not sent from this page of kernelpool, or it has expired. "
                       "Go back, reload the page and try again.", 403)
    web.browsers.set_cookie(response, cookie)
    return response
