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
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kernelpool.settings.isolation import IsolationSettings, MemoryLimit, memory_limit
from kernelpool.settings.kernels import KernelSettings
from kernelpool.settings.limits import LimitSettings
from kernelpool.settings.replicas import ReplicaSettings
from kernelpool.settings.server import LEGACY_DATA_DIR, SYSTEM_DATA_DIR, ServerSettings, default_data_dir
from kernelpool.settings.signin import SignInSettings
from kernelpool.settings.streams import StreamSettings
from sandbox.limits import parse_memory

# names importable from here as before the fields moved to kernelpool/settings/
__all__ = ["LEGACY_DATA_DIR", "SYSTEM_DATA_DIR", "MemoryLimit", "Settings", "default_data_dir", "load_settings",
           "memory_limit"]


class Settings(ReplicaSettings, SignInSettings, StreamSettings, LimitSettings, KernelSettings, IsolationSettings, ServerSettings,
               BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KERNELPOOL_", extra="forbid", validate_default=True,
                                      use_attribute_docstrings=True)

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
