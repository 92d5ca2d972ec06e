"""`kernelpool tokens ...` (create, list, revoke; OAuth grants too) and `kernelpool audit`.
Callers: `kernelpool.cli.main`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import TYPE_CHECKING

from kernelpool.commands.common import _err, _with_store
from kernelpool.config import Settings

if TYPE_CHECKING:  # imported where they are used: `kernelpool --help` stays quick
    from kernelpool.store import Store
    from kernelpool.users.accounts import UserService


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
