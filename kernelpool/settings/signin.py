"""The settings of signing in: kernelpool's own OAuth 2.1 authorization server, the web view and
upstream OpenID Connect; a part of `kernelpool.config.Settings` (which every caller uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, SecretStr
from pydantic_settings import NoDecode


class SignInSettings(BaseModel):
    """OAuth, the web view, sign-in links, upstream OpenID Connect."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    # kernelpool as its own OAuth 2.1 authorization server (kernelpool/mcp/oauth.py, kernelpool/web/)
    oauth: bool = True
    """be an OAuth 2.1 authorization server, so that clients sign people in through the browser (pasted tokens work either way)"""
    web_view: bool = True
    """serve the read-only web view at /view: people watch their notebooks and kernels live (needs oauth, for its sign-in)"""
    oauth_access_token_ttl: PositiveFloat = 3600.0
    """seconds an OAuth access token is valid"""
    oauth_refresh_token_ttl: PositiveFloat = 30 * 86400.0
    """seconds an OAuth refresh token is valid (each use gives a new one)"""
    oauth_code_ttl: float = Field(60.0, gt=0, le=60)
    """seconds an OAuth authorization code may wait to be exchanged (at most a minute)"""
    oauth_dynamic_registration: bool = True
    """accept OAuth clients that register by RFC 7591 dynamic client registration"""
    oauth_client_metadata_documents: bool = True
    """accept OAuth clients whose client id is the HTTPS URL of their metadata document (CIMD)"""
    oauth_cimd_test_ca: Path | None = None
    """TESTS ONLY: a CA file trusted, besides the system's, when fetching client metadata documents"""
    oauth_cimd_test_resolve: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """TESTS ONLY: HOST=ADDRESS pairs that client metadata document fetches resolve so, even to loopback; comma-separated"""
    login_link_ttl: PositiveFloat = 300.0
    """seconds a one-time sign-in link (kernelpool users login-link) is valid"""
    # upstream OpenID Connect sign-in (kernelpool/web/oidc.py, kernelpool/users/upstream.py)
    oidc_issuer: str | None = None
    """issuer URL of a team's OpenID Connect provider (discovery at ISSUER/.well-known/openid-configuration): the sign-in page then offers it (https, except on loopback)"""
    oidc_name: str | None = None
    """the provider's name on the sign-in page's button (default: the issuer's host name)"""
    oidc_client_id: str | None = None
    """kernelpool's client id at the provider, whose redirect URI there is PUBLIC_URL/signin/oidc/callback"""
    oidc_client_secret: SecretStr | None = None
    """kernelpool's client secret at the provider (never logged); or oidc_client_secret_file"""
    oidc_client_secret_file: Path | None = None
    """a file holding the client secret (a Docker or Kubernetes secret), read when the server starts"""
    oidc_scopes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["openid", "email", "profile"])
    """scopes asked of the provider, comma-separated; must include openid"""
    oidc_user_claim: str = "preferred_username"
    """ID-token claim whose value is the kernelpool user name (a lowercase letter, then lowercase letters, digits, - or _, at most 31; others are refused)"""
    oidc_user_domain: str | None = None
    """when set, the user claim must be an e-mail address at this domain (verified, for the email claim) and the user name is its part before the @"""
    oidc_allowed_domains: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """only people whose verified e-mail address is at one of these domains may sign in (or those of oidc_allowed_groups; neither set: anyone the provider signs in), comma-separated"""
    oidc_allowed_groups: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """only people in one of these groups (the oidc_groups_claim claim) may sign in (or those of oidc_allowed_domains), comma-separated"""
    oidc_groups_claim: str = "groups"
    """ID-token claim listing a person's groups"""
    oidc_create_users: bool = False
    """create a person's kernelpool user (as kernelpool users add does) at their first sign-in; needs oidc_allowed_domains or oidc_allowed_groups"""
