"""The `kernelpool` command: serve, users, tokens, audit, doctor (each in `kernelpool.commands`).

Commands that print a secret print it alone on stdout; everything else goes to stderr, so that
`TOKEN=$(kernelpool users add alice)` works.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from kernelpool.commands.common import (
    COMMON_SETTINGS,
    LIMIT_OPTIONS,
    SERVE_SETTINGS,
    _command,
    _err,
    _typed,
    _with_store,
    parse_since,
    parse_when,
)
from kernelpool.commands.doctor import _doctor
from kernelpool.commands.serve import _serve
from kernelpool.commands.tokens import _audit, _tokens
from kernelpool.commands.users import _users
from kernelpool.config import Settings
from kernelpool.errors import KernelpoolError
from kernelpool.replicas import commands as replicas
from kernelpool.users import admins
from sandbox.errors import SandboxError

# the public names of the command line, importable from here as before the commands moved out
__all__ = ["COMMON_SETTINGS", "LIMIT_OPTIONS", "SERVE_SETTINGS", "build_parser", "main", "parse_since", "parse_when"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelpool", description="A sandboxed multi-user Jupyter kernel server over MCP.")
    sub = parser.add_subparsers(dest="command", required=True)
    _command(sub, "serve", "run the server", *SERVE_SETTINGS)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    p = _command(users, "add", "add a user and print its first token (alone, on stdout)")
    p.add_argument("name")
    p.add_argument("--expires", type=parse_when, help="token expiry: 30d, 12h, or an ISO date")
    p.add_argument("--replica", help="the replica it lives on (default: the least loaded running one)")
    replicas.add_arguments(users, sub, _command)
    _command(users, "list", "list users")
    p = _command(users, "remove", "remove a user, its tokens and its Unix account")
    p.add_argument("name")
    p.add_argument("--delete-files", action="store_true", help="also delete the user's folder")
    p = _command(users, "login-link", "print a one-time link that signs NAME in at the browser (alone, on stdout)")
    p.add_argument("name")
    p.add_argument("--base-url", help="the server's URL as people reach it (default: public_url, else http://HOST:PORT)")
    admins.add_command(users, _command)
    p = _command(users, "set-limits", "override a user's limits (per kernel, and for all its kernels)")
    p.add_argument("name")
    for option, name in LIMIT_OPTIONS.items():
        none = "; 'none' for no limit" if "memory" in name else ""
        p.add_argument(option, dest=name, metavar=option[2:].upper().replace("-", "_"), **_typed(name),
                       help=f"{Settings.model_fields[name].description} (default: the server's {name}){none}")

    tokens = sub.add_parser("tokens", help="manage tokens").add_subparsers(dest="action", required=True)
    p = _command(tokens, "create", "create a token for a user and print it (alone, on stdout)")
    p.add_argument("name")
    p.add_argument("--expires", type=parse_when, help="30d, 12h, or an ISO date")
    p = _command(tokens, "list", "list tokens (ids, not secrets), and OAuth grants by client")
    p.add_argument("name", nargs="?")
    p = _command(tokens, "revoke", "revoke a token by its id (or the token itself), or an OAuth grant by its id")
    p.add_argument("token_id")

    p = _command(sub, "audit", "read the audit log")
    p.add_argument("--user")
    p.add_argument("--since", type=parse_since, help="e.g. 1h, 2d, or an ISO date")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = _command(sub, "doctor", "report what isolation this host gives and what is in force")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = {
            "users": _users, "tokens": _tokens, "audit": _audit, "doctor": _doctor,
            "replicas": lambda a: _with_store(a, lambda s, store, u: replicas.list_replicas(s, store)),
        }[args.command]
        return asyncio.run(handler(args))
    except (KernelpoolError, ValueError, FileNotFoundError, SandboxError) as exc:
        _err(f"kernelpool: {exc}")
        return 2
