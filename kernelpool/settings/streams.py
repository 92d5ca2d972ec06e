"""The settings of resumable MCP streams and near-limit notices; a part of
`kernelpool.config.Settings` (which every caller uses).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat


class StreamSettings(BaseModel):
    """Events kept for clients that resume a dropped stream."""

    model_config = ConfigDict(use_attribute_docstrings=True)

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
