"""nftables through libnftables (the library behind `nft`), loaded with ctypes.

Used by `sandbox.network` for the kernels' firewall table. A library call rather than a
`nft -f -` subprocess: no process per change, and errors come back as the library's own
message. Debian ships libnftables1 with the `nftables` package; `available()` says whether it
loads here. Python bindings exist (python3-nftables) but only as a Debian package for the
system interpreter, not for a virtual environment, so the few calls needed are declared here.
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

_OUTPUT_JSON = 1 << 4
_SONAME = "libnftables.so.1"


class NftError(Exception):
    """libnftables refused a command; the message is its own error text."""


class _Lib:
    def __init__(self) -> None:
        lib = ctypes.CDLL(_SONAME)
        self.ctx_new = lib.nft_ctx_new
        self.ctx_new.restype = ctypes.c_void_p
        self.ctx_new.argtypes = [ctypes.c_uint32]
        self.ctx_free = lib.nft_ctx_free
        self.ctx_free.argtypes = [ctypes.c_void_p]
        self.set_flags = lib.nft_ctx_output_set_flags
        self.set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.buffer_output = lib.nft_ctx_buffer_output
        self.buffer_output.argtypes = [ctypes.c_void_p]
        self.buffer_error = lib.nft_ctx_buffer_error
        self.buffer_error.argtypes = [ctypes.c_void_p]
        self.output = lib.nft_ctx_get_output_buffer
        self.output.restype = ctypes.c_char_p
        self.output.argtypes = [ctypes.c_void_p]
        self.error = lib.nft_ctx_get_error_buffer
        self.error.restype = ctypes.c_char_p
        self.error.argtypes = [ctypes.c_void_p]
        self.run = lib.nft_run_cmd_from_buffer
        self.run.restype = ctypes.c_int
        self.run.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


_lib: _Lib | None = None
_load_error: str | None = None
_lock = threading.Lock()


def _load() -> _Lib:
    global _lib, _load_error
    with _lock:
        if _lib is None and _load_error is None:
            try:
                _lib = _Lib()
            except OSError as exc:
                _load_error = f"{_SONAME} not found ({exc}); install the 'nftables' package"
        if _lib is None:
            raise NftError(_load_error or "libnftables unavailable")
        return _lib


def available() -> str | None:
    """None if libnftables loads, else why not."""
    try:
        _load()
    except NftError as exc:
        return str(exc)
    return None


def run(commands: str) -> None:
    """Run nft commands given as text (one transaction: all or nothing); raises NftError."""
    _call(commands, as_json=False)


def list_json(what: str) -> list[dict[str, Any]]:
    """`list <what>` as libnftables' JSON objects (the "nftables" array)."""
    out = _call(f"list {what}", as_json=True)
    data = json.loads(out) if out.strip() else {"nftables": []}
    return list(data.get("nftables", []))


_call_lock = threading.Lock()


def _call(commands: str, *, as_json: bool) -> str:
    lib = _load()
    # one call at a time in this process: libnftables keeps global state besides its contexts
    # (the parser's and the cache's), and the server makes namespaces from several threads
    with _call_lock:
        return _call_locked(lib, commands, as_json)


def _call_locked(lib: _Lib, commands: str, as_json: bool) -> str:
    ctx = lib.ctx_new(0)
    if not ctx:
        raise NftError("nft_ctx_new failed")
    try:
        lib.buffer_output(ctx)
        lib.buffer_error(ctx)
        lib.set_flags(ctx, _OUTPUT_JSON if as_json else 0)
        rc = lib.run(ctx, commands.encode())
        if rc != 0:
            message = (lib.error(ctx) or b"").decode("utf-8", "replace").strip()
            raise NftError(message or f"nft command failed: {commands[:200]!r}")
        return (lib.output(ctx) or b"").decode("utf-8", "replace")
    finally:
        lib.ctx_free(ctx)
