"""The one configuration object, built once at start-up and passed into constructors.

Sources, highest priority first: command-line options (passed as keyword arguments),
environment variables `KERNELPOOL_*`, a TOML file (`--config` / `KERNELPOOL_CONFIG`), defaults.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kernelpool.db.settings import ReplicaSettings
from sandbox.limits import parse_memory

# the data folder where none is given: a system location as root (kernels run as other uids and must
# reach their folders; a folder in root's 0700 home is out of their reach), one's own otherwise.
# Versions before 2026-12 used LEGACY_DATA_DIR, relative to the working folder, also as root.
SYSTEM_DATA_DIR = Path("/var/lib/kernelpool")
LEGACY_DATA_DIR = Path("kernelpool-data")


def default_data_dir() -> Path:
    """`data_dir` when no option, variable or file sets it. Called by `Settings`."""
    return SYSTEM_DATA_DIR if os.geteuid() == 0 else LEGACY_DATA_DIR


def memory_limit(value: str | int | None) -> int | None:
    """A memory limit as people write it ("2G", "512M", "none", "max") in bytes; None = no limit.

    The one parser of memory limits: `Settings` (kernel_memory, user_memory) and
    `UserService.set_limits` / the per-user overrides that `users set-limits` stores.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "none", "max"):
        return None
    return parse_memory(str(value))  # ValueError names the problem


# parsed when the settings are built: everything after sees bytes or None
MemoryLimit = Annotated[int | None, BeforeValidator(memory_limit)]


