"""kernelpool users: names, their Unix identities, folders and limits.

Each user gets a uid/gid from the configured range, stable across restarts (it is in the
store), and a real passwd entry when the host lets us create one. Callers: the CLI (add,
remove, set-limits) and the app at start-up (first user; folders of existing users).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
from dataclasses import dataclass
from typing import Any

from kernelpool.config import Settings, memory_limit
from kernelpool.errors import InvalidArgument, RemovalFailed, UserExists, UserNotFound
from kernelpool.store import Store, UserRow
from sandbox import Identity, Limits, accounts, prepare_dir
from sandbox.errors import SandboxError
from sandbox.folders import remove_tree
from sandbox.rundir import TMP, prepare_user_run, user_run_folder

log = logging.getLogger(__name__)

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument("user name", "use 1-31 characters: a lowercase letter, then lowercase letters, digits, '-' or '_'")
    return name


@dataclass(frozen=True)
class User:
    name: str
    uid: int  # from the store; names the user's runtime folders even without isolation
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
        rows = await self._store.list_users()
        for row in rows:
            # new, or removed and added again meanwhile (another uid): prepare it afresh
            if self._known.get(row.name) != row:
                self.prepare(row)
                self._known[row.name] = row
        for gone in set(self._known) - {row.name for row in rows}:
            del self._known[gone]

    def known(self, name: str) -> bool:
        return name in self._known

    async def ensure_known(self, name: str) -> None:
        """Read the users again if `name` is not known yet: added by the CLI since we last looked.
        Called for every tool call, before the tool runs."""
        if not self.known(name):
            await self.load()

    def owner(self, name: str) -> tuple[int | None, int | None]:
        """The uid/gid that files created for `name` belong to (None, None: the server's own)."""
        row = self._known.get(name)
        if not self.isolated or row is None:
            return None, None
        return row.uid, row.gid

    def folder(self, name: str) -> str:
        return str(self._settings.users_dir / name)

    def runtime_folder(self, uid: int) -> str:
        """The user's own temporary folder (TMPDIR of its kernels): RUN/<uid>/tmp."""
        return os.path.join(user_run_folder(str(self._settings.run_dir), uid), TMP)

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
        """Remove a user, all or nothing. Called by `kernelpool users remove`, also while a server runs.

        1. its tokens stop working (a mark in the store), so no agent starts anything meanwhile;
        2. every process of its uid is killed: its kernels, whichever server started them;
        3. its Unix account goes (the uid stays reserved by the row until the end);
        4. its runtime folder and, with `delete_files`, its own folder are deleted (fd-relative,
           no depth limit, no link followed);
        5. only then its row, tokens and limits are dropped.
        If a step fails, what was done is undone where it can be (the mark, the account), the
        row stays, and RemovalFailed says what happened and what to do: the same command, run
        again, carries on.
        """
        check_name(name)
        row = await self._store.get_user(name)
        if row is None:
            raise UserNotFound(name)
        identity = self._identity(row)
        again = f"Run `kernelpool users remove {name}{' --delete-files' if delete_files else ''}` again."
        await self._store.set_removing(name, True)
        try:
            await asyncio.to_thread(self._stop_processes, name, row)
        except SandboxError as exc:
            await self._store.set_removing(name, False)
            raise RemovalFailed(name, "stopping its kernels", str(exc), "Nothing was removed.",
                                "Stop the kernelpool server, then " + again[0].lower() + again[1:]) from None
        accounts_managed = identity is not None and accounts.can_manage_accounts()
        if accounts_managed:
            try:
                await asyncio.to_thread(accounts.remove_account, self._account_name(name), True)
            except SandboxError as exc:
                # userdel may have gone half way (user gone, group not): put the account back
                with contextlib.suppress(SandboxError, OSError):
                    await asyncio.to_thread(self.prepare, row)
                await self._store.set_removing(name, False)
                raise RemovalFailed(name, "removing its Unix account", str(exc),
                                    "Its kernels were stopped; nothing was removed.",
                                    "Fix the cause (see the message), then " + again[0].lower() + again[1:]) from None
        try:
            await asyncio.to_thread(self._delete_folders, name, row, delete_files)
        except (SandboxError, OSError) as exc:
            undo = ""
            try:
                # back as it was, but for what was deleted: account, folders (for the next kernels)
                await asyncio.to_thread(self.prepare, row)
            except (SandboxError, OSError) as again_exc:
                undo = f" Restoring its account and folders failed too ({again_exc}); the next server start does it."
            await self._store.set_removing(name, False)
            raise RemovalFailed(name, "deleting its files", str(exc),
                                "Its kernels were stopped and some of its files may be gone; the user still exists."
                                + undo, "Fix the cause (see the message), then " + again[0].lower() + again[1:]) from None
        if identity is not None:
            # a kernel a server was starting during the steps above (its request came in before
            # the mark) has no files and no account left: it goes too
            with contextlib.suppress(SandboxError):
                await asyncio.to_thread(accounts.kill_processes, row.uid)
        await self._store.remove_user(name)
        self._known.pop(name, None)

    def _stop_processes(self, name: str, row: UserRow) -> None:
        if self._identity(row) is not None:
            accounts.kill_processes(row.uid)
            return
        # without isolation kernels run as the server's own uid: they cannot be told apart by
        # uid, so a server with kernels of this user must be stopped first
        user_run = user_run_folder(str(self._settings.run_dir), row.uid)
        live = [n for n in (os.listdir(user_run) if os.path.isdir(user_run) else []) if n != TMP]
        if live:
            raise SandboxError(f"{len(live)} kernel(s) of {name!r} may be running (folders in {user_run}), and "
                               "without isolation they cannot be stopped from here", path=user_run)

    def _delete_folders(self, name: str, row: UserRow, delete_files: bool) -> None:
        if delete_files:
            remove_tree(str(self._settings.users_dir), name)
        remove_tree(str(self._settings.run_dir), str(row.uid))
        remove_tree(str(self._settings.run_dir), name)  # the runtime folder of versions before 2026-11-27

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
            if key.endswith("memory"):
                memory_limit(value)  # refused here, not at the next kernel start; stored as written
            limits[key] = value
        await self._store.set_user_limits(name, limits)
        return limits

    def prepare(self, row: UserRow) -> None:
        """Create the user's account (where isolated) and folders, owned by the user's uid."""
        identity = self._identity(row)
        if identity is not None and accounts.can_manage_accounts():
            self._adopt_account(identity)
            accounts.ensure_account(identity)
        uid = identity.uid if identity else None
        gid = identity.gid if identity else None
        for parent in (self._settings.data_dir, self._settings.users_dir, self._settings.run_dir):
            # traversable by every user's uid, listable by none of them
            prepare_dir(str(parent), None, None, mode=0o711)
        prepare_dir(self.folder(row.name), uid, gid)
        # RUN/<uid>: root's, for the kernels' connection files and sockets (sandbox.rundir)
        prepare_user_run(str(self._settings.run_dir), row.uid, gid, (uid, gid) if uid is not None and gid is not None else None)

    def clean_runtime(self) -> int:
        """At start-up, before any kernel runs: empty the runtime folder (DATA/run). What is there
        was left by an earlier server, maybe of an older version with another layout; `load`
        recreates each user's folder. Returns how many entries were removed."""
        removed = 0
        try:
            entries = list(os.scandir(self._settings.run_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                # by descriptor, with no depth limit, never following a link a kernel may have planted
                remove_tree(str(self._settings.run_dir), entry.name)
                removed += 1
            except (OSError, SandboxError) as exc:
                log.warning("cannot remove %s left by an earlier server: %s", entry.path, exc)
        self._known.clear()  # every user's runtime folder must be made again
        return removed

    def _adopt_account(self, identity: Identity) -> None:
        # an account an earlier server made for this user under another name (an older version's
        # naming, or another account_prefix): it holds our uid and our user's folder as its home
        try:
            old = pwd.getpwuid(identity.uid)
        except KeyError:
            return
        if old.pw_name != identity.name and os.path.realpath(old.pw_dir) == os.path.realpath(identity.home):
            log.info("replacing account %s (uid %d) of an earlier kernelpool with %s", old.pw_name, identity.uid, identity.name)
            accounts.remove_account(old.pw_name)

    def _account_name(self, name: str) -> str:
        return f"{self._settings.account_prefix}{name}"

    def _identity(self, row: UserRow) -> Identity | None:
        if not self.isolated:
            return None
        return Identity(name=self._account_name(row.name), uid=row.uid, gid=row.gid, home=self.folder(row.name))

    def _user(self, row: UserRow) -> User:
        s, o = self._settings, row.limits

        def pick(key: str) -> Any:
            # an override is stored as written ("512M", "none"); the settings' memory is bytes already
            if key.endswith("memory") and key in o:
                return memory_limit(o[key])
            return o.get(key, getattr(s, key))

        return User(
            name=row.name,
            uid=row.uid,
            identity=self._identity(row),
            kernel_limits=Limits(pick("kernel_memory"), pick("kernel_cpus"), pick("kernel_pids")),
            user_limits=Limits(pick("user_memory"), pick("user_cpus"), pick("user_pids")),
        )

    async def _free_uid(self) -> int:
        used = await self._store.used_uids()
        for uid in range(self._settings.uid_min, self._settings.uid_max + 1):
            # a uid (or gid) that the host already gives to someone else is not ours to hand out
            if uid not in used and not accounts.id_in_use(uid):
                return uid
        raise InvalidArgument("uid range", f"no free uid left in {self._settings.uid_min}-{self._settings.uid_max}")
