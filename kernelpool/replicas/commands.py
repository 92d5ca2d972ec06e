"""The CLI's commands for several replicas: where `users add` places a user, `users move`, and
`kernelpool replicas`. Called by `kernelpool.cli` (which parses the arguments) with an open store;
what they print follows the CLI's rule: a secret alone on stdout, everything else on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kernelpool.config import Settings
from kernelpool.errors import InvalidArgument
from kernelpool.replicas.haproxy import MapSync
from kernelpool.replicas.moves import FAILED, Moves
from kernelpool.replicas.registry import Replicas
from kernelpool.store import Store


def add_arguments(users: Any, sub: Any, command: Any) -> None:
    """`users move`, `replicas`, and `users add --replica` (`users` holds the `users` actions)."""
    p = command(users, "move", "move a user to another replica: stop its kernels, close its sessions, copy its folder, route it there")
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="REPLICA", help="the replica to move to (a running one)")
    p.add_argument("--wait", type=float, default=600.0, metavar="SECONDS", help="how long to wait for the move (default 600)")
    command(sub, "replicas", "list the replicas: running or not, users placed on each, kernels")


def _err(text: str) -> None:
    print(text, file=sys.stderr)


async def place(settings: Settings, store: Store, given: str | None) -> str | None:
    """The home of a user being added: None on a single node; among replicas, `given` (checked)
    or the least loaded running replica."""
    if not settings.database_url:
        if given is not None:
            raise InvalidArgument("--replica", "replicas need database_url (a PostgreSQL store shared by them)")
        return None
    return await Replicas(store, settings.replica_timeout).place(given)


async def route(settings: Settings, store: Store) -> None:
    """Bring HAProxy's maps up to date now, when this command can reach HAProxy (the replicas do it
    too, within seconds): so a user placed or moved is routed when the command returns."""
    if settings.haproxy_admin:
        maps = MapSync(store, settings.haproxy_admin, settings.haproxy_maps)
        await maps.sync()
        for address, why in maps.failing.items():
            _err(f"kernelpool: HAProxy at {address} was not updated ({why}); the replicas retry every few seconds")


async def move(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    if not settings.database_url:
        raise InvalidArgument("move", "moving users needs replicas (database_url and replica set)")
    target = await Replicas(store, settings.replica_timeout).place(args.to)
    moves = Moves(store)
    asked = await moves.request(args.name, target)
    if asked.source:
        _err(f"moving {args.name} from {asked.source} to {target}: its kernels stop and its sessions close ...")
    started = time.monotonic()
    row = await moves.wait(args.name, asked.started_at, args.wait) if asked.source else asked
    if row is None:
        now = await moves.get(args.name)
        state = now.state if now else "unknown"
        _err(f"kernelpool: the move of {args.name} is not done after {args.wait:g} s (state {state}); it goes on "
             f"as soon as {asked.source if state == 'draining' else target} runs; see `kernelpool replicas`")
        return 2
    if row.state == FAILED:
        _err(f"kernelpool: moving {args.name} failed: {row.error}. It stays on {asked.source}, files and all.")
        return 2
    await route(settings, store)
    size = f", {row.bytes} bytes copied" if row.bytes is not None else ""
    _err(f"moved {args.name} to {target} in {time.monotonic() - started:.1f} s{size}")
    return 0


async def list_replicas(settings: Settings, store: Store) -> int:
    if not settings.database_url:
        _err("kernelpool: a single node (no database_url): no replicas")
        return 0
    now = time.time()
    for r in await Replicas(store, settings.replica_timeout).all():
        state = "running" if r.running else "NOT RUNNING"
        print(f"{r.name}\t{state}\tusers={r.users}\tkernels={r.kernels}\tseen={now - r.seen_at:.0f}s ago")
    for m in await Moves(store).all():
        print(f"move\t{m.user}\t{m.source} -> {m.target}\t{m.state}" + (f"\t{m.error}" if m.error else ""))
    return 0
