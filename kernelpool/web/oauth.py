"""kernelpool as its own OAuth 2.1 authorization server, on the MCP SDK's `mcp.server.auth`.

`KernelpoolOAuth` is the SDK's `OAuthAuthorizationServerProvider`: clients come from DCR
(`/register`, kept in the store) or from client ID metadata documents (`users.cimd`); an
authorization request waits (`users.pending`) while the person signs in and consents on the
pages of `kernelpool.web`, which then makes the grant and its single-use code (`users.grants`).
The SDK's handlers check PKCE, redirect URIs against `KernelpoolClient.validate_redirect_uri`,
code expiry and client ids; this provider issues opaque `kp_` tokens bound to this server's MCP
resource. `auth_routes` gives the routes, with the RFC 8414 metadata, and checks of the
`resource` indicator (RFC 8707) that the SDK leaves to the server. Callers: `kernelpool.app`.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.parse
from typing import Literal

from mcp.server.auth.handlers.authorize import AuthorizationHandler
from mcp.server.auth.handlers.metadata import MetadataHandler, ProtectedResourceMetadataHandler
from mcp.server.auth.handlers.token import TokenHandler
from mcp.server.auth.middleware.client_auth import ClientAuthenticator
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    RegistrationError,
    TokenError,
)
from mcp.server.auth.routes import build_metadata, cors_middleware, create_auth_routes
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE, RequestBodyLimitMiddleware
from mcp.shared.auth import (
    InvalidRedirectUriError,
    InvalidScopeError,
    OAuthClientInformationFull,
    OAuthToken,
    ProtectedResourceMetadata,
)
from pydantic import AnyHttpUrl, AnyUrl, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp

from kernelpool.config import Settings
from kernelpool.mcp.auth import SCOPE
from kernelpool.users.cimd import ClientDocumentError, ClientDocuments, is_document_url
from kernelpool.users.grants import GrantRow, GrantStore, Issued
from kernelpool.users.pending import Pending, PendingAuthorizations

log = logging.getLogger(__name__)

PUBLIC_CLIENT = "none"  # the token endpoint auth method of a client without a secret
BEARER: Literal["Bearer"] = "Bearer"
_FORBIDDEN_SCHEMES = {"javascript", "data", "file", "vbscript", "blob", "about", "filesystem"}


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def check_redirect_uri(uri: str) -> str | None:
    """Why `uri` may not be registered as a redirect URI, or None: https anywhere, http only to
    loopback (RFC 8252), a private-use scheme of a native app; never a fragment or a script."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if not scheme or parts.fragment or scheme in _FORBIDDEN_SCHEMES:
        return f"redirect URI {uri!r} is not allowed (no fragment, no script or data scheme)"
    if scheme == "http" and not _loopback(parts.hostname):
        return f"redirect URI {uri!r}: plain http only to a loopback address"
    if scheme in ("http", "https") and not parts.hostname:
        return f"redirect URI {uri!r} has no host"
    return None


class KernelpoolClient(OAuthClientInformationFull):
    """A client as registered; redirect URIs must match exactly, except that a loopback one
    matches on any port (RFC 8252 §7.3), and the only scope is kernelpool's."""

    def validate_redirect_uri(self, redirect_uri: AnyUrl | None) -> AnyUrl:
        if redirect_uri is not None and self.redirect_uris:
            given = urllib.parse.urlsplit(str(redirect_uri))
            for registered in self.redirect_uris:
                if str(registered) == str(redirect_uri):
                    return redirect_uri
                reg = urllib.parse.urlsplit(str(registered))
                if (reg.scheme == "http" and given.scheme == "http" and _loopback(reg.hostname)
                        and reg.hostname == given.hostname and reg.path == given.path and reg.query == given.query):
                    return redirect_uri
            raise InvalidRedirectUriError(f"redirect URI '{redirect_uri}' is not registered for this client")
        return super().validate_redirect_uri(redirect_uri)

    def validate_scope(self, requested_scope: str | None) -> list[str] | None:
        if requested_scope is None:
            return [SCOPE]
        scopes = requested_scope.split()
        unknown = [s for s in scopes if s != SCOPE]
        if unknown:
            raise InvalidScopeError(f"unknown scope {unknown[0]!r}: kernelpool has one scope, {SCOPE!r}")
        return scopes or [SCOPE]


class GrantCode(AuthorizationCode):
    grant_id: str


class GrantRefresh(RefreshToken):
    grant: GrantRow | None = None
    refused: str | None = None


class GrantAccess(AccessToken):
    grant_id: str


