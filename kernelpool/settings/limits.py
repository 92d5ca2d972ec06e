"""The settings that bound executions, outputs, results, files, the disk, the audit queue and
authentication; a part of `kernelpool.config.Settings` (which every caller uses).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic_settings import NoDecode


class LimitSettings(BaseModel):
    """Timeouts and sizes of executions and files, disk quota and floor, metrics, authentication back-off."""

    model_config = ConfigDict(use_attribute_docstrings=True)

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
