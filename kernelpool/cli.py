"""The `kernelpool` command: serve, users, tokens, audit, doctor.

Commands that print a secret print it alone on stdout; everything else goes to stderr, so that
`TOKEN=$(kernelpool users add alice)` works.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import re
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pydantic import BeforeValidator

from kernelpool.config import Settings, load_settings
from kernelpool.errors import KernelpoolError, fmt_bytes
from kernelpool.replicas import commands as replicas
from kernelpool.users import admins
from sandbox.errors import SandboxError

if TYPE_CHECKING:  # imported where they are used: `kernelpool --help` stays quick
    from kernelpool.store import Store
    from kernelpool.users.accounts import UserService

log = logging.getLogger("kernelpool")


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


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, with the setting options this command was given."""
    keys = {Settings.model_fields[name].alias or name for name in (*COMMON_SETTINGS, *SERVE_SETTINGS)}
    return load_settings(**{key: value for key, value in vars(args).items() if key in keys})


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


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kernelpool.app import create_app
    from kernelpool.disk import check_earlier_data_dir
    from kernelpool.logs import setup_logging
    from kernelpool.store import check_not_newer

    settings = _settings(args)
    setup_logging(settings.log_level, as_json=settings.log_json)
    # before anything is built: an earlier version's folder left aside by the new default, and a
    # data folder of a newer kernelpool, are refused untouched
    note = check_earlier_data_dir(settings)
    if note:
        log.warning("%s", note)
    check_not_newer(settings.db_path)
    app = create_app(settings)
    _tune_gc(app)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
        timeout_graceful_shutdown=10, lifespan="on", access_log=False,
    )
    server = _uvicorn_server(config)
    _err(f"kernelpool {settings.host}:{settings.port}, data in {settings.data_dir}")
    server.run()
    return 0


