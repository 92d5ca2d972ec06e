"""kernelpool users: names, their Unix identities, folders and limits.

Each user gets a uid/gid from the configured range, stable across restarts (it is in the
store), and a real passwd entry when the host lets us create one. Callers: the CLI (add,
remove, set-limits) and the app at start-up (first user; folders of existing users).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from typing import Any

from kernelpool.config import Settings
from kernelpool.errors import InvalidArgument, UserExists, UserNotFound
from kernelpool.store import Store, UserRow
from sandbox import Identity, Limits, accounts, parse_memory, prepare_dir

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument("user name", "use 1-31 characters: a lowercase letter, then lowercase letters, digits, '-' or '_'")
    return name


@dataclass(frozen=True)
class User:
    name: str
    identity: Identity | None  # None when the server runs kernels as itself (--insecure-no-sandbox)
    kernel_limits: Limits
    user_limits: Limits


class UserService:
    def __init__(self, settings: Settings, store: Store, isolated: bool) -> None:
        self._settings = settings
        self._store = store
        self.isolated = isolated
        self._known: dict[str, UserRow] = {}

    async def load(self) -> None:
        """Read every user from the store and prepare the new ones (called at start-up and periodically)."""
        for row in await self._store.list_users():
            if row.name not in self._known:
                self.prepare(row)
                self._known[row.name] = row

    def known(self, name: str) -> bool:
        return name in self._known

    def owner(self, name: str) -> tuple[int | None, int | None]:
        """The uid/gid that files created for `name` belong to (None, None: the server's own)."""
        row = self._known.get(name)
        if not self.isolated or row is None:
            return None, None
        return row.uid, row.gid

    def folder(self, name: str) -> str:
        return str(self._settings.users_dir / name)

    def runtime_folder(self, name: str) -> str:
        return str(self._settings.run_dir / name)

    async def add(self, name: str) -> UserRow:
        check_name(name)
        if await self._store.get_user(name) is not None:
            raise UserExists(name)
        uid = await self._free_uid()
        row = await self._store.add_user(name, uid, uid)
        try:
            self.prepare(row)
        except Exception:
            await self._store.remove_user(name)
            raise
        self._known[name] = row
        return row

    async def remove(self, name: str, delete_files: bool = False) -> None:
        if not await self._store.remove_user(name):
            raise UserNotFound(name)
        self._known.pop(name, None)
        if self.isolated and accounts.can_manage_accounts():
            accounts.remove_account(self._account_name(name))
        shutil.rmtree(self.runtime_folder(name), ignore_errors=True)
        if delete_files:
            shutil.rmtree(self.folder(name), ignore_errors=True)

    async def get(self, name: str) -> User:
        row = await self._store.get_user(name)
        if row is None:
            raise UserNotFound(name)
        return self._user(row)

    async def set_limits(self, name: str, **given: Any) -> dict[str, Any]:
        """Per-user overrides: kernel_memory, kernel_cpus, kernel_pids, user_memory, user_cpus, user_pids."""
        row = await self._store.get_user(name)
        if row is None:
            raise UserNotFound(name)
        limits = dict(row.limits)
        for key, value in given.items():
            if value is None:
                continue
            if key.endswith("memory") and str(value).lower() not in ("none", "max"):
                parse_memory(str(value))
            limits[key] = value
        await self._store.set_user_limits(name, limits)
        return limits

    def prepare(self, row: UserRow) -> None:
        """Create the user's account (where isolated) and folders, owned by the user's uid."""
        identity = self._identity(row)
        if identity is not None and accounts.can_manage_accounts():
            accounts.ensure_account(identity)
        uid = identity.uid if identity else None
        gid = identity.gid if identity else None
        for parent in (self._settings.data_dir, self._settings.users_dir, self._settings.run_dir):
            # traversable by every user's uid, listable by none of them
            prepare_dir(str(parent), None, None, mode=0o711)
        prepare_dir(self.folder(row.name), uid, gid)
        prepare_dir(self.runtime_folder(row.name), uid, gid)

    def _account_name(self, name: str) -> str:
        return f"{self._settings.account_prefix}{name}"

    def _identity(self, row: UserRow) -> Identity | None:
        if not self.isolated:
            return None
        return Identity(name=self._account_name(row.name), uid=row.uid, gid=row.gid, home=self.folder(row.name))

    def _user(self, row: UserRow) -> User:
        s, o = self._settings, row.limits

        def pick(key: str) -> Any:
            return o.get(key, getattr(s, key))

        def mem(value: Any) -> int | None:
            return None if value is None or str(value).lower() in ("none", "max") else parse_memory(str(value))

        return User(
            name=row.name,
            identity=self._identity(row),
            kernel_limits=Limits(mem(pick("kernel_memory")), pick("kernel_cpus"), pick("kernel_pids")),
            user_limits=Limits(mem(pick("user_memory")), pick("user_cpus"), pick("user_pids")),
        )

    async def _free_uid(self) -> int:
        used = await self._store.used_uids()
        for uid in range(self._settings.uid_min, self._settings.uid_max + 1):
            # a uid (or gid) that the host already gives to someone else is not ours to hand out
            if uid not in used and not accounts.id_in_use(uid):
                return uid
        raise InvalidArgument("uid range", f"no free uid left in {self._settings.uid_min}-{self._settings.uid_max}")