class KernelpoolOAuth(OAuthAuthorizationServerProvider[GrantCode, GrantRefresh, GrantAccess]):
    """The SDK's authorization server provider (see the module docstring). The SEP-990 identity
    assertion grant is not offered: the protocol's default refuses it."""

    def __init__(self, settings: Settings, grants: GrantStore, documents: ClientDocuments,
                 pending: PendingAuthorizations, *, issuer: str, resource: str) -> None:
        self.settings, self.grants, self.documents, self.pending = settings, grants, documents, pending
        self.issuer, self.resource = issuer, resource

    async def get_client(self, client_id: str) -> KernelpoolClient | None:
        if is_document_url(client_id):
            if not self.settings.oauth_client_metadata_documents:
                return None
            try:
                document = await self.documents.fetch(client_id)
            except ClientDocumentError as exc:
                await self.grants.audit(None, "client", "refused", f"{client_id}: {exc}")
                return None
            fields = {k: document[k] for k in ("redirect_uris", "client_name", "client_uri", "logo_uri", "scope")
                      if k in document}
            try:
                client = KernelpoolClient.model_validate(fields | {"client_id": client_id, "token_endpoint_auth_method": "none",
                                                                   "grant_types": ["authorization_code", "refresh_token"]})
            except ValidationError as exc:
                await self.grants.audit(None, "client", "refused", f"{client_id}: invalid metadata: {exc.error_count()} error(s)")
                return None
            bad = next((why for uri in client.redirect_uris or [] if (why := check_redirect_uri(str(uri)))), None)
            return None if bad else client
        stored = await self.grants.client(client_id)
        return KernelpoolClient.model_validate(stored) if stored is not None else None

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        if not self.settings.oauth_dynamic_registration:
            raise RegistrationError("invalid_client_metadata", "dynamic client registration is off on this server")
        for uri in client_info.redirect_uris or []:
            why = check_redirect_uri(str(uri))
            if why is not None:
                raise RegistrationError("invalid_redirect_uri", why)
        # every client is public (PKCE): a registration asking for a secret gets none, and says so
        # (RFC 7591 §3.2.1 lets the server replace values); nothing secret is kept for clients
        client_info.token_endpoint_auth_method = PUBLIC_CLIENT
        client_info.client_secret = None
        client_info.client_secret_expires_at = None
        await self.grants.add_client(client_info.client_id, client_info.model_dump(mode="json", exclude_none=True))
        await self.grants.audit(None, "register", "ok", f"client {client_info.client_id} ({client_info.client_name or 'no name'})")

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        if params.resource is not None and not same_resource(params.resource, self.resource):
            raise AuthorizeError("invalid_target", f"this server issues tokens for {self.resource} only")
        key = self.pending.add(Pending(
            client_id=client.client_id, client_name=client.client_name, redirect_uri=str(params.redirect_uri),
            redirect_explicit=params.redirect_uri_provided_explicitly, state=params.state,
            scopes=params.scopes or [SCOPE], code_challenge=params.code_challenge, resource=self.resource))
        return f"{self.issuer}/signin?txn={key}"

    async def load_authorization_code(self, client: OAuthClientInformationFull, authorization_code: str) -> GrantCode | None:
        row = await self.grants.take_code(authorization_code)
        if row is None or row.grant.client_id != client.client_id:
            await self.grants.audit(row.grant.user if row else None, "token", "refused",
                                    f"client {client.client_id}: unknown, used or revoked authorization code")
            return None
        return GrantCode(code=authorization_code, scopes=row.grant.scopes, expires_at=row.expires_at,
                         client_id=client.client_id, code_challenge=row.code_challenge,
                         redirect_uri=AnyUrl(row.redirect_uri), redirect_uri_provided_explicitly=row.redirect_explicit,
                         resource=row.grant.resource, subject=row.grant.user, grant_id=row.grant.id)

    async def exchange_authorization_code(self, client: OAuthClientInformationFull, authorization_code: GrantCode) -> OAuthToken:
        grant = await self.grants.grant(authorization_code.grant_id)
        if grant is None or grant.revoked_at is not None:
            raise TokenError("invalid_grant", "the grant was revoked")
        issued = await self.grants.issue_tokens(grant, access_ttl=self.settings.oauth_access_token_ttl,
                                                refresh_ttl=self.settings.oauth_refresh_token_ttl)
        await self.grants.audit(grant.user, "token", "ok", f"grant {grant.id}, client {client.client_id}: access token issued")
        return _token(issued, grant)

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> GrantRefresh | None:
        grant, why = await self.grants.refresh_grant(refresh_token, client.client_id)
        if grant is None:
            await self.grants.audit(None, "refresh", "refused", f"client {client.client_id}: {why}")
            return None
        return GrantRefresh(token=refresh_token, client_id=client.client_id, scopes=grant.scopes,
                            resource=grant.resource, subject=grant.user, grant=grant)

    async def exchange_refresh_token(self, client: OAuthClientInformationFull, refresh_token: GrantRefresh,
                                     scopes: list[str]) -> OAuthToken:
        grant = refresh_token.grant
        if grant is None:
            raise TokenError("invalid_grant", "refresh token does not exist")
        issued = await self.grants.issue_tokens(grant, access_ttl=self.settings.oauth_access_token_ttl,
                                                refresh_ttl=self.settings.oauth_refresh_token_ttl)
        await self.grants.audit(grant.user, "refresh", "ok", f"grant {grant.id}, client {client.client_id}: tokens rotated")
        return _token(issued, grant)

    async def load_access_token(self, token: str) -> GrantAccess | None:
        # used by the SDK's /revoke only (requests are checked by `StoreTokenVerifier`): either
        # kind of token of a grant names the grant, and revoking one revokes the grant
        grant = await self.grants.grant_of_token(token)
        if grant is None:
            return None
        return GrantAccess(token=token, client_id=grant.client_id, scopes=grant.scopes, resource=grant.resource,
                           subject=grant.user, grant_id=grant.id)

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        grant_id = token.grant_id if isinstance(token, GrantAccess) else getattr(getattr(token, "grant", None), "id", None)
        if grant_id and await self.grants.revoke_grant(grant_id, "revoked by the client"):
            await self.grants.audit(token.subject, "revoke", "ok", f"grant {grant_id}, client {token.client_id}")


