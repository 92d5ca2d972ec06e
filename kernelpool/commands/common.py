"""What the `kernelpool` commands share: settings as options (each made from its Settings field),
the settings a command was given, the database for the commands that manage it, and the parsing
of dates and durations. Callers: `kernelpool.cli` (the parser) and the modules of this package.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BeforeValidator

from kernelpool.config import Settings, load_settings

if TYPE_CHECKING:  # imported where they are used: `kernelpool --help` stays quick
    from kernelpool.store import Store
    from kernelpool.users.accounts import UserService


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def parse_when(text: str) -> float:
    """'30d', '12h', '15m', '3600s', or an ISO date/time -> epoch seconds (relative ones from now)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return time.time() + float(m.group(1)) * unit
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration (30d, 12h) or ISO date: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def parse_since(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return 2 * time.time() - parse_when(text)
    return parse_when(text)


# settings that every command takes as options, and those that only `serve` takes; the others come
# from the environment or the TOML file. Each option is made from its Settings field.
COMMON_SETTINGS = ("config_file", "data_dir", "insecure_no_sandbox")
SERVE_SETTINGS = ("host", "port", "kernel_network", "pool_size", "log_json", "log_level")
# `users set-limits`: one user's overrides of these settings
LIMIT_OPTIONS = {"--memory": "kernel_memory", "--cpus": "kernel_cpus", "--pids": "kernel_pids",
                 "--user-memory": "user_memory", "--user-cpus": "user_cpus", "--user-pids": "user_pids"}


def _typed(name: str) -> dict[str, Any]:
    """argparse keywords for Settings field `name`: its choices or type, a flag for a boolean.
    Not given is None, so that the environment, the file and the default still apply."""
    field = Settings.model_fields[name]
    kind = field.annotation
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": list(typing.get_args(kind))}
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None: X
    if typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]  # PositiveFloat: float (the field checks the constraint)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if field.default else "store_true", "default": None}
    if kind in (int, float) and not any(isinstance(meta, BeforeValidator) for meta in field.metadata):
        return {"type": kind}
    return {}  # text, which the field's own validator parses (a path, a memory limit "2G")


def _setting_option(parser: argparse.ArgumentParser, name: str) -> None:
    field = Settings.model_fields[name]
    key = field.alias or name
    default = field.get_default(call_default_factory=True)
    shown = "" if default is None or default is False else f"default {default}, "
    parser.add_argument("--" + key.replace("_", "-"), dest=key, **_typed(name),
                        help=f"{field.description}; {shown}also KERNELPOOL_{key.upper()}".replace("%", "%%"))


def _command(parent: Any, name: str, help: str, *settings: str) -> argparse.ArgumentParser:
    """A subcommand taking the common settings, and `settings`, as options."""
    parser: argparse.ArgumentParser = parent.add_parser(name, help=help)
    for setting in (*COMMON_SETTINGS, *settings):
        _setting_option(parser, setting)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, with the setting options this command was given."""
    keys = {Settings.model_fields[name].alias or name for name in (*COMMON_SETTINGS, *SERVE_SETTINGS)}
    return load_settings(**{key: value for key, value in vars(args).items() if key in keys})


async def _with_store(args: argparse.Namespace, work: Callable[[Settings, Store, UserService], Awaitable[int]]) -> int:
    from kernelpool.disk import check_earlier_data_dir
    from kernelpool.store import Store
    from kernelpool.users.accounts import UserService
    from sandbox import accounts

    settings = _settings(args)
    note = check_earlier_data_dir(settings)  # raises before a database is made beside an earlier one
    if note:
        _err(f"kernelpool: {note}")
    store = await Store(settings.db_path, url=settings.database_url, replica=settings.replica).open()
    try:
        isolated = not settings.insecure_no_sandbox and accounts.can_manage_accounts()
        return await work(settings, store, UserService(settings, store, isolated=isolated))
    finally:
        await store.close()
