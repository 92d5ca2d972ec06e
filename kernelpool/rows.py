"""The rows the store hands out: a user, a token, a kernel. Callers: `kernelpool.store` (which makes
them, and from which they are imported) and the services that read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class UserRow:
    name: str
    uid: int
    gid: int
    created_at: float
    limits: dict[str, Any]
    reissued: bool = False  # the name had an account before: this one is named after its uid
    home: str | None = None  # the replica that holds the user's kernels and files; None: single node
    ukey: str | None = None
    admin: bool = False  # an operator: sees the operators' page of the web view (`users set-admin`)


@dataclass(frozen=True)
class TokenRow:
    id: str
    user: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    uid: int | None = None  # the user's, when looked up to check the token
    grant_id: str | None = None  # an OAuth access token's grant (kernelpool/users/grants.py); None: pasted
    resource: str | None = None  # the MCP resource an OAuth access token is bound to (RFC 8707)
    home: str | None = None  # the user's home replica, when looked up to check the token


@dataclass(frozen=True)
class KernelRow:
    id: str
    user: str
    notebook: str | None
    pid: int | None
    cgroup: str | None
    connection_file: str | None
    started_at: float
