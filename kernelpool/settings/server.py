"""The settings of where the server listens and keeps its data: a part of `kernelpool.config.Settings`
(which every caller uses), with the default data folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import NoDecode

# the data folder where none is given: a system location as root (kernels run as other uids and must
# reach their folders; a folder in root's 0700 home is out of their reach), one's own otherwise.
# Versions before 2026-12 used LEGACY_DATA_DIR, relative to the working folder, also as root.
SYSTEM_DATA_DIR = Path("/var/lib/kernelpool")
LEGACY_DATA_DIR = Path("kernelpool-data")


def default_data_dir() -> Path:
    """`data_dir` when no option, variable or file sets it. Called by `Settings`."""
    return SYSTEM_DATA_DIR if os.geteuid() == 0 else LEGACY_DATA_DIR



class ServerSettings(BaseModel):
    """Address, port, public URL, accepted hosts and origins, data folder."""

    model_config = ConfigDict(use_attribute_docstrings=True)

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
