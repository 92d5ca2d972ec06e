"""Browsers: who is signed in, and the CSRF token of each browser's forms.

A browser is known by a random cookie (HttpOnly, SameSite=Lax, Secure and `__Host-` behind
https); the server keeps, under the cookie's hash, the person signed in there and the token its
forms carry. Nothing of it is written to disk: a restart signs everyone out. A signed-in person
is checked against the store on every page (`Store.admits`), so `users remove` ends a browser
session at once. Lax, not Strict: the upstream OpenID provider sends the browser back with a
cross-site redirect, which must still carry the cookie; every POST also needs its CSRF token.
Callers: `kernelpool.web.signin`, and the read-only view of a later issue.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kernelpool.store import Store


@dataclass
class Browser:
    key: str  # the cookie's hash
    csrf: str
    user: str | None = None
    uid: int | None = None
    signed_in_at: float = 0.0
    seen: float = field(default_factory=time.monotonic)
    scratch: dict[str, Any] = field(default_factory=dict)  # authlib's state during an OpenID sign-in


class Browsers:
    def __init__(self, store: Store, *, secure: bool, sign_in_seconds: float = 12 * 3600.0,
                 idle_seconds: float = 3600.0, max_browsers: int = 20_000) -> None:
        self._store = store
        self.secure = secure
        self.cookie = "__Host-kernelpool" if secure else "kernelpool"
        self._sign_in_seconds, self._idle = sign_in_seconds, idle_seconds
        self._max = max_browsers
        self._known: OrderedDict[str, Browser] = OrderedDict()

    def get(self, request: Request) -> tuple[Browser, str | None]:
        """This request's browser, and the cookie value to set when it is a new one."""
        self._expire()
        value = request.cookies.get(self.cookie)
        if value:
            key = _hash(value)
            known = self._known.get(key)
            if known is not None:
                known.seen = time.monotonic()
                self._known.move_to_end(key)
                return known, None
        value = secrets.token_urlsafe(32)
        browser = Browser(_hash(value), secrets.token_urlsafe(32))
        self._known[browser.key] = browser
        while len(self._known) > self._max:
            self._known.popitem(last=False)
        return browser, value

    def set_cookie(self, response: Response, value: str | None) -> None:
        if value is not None:
            response.set_cookie(self.cookie, value, httponly=True, samesite="lax", secure=self.secure, path="/")

    @staticmethod
    def csrf_ok(browser: Browser, given: Any) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given.encode(), browser.csrf.encode())

    async def signed_in(self, browser: Browser) -> str | None:
        """The user signed in in this browser, while still a user (not removed, same uid) and
        within the sign-in lifetime; else None (and the browser is signed out)."""
        if browser.user is None or browser.uid is None:
            return None
        if time.time() - browser.signed_in_at > self._sign_in_seconds or not await self._store.admits(browser.user, browser.uid):
            self.sign_out(browser)
            return None
        return browser.user

    @staticmethod
    def sign_in(browser: Browser, user: str, uid: int) -> None:
        browser.user, browser.uid, browser.signed_in_at = user, uid, time.time()
        browser.csrf = secrets.token_urlsafe(32)  # a new person, new form tokens

    @staticmethod
    def sign_out(browser: Browser) -> None:
        browser.user = browser.uid = None
        browser.scratch.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._known:
            key, oldest = next(iter(self._known.items()))
            if now - oldest.seen < self._idle:
                break
            del self._known[key]


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
