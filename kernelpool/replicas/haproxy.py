"""HAProxy's maps, kept current through its runtime API (no reload, no proxy of our own).

HAProxy routes each request by the user key in its token (`users.map`: key -> replica) and,
for tokens minted before keys existed, by the token's id (`tokens.map`: id -> replica); see
deploy/compose/haproxy.cfg. `MapSync.sync` reads what the maps should hold from the store and
sends HAProxy the differences (`set map`, `add map`, `del map`). Every replica runs it when a
user is placed or moved (a HOMES announcement) and every few seconds, so a restarted HAProxy,
whose maps start from the files it was given, is brought up to date within seconds; the CLI runs
it once after placing or moving a user, so the route exists when the command returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from dataclasses import dataclass

from kernelpool.store import Store

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[A-Za-z0-9-]+")  # keys (hex), token ids (hex) and replica names: nothing HAProxy parses
_BATCH = 50  # commands per connection (HAProxy reads one line; its buffer is 16 kB)


class RuntimeAPIError(Exception):
    pass


@dataclass(frozen=True)
class RuntimeAPI:
    """One HAProxy's runtime API: `HOST:PORT` (a `stats socket ipv4@...`) or a unix socket path."""

    address: str
    timeout: float = 5.0

    async def run(self, commands: list[str]) -> str:
        """Send commands (one connection, `;`-separated, non-interactive); HAProxy's answer."""
        for command in commands:
            if "\n" in command or ";" in command:
                raise ValueError(f"not one runtime API command: {command!r}")
        if self.address.startswith("/"):
            opened = asyncio.open_unix_connection(self.address)
        else:
            host, _, port = self.address.rpartition(":")
            opened = asyncio.open_connection(host.strip("[]"), int(port))
        reader, writer = await asyncio.wait_for(opened, self.timeout)
        try:
            writer.write(("; ".join(commands) + "\n").encode())
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), self.timeout)).decode(errors="replace")
        finally:
            writer.close()

    async def show_map(self, path: str) -> dict[str, str]:
        entries: dict[str, str] = {}
        answer = await self.run([f"show map {path}"])
        for line in answer.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0].startswith("0x"):
                entries[parts[1]] = parts[2]
            elif line.strip() and not parts[0].startswith("0x"):
                raise RuntimeAPIError(f"HAProxy at {self.address}: show map {path}: {line.strip()}")
        return entries

    async def apply(self, path: str, want: dict[str, str]) -> int:
        """Make the map at `path` hold exactly `want`; returns how many entries changed."""
        have = await self.show_map(path)
        commands = [f"del map {path} {k}" for k in have if k not in want]
        for key, value in want.items():
            if not (_SAFE.fullmatch(key) and _SAFE.fullmatch(value)):
                log.error("not put in HAProxy's map: %r -> %r", key, value)
            elif key not in have:
                commands.append(f"add map {path} {key} {value}")
            elif have[key] != value:
                commands.append(f"set map {path} {key} {value}")
        for start in range(0, len(commands), _BATCH):
            answer = (await self.run(commands[start:start + _BATCH])).strip()
            if answer:
                raise RuntimeAPIError(f"HAProxy at {self.address}: {answer[:300]}")
        return len(commands)


class MapSync:
    """`users.map` and `tokens.map` of every HAProxy in `addresses`, from the store."""

    def __init__(self, store: Store, addresses: list[str], folder: str) -> None:
        self._store = store
        self.addresses = addresses
        self.users_map = os.path.join(folder, "users.map")
        self.tokens_map = os.path.join(folder, "tokens.map")
        self.failing: dict[str, str] = {}  # address -> why its last sync failed

    async def apis(self) -> list[RuntimeAPI]:
        """One runtime API per HAProxy: a HOST:PORT whose name resolves to several addresses (a
        headless Service in front of several HAProxy pods) is each of them."""
        found: list[RuntimeAPI] = []
        for address in self.addresses:
            host, _, port = address.rpartition(":")
            if address.startswith("/") or not host:
                found.append(RuntimeAPI(address))
                continue
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                self.failing[address] = f"cannot resolve {host}: {exc}"
                continue
            ips = sorted({str(info[4][0]) for info in infos})
            found += [RuntimeAPI(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}") for ip in ips]
        return found

    async def wanted(self) -> tuple[dict[str, str], dict[str, str]]:
        """(user key -> home, token id -> home of its user for live tokens without a key)."""
        users = await self._store.rows("SELECT ukey, home FROM users WHERE ukey IS NOT NULL AND home IS NOT NULL")
        tokens = await self._store.rows(
            "SELECT t.id, u.home FROM tokens t JOIN users u ON u.name = t.user WHERE t.keyed = 0 AND u.home IS NOT NULL"
            " AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > ?)", time.time())
        return {k: h for k, h in users}, {t: h for t, h in tokens}

    async def sync(self) -> int:
        """Bring every HAProxy's maps to what the store says; how many entries changed. An HAProxy
        that cannot be reached is logged (once while it fails) and tried again next time."""
        users, tokens = await self.wanted()
        changed = 0
        for api in await self.apis():
            try:
                changed += await api.apply(self.users_map, users) + await api.apply(self.tokens_map, tokens)
            except (OSError, TimeoutError, RuntimeAPIError) as exc:
                if api.address not in self.failing:
                    log.warning("HAProxy at %s: its maps cannot be updated: %s", api.address, exc)
                self.failing[api.address] = str(exc) or type(exc).__name__
                continue
            if self.failing.pop(api.address, None) is not None:
                log.warning("HAProxy at %s: its maps are updated again", api.address)
        return changed
