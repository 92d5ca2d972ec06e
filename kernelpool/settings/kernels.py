"""The settings of kernels: interpreter, kernelspecs, pools, timeouts and counts; a part of
`kernelpool.config.Settings` (which every caller uses).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from pydantic_settings import NoDecode


class KernelSettings(BaseModel):
    """Kernels and MCP sessions: which, how many, how long."""

    model_config = ConfigDict(use_attribute_docstrings=True)

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
