"""kernelpool users: names, their Unix identities, folders and limits.

Each user gets a uid/gid from the configured range, stable across restarts (it is in the
store), and a real passwd entry when the host lets us create one. Callers: the CLI (add,
remove, set-limits) and the app at start-up (first user; folders of existing users).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
from dataclasses import dataclass
from typing import Any

from kernelpool.config import Settings, memory_limit
from kernelpool.errors import InvalidArgument, UserNotFound
from kernelpool.store import Store, UserRow
from kernelpool.users.removal import UserRemoval
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
    def __init__(self, settings: Settings, store: Store, *, isolated: bool) -> None:
        self._settings = settings
        self._store = store
        self.isolated = isolated
        self._known: dict[str, UserRow] = {}
        self.removing: set[str] = set()  # users that `users remove` marked, as of the last load

    async def load(self) -> None:
        """Read every user from the store and prepare the new ones (called at start-up and
        periodically). Users being removed are left out: preparing one would bring back the
        account and folders that `users remove` is taking away."""
        removing = self.removing = await self._store.removing()
        rows = [row for row in await self._store.list_users() if row.name not in removing and self.here(row)]
        for row in rows:
            # new, or removed and added again meanwhile (another uid): prepare it afresh
            if self._known.get(row.name) != row:
                self.prepare(row)
                self._known[row.name] = row
        for gone in set(self._known) - {row.name for row in rows}:
            del self._known[gone]

    def here(self, row: UserRow) -> bool:
        """Whether the user lives on this server: always on a single node; among replicas, when
        this replica is its home (the others keep no account, folder or kernel of it)."""
        return self._settings.replica is None or row.home == self._settings.replica

    def known(self, name: str) -> bool:
        return name in self._known

    def current(self) -> dict[str, int]:
        """Name -> uid of the users as last loaded (the server drops the kernels of any other)."""
        return {name: row.uid for name, row in self._known.items()}

    def forget(self, name: str) -> None:
        self._known.pop(name, None)

    async def ensure_known(self, name: str, uid: int | None = None) -> None:
        """Read the users again if `name` is not known yet (added by the CLI since we last looked),
        or is known with another uid than its token's (removed and added again). Called for every
        tool call, before the tool runs."""
        row = self._known.get(name)
        if row is None or (uid is not None and row.uid != uid):
            await self.load()

    async def admits(self, user: User) -> bool:
        """Whether `user` still exists, as this uid, and is not being removed. The kernel registry
        asks once a kernel of theirs runs: `users remove` may have begun before it started."""
        return await self._store.admits(user.name, user.uid)

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

    async def add(self, name: str, home: str | None = None) -> UserRow:
        """Add a user with a uid never given before (and a Unix account named so that no name is
        given twice either: `account_name`), living on replica `home` (None: a single node). Called
        by `kernelpool users add` and at first start."""
        check_name(name)
        uids = (self._settings.uid_min, self._settings.uid_max)
        row = await self._store.add_user(name, uids, self._folder_owners_floor(), accounts.id_in_use, home)
        if not self.here(row):
            return row  # its home replica makes its account and folder (replicas.service)
        try:
            self.prepare(row)
        except Exception:
            identity = self.identity(row)
            if identity is not None and accounts.can_manage_accounts() and _uid_of(identity.name) == row.uid:
                with contextlib.suppress(SandboxError):
                    accounts.remove_account(identity.name)  # made here with a uid given just now: ours alone
            await self._store.discard_user(name)
            raise
        self._known[name] = row
        return row

    async def remove(self, name: str, *, delete_files: bool = False) -> None:
        """Remove a user, all or nothing (`kernelpool.users.removal.UserRemoval.run`). Called by
        `kernelpool users remove`, also while a server runs."""
        check_name(name)
        row = await self._store.get_user(name)
        if row is not None and not self.here(row):
            raise InvalidArgument("replica", f"user {name!r} lives on replica {row.home!r}, whose host runs its kernels "
                                  f"and keeps its files: run this command there")
        await UserRemoval(self._settings, self._store, self).run(name, delete_files=delete_files)

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
        identity = self.identity(row)
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

    def account_name(self, row: UserRow) -> str:
        """The user's Unix account: `<account_prefix><name>` for the first account a name gets (as
        before tombstones existed, so existing accounts keep their names), and
        `<account_prefix><uid>-<name>` (cut to 32 characters) for a name added again after a
        removal. A user name starts with a letter, so the second form is never the first form of
        another name, and the uid, never given twice, makes it unique."""
        prefix = self._settings.account_prefix
        return f"{prefix}{row.uid}-{row.name}"[:32] if row.reissued else f"{prefix}{row.name}"

    def identity(self, row: UserRow) -> Identity | None:
        if not self.isolated:
            return None
        return Identity(name=self.account_name(row), uid=row.uid, gid=row.gid, home=self.folder(row.name))

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
            identity=self.identity(row),
            kernel_limits=Limits(pick("kernel_memory"), pick("kernel_cpus"), pick("kernel_pids")),
            user_limits=Limits(pick("user_memory"), pick("user_cpus"), pick("user_pids")),
        )

    def _folder_owners_floor(self) -> int:
        """The highest uid in our range that owns a folder in DATA/users, else 0. A database from
        before uids were never given twice does not know the uids of the users it removed; those
        whose files were kept still own them, and new uids go above them."""
        floor = 0
        try:
            entries = list(os.scandir(self._settings.users_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                owner = entry.stat(follow_symlinks=False).st_uid
            except OSError:
                continue
            if self._settings.uid_min <= owner <= self._settings.uid_max:
                floor = max(floor, owner)
        return floor


def _uid_of(account: str) -> int | None:
    try:
        return pwd.getpwnam(account).pw_uid
    except KeyError:
        return None
