"""`kernelpool users ...`: add, list, move, remove, login-link, set-admin, set-limits. Callers:
`kernelpool.cli.main`."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from kernelpool.commands.common import LIMIT_OPTIONS, _err, _with_store
from kernelpool.config import Settings
from kernelpool.replicas import commands as replicas
from kernelpool.users import admins

if TYPE_CHECKING:  # imported where they are used: `kernelpool --help` stays quick
    from kernelpool.store import Store
    from kernelpool.users.accounts import UserService


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