def _tune_gc(app: Any) -> None:
    """Keep the cyclic garbage collector from stopping the event loop for long.

    What was imported and built at start-up lives as long as the server: `gc.freeze` takes it out
    of every later collection. The first generation is collected after 50,000 allocations rather
    than 700, so the young collections that promote into the costly full ones come less often.
    Pauses are timed into /metrics (`kernelpool_gc_pause_seconds`).
    """
    import gc

    app.state.services.metrics.watch_gc()
    gc.collect()  # timed too: the one full collection of everything built so far
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _uvicorn_server(config: Any) -> Any:
    """uvicorn's server, telling MCP sessions that it shuts down while their streams are still open."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    # sse-starlette, which serves the SDK's SSE streams, would end them all on its own timer once
    # the signal arrives (it polls every 0.5 s), at times before the hook below had told anyone:
    # the streams end when the hook is done
    AppStatus.disable_automatic_graceful_drain()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            hook = getattr(getattr(config.app, "state", None), "before_shutdown", None)
            try:
                if hook is not None:
                    await asyncio.wait_for(hook(), 5)
            except Exception as exc:
                _err(f"kernelpool: shutdown notice not sent: {exc}")
            finally:
                AppStatus.should_exit = True
            await super().shutdown(sockets)

    return Server(config)


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


async def _users(args: argparse.Namespace) -> int:
    from kernelpool.errors import UserNotFound
    from kernelpool.users.tokens import create_token

    async def work(settings: Settings, store: Store, users: UserService) -> int:
        if args.action == "add":
            row = await users.add(args.name, await replicas.place(settings, store, args.replica))
            _, token = await create_token(store, row.name, args.expires)
            await replicas.route(settings, store)
            account = f", account {users.account_name(row)}" if users.isolated else ""
            _err(f"created user {row.name} (uid {row.uid}{account}); its token follows on stdout")
            print(token)
        elif args.action == "list":
            for row in await store.list_users():
                limits = " ".join(f"{k}={v}" for k, v in sorted(row.limits.items()))
                home = f"\thome={row.home}" if row.home else ""
                print(f"{row.name}\tuid={row.uid}{home}\t{limits}".rstrip())
        elif args.action == "move":
            return await replicas.move(settings, store, args)
        elif args.action == "remove":
            await users.remove(args.name, delete_files=args.delete_files)
            _err(f"removed user {args.name}")
        elif args.action == "login-link":
            from kernelpool.app import base_url
            from kernelpool.users.grants import GrantStore

            if await store.get_user(args.name) is None:
                raise UserNotFound(args.name)
            secret = await GrantStore(store).create_link(args.name, settings.login_link_ttl)
            _err(f"a sign-in link for {args.name}, valid once for {settings.login_link_ttl:g} s, follows on stdout")
            print(f"{(args.base_url or base_url(settings)).rstrip('/')}/login/{secret}")
        elif args.action == "set-admin":
            _err(await admins.set_admin(store, args.name, on=not args.off))
        elif args.action == "set-limits":
            given = {k: getattr(args, k) for k in LIMIT_OPTIONS.values()}
            if all(v is None for v in given.values()):
                _err("kernelpool: give at least one limit (--memory, --cpus, --pids, --user-memory, ...)")
                return 2
            now = await users.set_limits(args.name, **given)
            _err(f"limits of {args.name}: {json.dumps(now)} (new kernels get them)")
        return 0

    return await _with_store(args, work)


async def _tokens(args: argparse.Namespace) -> int:
    from kernelpool.errors import UserNotFound
    from kernelpool.users.grants import GrantStore
    from kernelpool.users.tokens import create_token, hash_token

    async def work(settings: Settings, store: Store, users: UserService) -> int:
        grants = GrantStore(store)
        if args.action == "create":
            if await store.get_user(args.name) is None:
                raise UserNotFound(args.name)
            token_id, token = await create_token(store, args.name, args.expires)
            _err(f"created token {token_id} for {args.name}")
            print(token)
        elif args.action == "list":
            for t in await store.list_tokens(args.name):
                state = "revoked" if t.revoked_at else ("expired" if t.expires_at and t.expires_at < time.time() else "active")
                expires = dt.datetime.fromtimestamp(t.expires_at, dt.UTC).isoformat() if t.expires_at else "never"
                print(f"{t.id}\t{t.user}\t{state}\texpires={expires}")
            for g in await grants.grants(args.name):
                state = f"revoked ({g.revoked_why})" if g.revoked_at else "active"
                used = dt.datetime.fromtimestamp(g.used_at, dt.UTC).isoformat() if g.used_at else "never"
                print(f"{g.id}\t{g.user}\t{state}\toauth client={g.client_name or g.client_id!r} ({g.client_id})\tlast-issued={used}")
        elif args.action == "revoke":
            token_id = args.token_id
            if token_id.startswith("kp_"):
                row = await store.token_by_hash(hash_token(token_id))
                token_id = (row.grant_id or row.id) if row else ""
            if await grants.revoke_grant(token_id, "revoked with kernelpool tokens revoke"):
                await grants.audit(None, "revoke", "ok", f"grant {token_id}: kernelpool tokens revoke")
                _err(f"revoked OAuth grant {token_id} (its access and refresh tokens)")
                return 0
            if not await store.revoke_token(token_id):
                _err(f"kernelpool: no active token {args.token_id!r}")
                return 2
            _err(f"revoked token {token_id}")
        return 0

    return await _with_store(args, work)


async def _audit(args: argparse.Namespace) -> int:
    async def work(settings: Settings, store: Store, users: UserService) -> int:
        for row in await store.read_audit(user=args.user, since=args.since, limit=args.limit):
            if args.json:
                print(json.dumps(row))
            else:
                when = dt.datetime.fromtimestamp(row["ts"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
                print(f"{when}\t{row['user']}\t{row['tool']}\t{row['notebook'] or '-'}\t{row['outcome']}\t"
                      f"{row['duration_ms']:.1f}ms" + (f"\t{row['detail']}" if row["detail"] else ""))
        return 0

    return await _with_store(args, work)


async def _doctor(args: argparse.Namespace) -> int:
    from kernelpool.disk import DiskSpace, data_folder_report
    from kernelpool.errors import SandboxUnavailable
    from kernelpool.kernels.isolation import decide
    from kernelpool.kernels.networks import report as network_report

    settings = _settings(args)
    report: dict[str, Any] = {"euid": os.geteuid(), "data_dir": str(settings.data_dir)}
    try:
        iso = decide(settings)
        report["host"] = iso.host
        report["in_force"] = iso.describe()
        report["network"] = network_report(settings, iso.network, sandboxed=iso.sandboxed) | {"fallback": iso.fallback()}
        ok = True
    except SandboxUnavailable as exc:
        from sandbox import probe

        report["host"] = probe()
        report["in_force"] = {"sandboxed": False, "error": str(exc)}
        report["network"] = {"mode": settings.kernel_network, "isolated": False, "why": "the sandbox cannot run here"}
        ok = False
    folder = settings.data_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # not created yet: the filesystem it will be on
    report["disk"] = DiskSpace(folder, settings.disk_free_floor_bytes).report() | {"path": str(settings.data_dir)}
    data = report["data_folder"] = data_folder_report(settings)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_doctor(report)
    if report["disk"]["low"] or data["refused"]:
        return 1
    if settings.insecure_no_sandbox:
        return 0
    return 0 if ok and data["reachable_by_users"] else 1


def _print_doctor(report: dict[str, Any]) -> None:
    from kernelpool.kernels.networks import describe_report

    disk, data = report["disk"], report["data_folder"]
    print(f"data folder:         {disk['path']}: {fmt_bytes(disk['free_bytes'])} free of {fmt_bytes(disk['total_bytes'])}"
          + (f"; UNDER the floor of {fmt_bytes(disk['floor_bytes'])} (disk_free_floor): new kernels and writes "
             "are refused" if disk["low"] else f" (floor {fmt_bytes(disk['floor_bytes'])})"))
    print("users' folders:      " + ("reachable by users' uids" if data["reachable_by_users"] else f"NOT reachable: {data['problem']}"))
    if data["earlier"]:
        print(f"earlier data folder: {'REFUSED: ' if data['refused'] else ''}{data['earlier']}")
    host = report["host"]
    print(f"running as uid {report['euid']}" + (" (root)" if host.get("root") else ""))
    print(f"switch uids:         {'yes' if host.get('setuid') else 'NO'}")
    print(f"create accounts:     {'yes' if host.get('accounts') else 'no'}")
    cg = host.get("cgroup") or {}
    print(f"cgroups:             v{cg.get('version')} controllers={','.join(cg.get('controllers') or [])} "
          f"writable={'yes' if cg.get('writable') else 'NO'}" if cg.get("version") else "cgroups:             NONE usable")
    print(f"network namespaces:  {'yes' if host.get('netns') else 'no'}")
    print(f"nftables:            {'yes' if host.get('nftables') else 'no'}"
          + (f" ({host['nftables_error']})" if host.get("nftables_error") else ""))
    print(f"ip forwarding:       {'on' if host.get('ip_forward') else 'off'}")
    print(f"no_new_privs:        {'yes' if host.get('no_new_privs') else 'no'}")
    print(f"mount isolation:     {'yes' if host.get('mount_namespace') else 'NO'} (mount namespace, private /tmp and /dev/shm)")
    print(f"pid isolation:       {'yes' if host.get('proc_hidepid') else 'NO'} (own /proc with hidepid=invisible)")
    print(f"cgroup namespaces:   {'yes' if host.get('cgroup_namespace') else 'NO'}")
    print(f"ipc namespaces:      {'yes' if host.get('ipc_namespace') else 'NO'}")
    print(f"own /sys:            {'yes' if host.get('private_sysfs') else 'NO'} (sysfs of the kernel's network namespace)")
    print(f"own /etc/passwd:     {'yes' if host.get('etc_overlay') else 'NO'} (an overlay on /etc)")
    print(f"seccomp:             {'yes' if host.get('seccomp') else 'NO'}"
          + (f" ({host['seccomp_error']})" if host.get("seccomp_error") else ""))
    inf = report["in_force"]
    print("in force:            " + ("sandbox (per-user uid, cgroup limits, private /tmp, /dev/shm, /proc, /sys, "
                                      "cgroup views, IPC and /etc/passwd, seccomp filter)" if inf.get("sandboxed")
                                     else f"NO ISOLATION: {inf.get('error') or '; '.join(inf.get('warnings', []))}"))
    print("network in force:    " + describe_report(report["network"]))