def _token(issued: Issued, grant: GrantRow) -> OAuthToken:
    return OAuthToken(access_token=issued.access.token, token_type=BEARER,
                      expires_in=max(1, int(issued.access_expires_at - time.time())),
                      refresh_token=issued.refresh.token, scope=" ".join(grant.scopes))


def same_resource(given: str, ours: str) -> bool:
    try:
        return str(AnyHttpUrl(given)).rstrip("/") == str(AnyHttpUrl(ours)).rstrip("/")
    except ValidationError:
        return False


def auth_routes(provider: KernelpoolOAuth) -> list[Route]:
    """The authorization server's routes and the protected-resource metadata at the root path
    (the SDK serves the one at `/.well-known/oauth-protected-resource/mcp`)."""
    settings = provider.settings
    # the issuer exactly as clients compare it (RFC 8414 §3.3, RFC 9207): no slash added to an empty path
    issuer = AuthSettings.model_validate({"issuer_url": provider.issuer, "resource_server_url": None}).issuer_url
    registration = ClientRegistrationOptions(enabled=True, valid_scopes=[SCOPE], default_scopes=[SCOPE])
    revocation = RevocationOptions(enabled=True)
    metadata = build_metadata(issuer, None, registration, revocation)
    metadata.client_id_metadata_document_supported = settings.oauth_client_metadata_documents
    metadata.authorization_response_iss_parameter_supported = True
    metadata.token_endpoint_auth_methods_supported = ["none"]
    metadata.revocation_endpoint_auth_methods_supported = ["none"]
    if not settings.oauth_dynamic_registration:
        metadata.registration_endpoint = None
    authorize_handler = AuthorizationHandler(provider).handle
    token_handler = TokenHandler(provider, ClientAuthenticator(provider)).handle

    async def authorize(request: Request) -> Response:
        params = request.query_params if request.method == "GET" else await request.form()
        client_id = params.get("client_id")
        if isinstance(client_id, str) and is_document_url(client_id) and settings.oauth_client_metadata_documents:
            try:  # said plainly here; the SDK would only say "not found" (the fetch is cached for it)
                await provider.documents.fetch(client_id)
            except ClientDocumentError as exc:
                await provider.grants.audit(None, "authorize", "refused", f"{client_id}: {exc}")
                return JSONResponse({"error": "invalid_client", "error_description": str(exc)}, status_code=400)
        return await authorize_handler(request)

    async def token(request: Request) -> Response:
        resource = (await request.form()).get("resource")
        if isinstance(resource, str) and not same_resource(resource, provider.resource):
            await provider.grants.audit(None, "token", "refused", f"token asked for another resource {resource[:200]!r}")
            return JSONResponse({"error": "invalid_target", "error_description": f"this server issues tokens for "
                                 f"{provider.resource} only"}, status_code=400, headers={"Cache-Control": "no-store"})
        response: Response = await token_handler(request)
        return response

    sdk = {route.path: route for route in create_auth_routes(provider, issuer, None, registration, revocation)}
    routes = [
        Route("/.well-known/oauth-authorization-server", cors_middleware(MetadataHandler(metadata).handle, ["GET", "OPTIONS"]),
              methods=["GET", "OPTIONS"]),
        Route("/authorize", _limited(request_response(authorize)), methods=["GET", "POST"]),
        Route("/token", _limited(cors_middleware(token, ["POST", "OPTIONS"])), methods=["POST", "OPTIONS"]),
        sdk["/revoke"],
    ]
    if settings.oauth_dynamic_registration:
        routes.append(sdk["/register"])
    return routes


def _limited(app: ASGIApp) -> ASGIApp:
    return RequestBodyLimitMiddleware(app, DEFAULT_MAX_REQUEST_BODY_SIZE)


def resource_metadata_route(resource: str, issuer: str | None, path: str) -> Route:
    """RFC 9728 metadata of the MCP resource at `path` (the root well-known path, for clients
    that look there first)."""
    metadata = ProtectedResourceMetadata.model_validate({
        "resource": resource, "authorization_servers": [issuer or resource], "scopes_supported": [SCOPE],
        "resource_name": "kernelpool"})
    return Route(path, cors_middleware(ProtectedResourceMetadataHandler(metadata).handle, ["GET", "OPTIONS"]),
                 methods=["GET", "OPTIONS"])

