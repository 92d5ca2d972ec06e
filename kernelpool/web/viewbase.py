"""What every page of the read-only view shares: the signed-in person (`Person`), what the pages
read (`ViewDeps`), and `ViewBase`, which finds the person and answers 404 for anything not
theirs (or, among replicas, sends the browser to the person's home: `kernelpool.web.home`). Callers: `kernelpool.web.view` (notebooks, activity) and `kernelpool.web.kernels`.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kernelpool.executions.jobs import JobService
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.notebooks.service import NotebookService
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from kernelpool.users.grants import GrantStore
from kernelpool.users.sessions import SessionContexts
from kernelpool.web.browser import Browser, Browsers
from kernelpool.web.home import send_home
from kernelpool.web.live import LiveHub
from kernelpool.web.pages import HEADERS, page

# the view's pages run one script of the server's own (live updates) and show images from data:
# URLs; still no inline script, no eval, no frames, no form posting elsewhere
VIEW_HEADERS = HEADERS | {"Content-Security-Policy": (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")}


@dataclass
class Person:
    """Who is signed in in this browser, for one request."""

    user: str
    browser: Browser
    cookie: str | None
    admin: bool


@dataclass
class ViewDeps:
    """What the view's pages read, built once by the app."""

    store: Store
    browsers: Browsers
    notebooks: NotebookService
    jobs: JobService
    kernels: KernelRegistry
    sessions: SessionContexts
    users: UserService
    hub: LiveHub
    grants: GrantStore
    replica: str | None = None  # this server's name among replicas: pages are sent to each person's home


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class ViewBase:
    def __init__(self, deps: ViewDeps) -> None:
        self.deps = deps

    async def person(self, request: Request) -> Person | Response:
        """The signed-in person, or the redirect to sign in (and back to this URL)."""
        browser, cookie = self.deps.browsers.get(request)
        user = await self.deps.browsers.signed_in(browser)
        if user is None:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse(f"/signin?next={urllib.parse.quote(here, safe='/')}", status_code=303,
                                        headers=HEADERS)
            self.deps.browsers.set_cookie(response, cookie)
            return response
        row = await self.deps.store.get_user(user)  # the operator flag, and among replicas the home
        if self.deps.replica is not None and row is not None and row.home not in (None, self.deps.replica):
            return await send_home(self.deps.grants, self.deps.browsers, request, user, row.home)
        return Person(user, browser, cookie, row is not None and row.admin)

    async def owner(self, request: Request) -> Person | Response:
        """`person`, when the URL's `<user>` is that person; 404 otherwise."""
        who = await self.person(request)
        if isinstance(who, Person) and request.path_params.get("user") != who.user:
            return self.not_found(who)
        return who

    def show(self, who: Person, template: str, status_code: int = 200, **context: Any) -> Response:
        response = page(template, status_code, VIEW_HEADERS, me=who.user, admin=who.admin, **context)
        self.deps.browsers.set_cookie(response, who.cookie)
        return response

    def not_found(self, who: Person) -> Response:
        return self.show(who, "message.html", 404, title="Not found",
                         text="There is nothing of yours at this address.")