class Settings(BaseSettings, ReplicaSettings):  # replicas: kernelpool/db/settings.py
    model_config = SettingsConfigDict(env_prefix="KERNELPOOL_", extra="forbid", validate_default=True,
                                      use_attribute_docstrings=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    """where the database, users' folders and runtime files live (users' uids must be able to pass every folder above it)"""
    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = Field(8765, ge=0, le=65535)
    """port to listen on (0 = any free port)"""
    public_url: str | None = None
    """the URL clients use, when behind a proxy: the OAuth issuer and every URL in the auth metadata derive from it (https, except on loopback)"""
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """extra Host headers to accept (DNS-rebinding protection): host:port or host:*, comma-separated"""
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """extra Origin headers to accept, comma-separated"""

    first_user: str = "default"
    """name of the user created on first start, when there is none"""
    insecure_no_sandbox: bool = False
    """run kernels as the server's own user, without cgroups (single-user development only)"""
    uid_min: int = Field(20000, ge=1000)
    """first uid/gid handed to kernelpool users"""
    uid_max: int = Field(29999, ge=1000)
    """last uid/gid handed to kernelpool users"""
    account_prefix: str = "kp-"
    """prefix of the Unix account names created for users"""
    cgroup_prefix: str = "kernelpool"
    """folder name under the server's own cgroup"""
    kernel_network: Literal["egress", "none", "host"] = "egress"
    """each user's kernels share a network namespace of their own: 'egress' = loopback plus NAT to public addresses only, 'none' = loopback only; 'host' = the host's network, shared by all users (unsafe). Left at its default on a host without nftables: 'none', said at start, on /healthz and by doctor; an 'egress' that is set is refused there"""
    kernel_network_range: str = "10.201.0.0/16"
    """private IPv4 range from which each user's namespace gets a /31 ('egress')"""
    kernel_network_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """blocked IPv4 ranges (private, link-local, ...) that kernels may reach after all ('egress'), comma-separated"""
    network_prefix: str = "kp"
    """names this server's namespaces (PREFIX-UID), links (PREFIXUID) and nftables table; unique per host"""
    kernel_memory: MemoryLimit = 2 << 30
    """memory limit per kernel"""
    kernel_cpus: PositiveFloat | None = 1.0
    """CPU limit per kernel, in cores"""
    kernel_pids: PositiveInt | None = 256
    """process/thread limit per kernel"""
    kernel_tmpfs_size: str = "512M"
    """size cap of each kernel's private /tmp, of its /dev/shm and of its System V shared memory (what is stored there counts against the kernel's memory limit)"""
    user_memory: MemoryLimit = 4 << 30
    """memory limit for all of one user's kernels together"""
    user_cpus: PositiveFloat | None = None
    """CPU limit for all of one user's kernels together"""
    user_pids: PositiveInt | None = 1024
    """process/thread limit for all of one user's kernels together"""

    kernel_python: str | None = None
    """python interpreter for kernels (default: the server's own)"""
    kernelspecs: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """kernelspecs users may choose besides the server's own Python (python3), by name as `jupyter kernelspec list` shows them, comma-separated (e.g. ir,bash); each starts sandboxed like python3"""
    kernelspec_pool_sizes: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    """warm kernels kept ready per active user for each of those kernelspecs, as name=N, comma-separated (default 0 each; python3's is pool_size); counted in max_kernels_per_user"""
    kernel_start_timeout: PositiveFloat = 60.0
    """seconds a kernel may take to become ready"""
    max_kernels_per_user: PositiveInt = 16
    """kernels one user may have at once (pool kernels included)"""
    max_kernels: PositiveInt = 512
    """kernels on this server at once"""
    kernel_idle_timeout: NonNegativeFloat = 3600.0
    """seconds after which an idle kernel is shut down (0 = never)"""
    session_idle_timeout: PositiveFloat = 1800.0
    """seconds after which an idle MCP session's context is forgotten"""
    max_sessions: PositiveInt = 10000
    """MCP sessions (protocol 2025-11-25 and older) open on this server at once"""
    max_sessions_per_user: PositiveInt = 100
    """MCP sessions one user may have open at once (below max_sessions)"""
    pool_size: NonNegativeInt = 1
    """warm kernels kept ready per active user"""
    user_packages: bool = True
    """%pip / !pip in a kernel install into the user's own folder (~/.local), seen by that user's kernels only"""
    fork_server: bool = True
    """fork kernels from a pre-imported process (faster start, shared memory); off = start each the stock way"""

    execute_timeout: PositiveFloat = 300.0
    """default timeout of one execution, seconds"""
    max_execute_timeout: PositiveFloat = 3600.0
    """largest timeout a client may ask for, seconds"""
    progress_interval: PositiveFloat = 5.0
    """seconds between progress notifications of a running execution"""
    max_output_chars: int = Field(20000, ge=100)
    """text returned per execution, at most (the notebook keeps more)"""
    max_image_bytes: NonNegativeInt = 2_000_000
    """images larger than this are referenced, not inlined"""
    max_saved_output_chars: int = Field(2_000_000, ge=1000)
    """text kept per output in the notebook (the middle is dropped)"""
    max_saved_image_bytes: NonNegativeInt = 10_000_000
    """images larger than this are not kept in the notebook"""
    max_saved_execution_chars: int = Field(20_000_000, ge=1000)
    """outputs kept per execution, all outputs together (text characters and payload bytes); past it outputs are cut or replaced by a note"""
    kernel_max_message_bytes: int = Field(2**30, ge=2**20)
    """largest message a kernel may send the server, all its frames together (a larger one stops the kernel as misbehaving); output over max_saved_execution_chars is read in pieces, never held"""
    kernel_flood_bytes: int = Field(256 * 2**20, ge=2**20)
    """bytes of messages no request asked for (each counts at least 64 KiB) a kernel may send before it is stopped as flooding"""
    kernel_flood_rate: NonNegativeInt = 16 * 2**20
    """bytes a second that come back to a kernel's kernel_flood_bytes; what the server passes through unread from one user's kernels (messages no request asked for, output over max_saved_execution_chars) is read no faster than four times this (at least 16 MiB/s)"""
    max_result_bytes_per_user: NonNegativeInt = 64 * 2**20
    """finished background results one user's executions keep in server memory; the oldest are dropped past it (get_execution says 'expired')"""
    max_result_bytes: NonNegativeInt = 512 * 2**20
    """finished background results kept in server memory for all users together"""
    max_notebook_bytes: int = Field(100 * 2**20, ge=1 << 20)
    """largest notebook file the server opens (checked before reading it); one whose parse would take more than 4 times this in memory is refused too"""
    max_file_bytes: int = Field(2 * 2**20, ge=4096)
    """bytes one read_file or write_file call reads or writes, at most (larger files are read in pages and written in chunks with mode='append'; a request body is at most 4 MiB, and base64 takes 4/3 of the bytes)"""
    user_disk_quota: str = "10G"
    """disk space a user's folder may take (0 = no quota): past it, write_file calls that add bytes, new notebooks and notebook saves that grow a file are refused. Counted with a bounded walk every few minutes plus the server's own writes; what kernels write directly is seen at the next count, not stopped"""
    user_disk_recount: PositiveFloat = 60.0
    """seconds a count of a user's folder (a walk of at most 200,000 names) is trusted before a write that adds bytes counts it again"""
    disk_free_floor: str = "512M"
    """free space of the data folder under which new kernels and notebook writes are refused (0 = no floor)"""
    audit_queue_max: PositiveInt = 100_000
    """audit rows kept in memory while they cannot be written (a full disk); past it the oldest are dropped and counted"""
    metrics_token: str | None = None
    """bearer token that /metrics requires (per-user figures); without it /metrics answers 403"""
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For is believed, comma-separated"""
    auth_failures_before_backoff: PositiveInt = 10
    """failed authentications from one client address within auth_failure_window before it gets 429"""
    auth_failure_window: PositiveFloat = 60.0
    """seconds over which an address's failed authentications are counted"""
    auth_backoff: PositiveFloat = 30.0
    """seconds an address over the failure count is answered 429 (a valid token still passes)"""
    housekeeping_interval: PositiveFloat = 30.0
    """seconds between idle-kernel culls and session expiry"""

    # resumable streams (kernelpool/mcp/events.py); the event store is in memory
    resume_events_per_session: NonNegativeInt = 2000
    """events kept per MCP session for clients that resume a dropped stream (0 = no resumption)"""
    resume_bytes_per_session: str = "16M"
    """bytes of events kept per MCP session for resumption"""
    resume_bytes_per_user: str = "64M"
    """bytes of events kept for all of one user's sessions together"""
    resume_max_age: PositiveFloat = 900.0
    """seconds an event is kept for resumption"""
    sse_retry_ms: NonNegativeInt = 2000
    """reconnection delay suggested to clients in SSE `retry` fields, milliseconds"""
    near_limit_ratio: float = Field(0.8, gt=0, le=1)
    """share of a per-user limit at which the user's sessions are told they are near it"""

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

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """log level of the server"""
    log_json: bool = False
    """structured JSON logs"""

    config_file: Path | None = Field(None, alias="config")
    """TOML file read at start-up"""

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # resolved once, against the folder the server starts in: kernels and the CLI see one path
        return value.absolute()

    @field_validator("kernelspec_pool_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        # from the environment: "ir=1,bash=0", or a JSON object
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"{value!r}: give name=N pairs, comma-separated")
            return {k.strip(): int(v) for k, v in pairs}
        return value

    @field_validator("kernelspec_pool_sizes")
    @classmethod
    def _sizes_known(cls, value: dict[str, int]) -> dict[str, int]:
        if any(n < 0 for n in value.values()):
            raise ValueError("pool sizes must be 0 or more")
        return value

    @field_validator("allowed_hosts", "allowed_origins", "trusted_proxies", "kernel_network_allow", "kernelspecs",
                     "oauth_cimd_test_resolve", "oidc_scopes", "oidc_allowed_domains", "oidc_allowed_groups", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # from the environment: "a.example:*,b.example:443", or a JSON list
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("public_url", "oidc_issuer")
    @classmethod
    def _https(cls, value: str | None, info: ValidationInfo) -> str | None:
        # the OAuth issuer and what clients send tokens to, the upstream issuer: TLS, except on loopback
        if value is None:
            return None
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname or ""
        loopback = host == "localhost" or _is_loopback(host)
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise ValueError(f"{value!r} must be an https:// URL (http:// only for localhost, 127.0.0.1 or [::1])")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r} must have no query or fragment")
        # an upstream issuer is compared exactly with what its provider says (some end in a slash)
        return value if info.field_name == "oidc_issuer" else value.rstrip("/")

    @field_validator("kernel_network_range")
    @classmethod
    def _range(cls, value: str) -> str:
        net = ipaddress.IPv4Network(value)  # ValueError names the problem
        if net.prefixlen > 31 or not net.is_private:
            raise ValueError(f"{value!r} must be a private IPv4 range of at least two addresses (a /31 or larger)")
        return str(net)

    @field_validator("kernel_network_allow")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.IPv4Network(item)) for item in value]

    @field_validator("network_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # ends in a letter: "<prefix><uid>" link names of two prefixes can then never coincide
        if not re.fullmatch(r"[a-z]([a-z0-9]{0,4}[a-z])?", value):
            raise ValueError(f"{value!r}: 1-6 characters a-z or 0-9, starting and ending with a letter")
        return value

    @field_validator("resume_bytes_per_session", "resume_bytes_per_user")
    @classmethod
    def _bytes(cls, value: str) -> str:
        parse_memory(value)
        return value

    @field_validator("kernel_tmpfs_size")
    @classmethod
    def _tmpfs_size(cls, value: str) -> str:
        if parse_memory(value) < 1 << 20:
            raise ValueError("kernel_tmpfs_size must be a size of at least 1M, such as 512M")
        return value

    @property
    def tmpfs_bytes(self) -> int:
        return parse_memory(self.kernel_tmpfs_size)

    @field_validator("disk_free_floor", "user_disk_quota")
    @classmethod
    def _floor(cls, value: str) -> str:
        if value.strip() not in ("0", ""):
            parse_memory(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # raises ValueError with the bad item
        return value

    @property
    def user_disk_quota_bytes(self) -> int | None:
        return None if self.user_disk_quota.strip() in ("0", "") else parse_memory(self.user_disk_quota)

    @property
    def disk_free_floor_bytes(self) -> int:
        return 0 if self.disk_free_floor.strip() in ("0", "") else parse_memory(self.disk_free_floor)

    def given(self, name: str) -> bool:
        """Whether setting `name` was set (option, environment or file) rather than left at its default."""
        return name in self.model_fields_set

    @property
    def db_path(self) -> Path:
        return self.data_dir / "kernelpool.db"

    @property
    def users_dir(self) -> Path:
        return self.data_dir / "users"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _config_file_from(init_settings)
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config_file_from(init_settings: PydanticBaseSettingsSource) -> Path | None:
    given: Any = init_settings().get("config") or os.environ.get("KERNELPOOL_CONFIG")
    if not given:
        return None
    path = Path(given)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    return path


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; `overrides` are command-line values (None means 'not given')."""
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings(**given)
    if settings.uid_min > settings.uid_max:
        raise ValueError("uid_min must not exceed uid_max")
    for per_user, overall in (("max_kernels_per_user", "max_kernels"), ("max_sessions_per_user", "max_sessions"),
                              ("max_result_bytes_per_user", "max_result_bytes")):
        if getattr(settings, per_user) > getattr(settings, overall):
            raise ValueError(f"{per_user} must not exceed {overall}")
    unknown = sorted(set(settings.kernelspec_pool_sizes) - set(settings.kernelspecs))
    if unknown:
        raise ValueError(f"kernelspec_pool_sizes names {', '.join(unknown)}, which kernelspecs does not allow")
    if settings.oidc_issuer and not (settings.oidc_client_id and (settings.oidc_client_secret is None) != (settings.oidc_client_secret_file is None)):
        raise ValueError("oidc_issuer needs oidc_client_id and one of oidc_client_secret, oidc_client_secret_file")
    if settings.oidc_issuer and not settings.public_url and not (settings.host == "localhost" or _is_loopback(settings.host)):
        raise ValueError("oidc_issuer needs public_url here: the provider sends people back to PUBLIC_URL/signin/oidc/callback")
    if settings.oidc_issuer and not settings.oauth:
        raise ValueError("oidc_issuer needs oauth on: people sign in by OpenID on kernelpool's own sign-in page")
    if settings.oidc_issuer and "openid" not in settings.oidc_scopes:
        raise ValueError("oidc_scopes must include openid")
    if settings.oidc_create_users and not (settings.oidc_allowed_domains or settings.oidc_allowed_groups):
        raise ValueError("oidc_create_users needs oidc_allowed_domains or oidc_allowed_groups: who may be created")
    if settings.replica and not settings.database_url:
        raise ValueError("replica needs database_url: replicas share one PostgreSQL store")
    if len(f"{settings.network_prefix}{settings.uid_max}") > 15:
        raise ValueError("network_prefix plus the largest uid must fit a 15-character interface name: shorten one")
    return settings
