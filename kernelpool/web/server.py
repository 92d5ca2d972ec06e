"""The authorization server and its pages, put together once for the app (`OAuthServer`)."""

from __future__ import annotations

import urllib.parse

from starlette.routing import BaseRoute

from kernelpool.config import Settings
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from kernelpool.users.cimd import ClientDocuments
from kernelpool.users.grants import GrantStore
from kernelpool.users.pending import PendingAuthorizations
from kernelpool.users.throttle import AuthThrottle
from kernelpool.users.upstream import UpstreamUsers
from kernelpool.web.browser import Browsers
from kernelpool.web.oauth import KernelpoolOAuth, auth_routes
from kernelpool.web.oidc import UpstreamSignIn, provider_name
from kernelpool.web.routes import web_routes
from kernelpool.web.signin import Web


class OAuthServer:
    """kernelpool's OAuth authorization server (`web.oauth`), its sign-in and consent pages
    (`web.signin`), and the sign-in through an upstream OpenID provider where one is configured
    (`web.oidc`). `address` is the app's per-address throttle; a second one counts failed
    sign-ins per user name."""

    def __init__(self, settings: Settings, store: Store, users: UserService, address: AuthThrottle, url: str) -> None:
        self.settings = settings
        self.grants = GrantStore(store)
        self.documents = ClientDocuments(test_ca=settings.oauth_cimd_test_ca, test_resolve=settings.oauth_cimd_test_resolve)
        self.pending = PendingAuthorizations()
        self.provider = KernelpoolOAuth(settings, self.grants, self.documents, self.pending, issuer=url, resource=f"{url}/mcp")
        user_throttle = AuthThrottle(settings.auth_failures_before_backoff, settings.auth_failure_window, settings.auth_backoff)
        browsers = Browsers(store, secure=urllib.parse.urlsplit(url).scheme == "https")
        self.web = Web(settings=settings, store=store, grants=self.grants, pending=self.pending, browsers=browsers,
                       user_throttle=user_throttle, issuer=url, oidc_name=provider_name(settings))
        self.users = users
        self.upstream = (UpstreamSignIn(settings, self.web, UpstreamUsers(settings, store, users), base_url=url)
                         if settings.oidc_issuer else None)

    def routes(self) -> list[BaseRoute]:
        if not self.settings.oauth:
            return []
        upstream = self.upstream.routes() if self.upstream is not None else None
        return [*auth_routes(self.provider), *web_routes(self.web, upstream)]

    async def close(self) -> None:
        await self.documents.close()
