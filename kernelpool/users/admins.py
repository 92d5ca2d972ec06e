"""Operators: users with the `admin` flag (schema migration 5), who see the web view's operators'
page (every user's kernels, sessions and failures, never anyone's notebooks). Set by
`kernelpool users set-admin NAME [--off]`; read per request by the view, so a change counts at
once. Callers: the CLI, `kernelpool.web.viewbase`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from kernelpool.errors import UserNotFound
from kernelpool.store import Store


async def is_admin(store: Store, user: str) -> bool:
    row = await store.get_user(user)
    return row is not None and row.admin


async def set_admin(store: Store, user: str, *, on: bool) -> str:
    """Set or clear the flag; raises UserNotFound. Returns what changed, in words."""
    if await store.write("UPDATE users SET admin = ? WHERE name = ?", int(on), user) == 0:
        raise UserNotFound(user)
    return f"{user} is {'now' if on else 'no longer'} an operator (the web view's operators' page)"


def add_command(users: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """`kernelpool users set-admin NAME [--off]` (`command` is the CLI's parser maker)."""
    parser = command(users, "set-admin", "make NAME an operator of the web view (all users, no content), or not with --off")
    parser.add_argument("name")
    parser.add_argument("--off", action="store_true", help="take the flag away")
