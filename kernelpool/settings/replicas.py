"""The settings of the store's database and of a replica among several (docs/scale-out.md); a part
of `kernelpool.config.Settings` (which every caller uses)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator
from pydantic_settings import NoDecode

REPLICA_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")


class ReplicaSettings(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    database_url: str | None = None
    """PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DB) of the store that several replicas share; unset: SQLite in the data folder"""
    replica: str | None = None
    """this server's name among several replicas (HAProxy's backend of that name routes its users here); needs database_url"""
    haproxy_admin: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """HAProxy runtime API addresses (HOST:PORT, or a unix socket path) whose maps this replica keeps current, comma-separated"""
    haproxy_maps: str = "/usr/local/etc/haproxy/maps"
    """folder of users.map and tokens.map as HAProxy's configuration names them"""
    replica_timeout: PositiveFloat = 30.0
    """seconds after a replica's last heartbeat that it no longer counts as running (placement, kernelpool replicas)"""

    @field_validator("haproxy_admin", mode="before")
    @classmethod
    def _addresses(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("replica")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not REPLICA_NAME.fullmatch(value):
            raise ValueError(f"{value!r}: a replica name is 1-31 characters: a lowercase letter, then lowercase letters, digits or '-'")
        return value

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be a postgresql:// URL")
        return value
