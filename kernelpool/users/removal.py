"""Removing a user so that nothing of theirs outlives it: `kernelpool users remove`.

Runs in the CLI's process, also while a server runs kernels of the user. So everything is found
by the user's uid and by the names a server gives, never from a server's memory: the cgroups
`<cgroup_prefix>/u<uid>` below whatever cgroup the server runs in (`sandbox.cgroupkill.find_trees`),
every task of the uid (`sandbox.tasks`, thread by thread), its System V IPC objects
(`sandbox.ipc`), its network namespace `<network_prefix>-<uid>` with its host link
`<network_prefix><uid>` and firewall set element (`sandbox.network`). A running server notices
the removal at its next user reload and drops its records of the user's kernels
(`kernelpool.kernels.registry.KernelRegistry.forget_removed`); a kernel it was starting meanwhile
is stopped by the server itself (`UserService.admits`) or by the second sweep here. The uid and
the Unix account name are never given again (`kernelpool.store.Store.remove_user`). Called by
`UserService.remove`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from ipaddress import IPv4Network
from typing import Protocol

from kernelpool.config import Settings
from kernelpool.errors import RemovalFailed, UserNotFound
from kernelpool.store import Store, UserRow
from sandbox import Identity, accounts, cgroupkill, ipc, tasks
from sandbox.errors import SandboxError
from sandbox.folders import remove_tree
from sandbox.netplan import NetworkPlan
from sandbox.network import UserNetworks
from sandbox.rundir import TMP, user_run_folder

log = logging.getLogger(__name__)

KILL_WAIT = 5.0  # seconds each way of ending tasks (cgroups, then uid) may take before the removal stops


class Accounts(Protocol):
    """What a removal asks of the users service (`kernelpool.users.accounts.UserService`, its
    caller): named here so that this module does not import the one that imports it."""

    def identity(self, row: UserRow) -> Identity | None: ...

    def account_name(self, row: UserRow) -> str: ...

    def forget(self, name: str) -> None: ...

    def prepare(self, row: UserRow) -> None: ...


class UserRemoval:
    """One `users remove`: `await UserRemoval(settings, store, users).run(name, delete_files)`."""

    def __init__(self, settings: Settings, store: Store, users: Accounts) -> None:
        self._settings = settings
        self._store = store
        self._users = users

    async def run(self, name: str, *, delete_files: bool) -> None:
        """Remove a user, all or nothing.

        1. its tokens stop working (a mark in the store), so no agent starts anything meanwhile;
        2. every task of its uid ends: its cgroups are frozen and killed, then whatever of the uid
           /proc still shows; if a task is still alive after that, the removal stops here and
           names it. Then its cgroups, network namespace and IPC objects go;
        3. its Unix account goes (the uid stays reserved by the row until the end);
        4. its runtime folder and, with `delete_files`, its own folder are deleted (fd-relative,
           no depth limit, no link followed);
        5. step 2 again, for a kernel a server was starting while this ran;
        6. only then its row, tokens and limits are dropped; its name, uid and account are kept
           among the removed, and neither uid nor account name is given again.
        If a step fails, what was done is undone where it can be (the mark, the account), the row
        stays, and RemovalFailed says what happened and what to do: the same command, run again,
        carries on.
        """
        row = await self._store.get_user(name)
        if row is None:
            raise UserNotFound(name)
        isolated = self._users.identity(row) is not None
        again = f"run `kernelpool users remove {name}{' --delete-files' if delete_files else ''}` again."
        await self._store.set_removing(name, removing=True)
        try:
            await asyncio.to_thread(self._stop, name, row)
        except tasks.TasksRemain as exc:
            await self._store.set_removing(name, removing=False)
            raise RemovalFailed(name, "stopping its processes", str(exc), "Its other processes were killed; nothing was "
                                "removed.", "Find out why those tasks cannot end (state D: a task waiting inside the "
                                "kernel, often on a file system or device that does not answer), then " + again) from None
        except SandboxError as exc:
            await self._store.set_removing(name, removing=False)
            state = "Its processes were stopped; the user still exists." if isolated else "Nothing was removed."
            advice = "Fix the cause (see the message), then " if isolated else "Stop the kernelpool server, then "
            raise RemovalFailed(name, "stopping its processes", str(exc), state, advice + again) from None
        account = self._users.account_name(row) if isolated else None
        if account is not None and accounts.can_manage_accounts():
            await self._remove_account(name, row, account, again)
        await self._delete_folders(name, row, again, delete_files=delete_files)
        if isolated:
            try:
                # a kernel a server was starting during the steps above (its request came in
                # before the mark) has no files and no account left: it goes too
                await asyncio.to_thread(self.sweep, row.uid)
            except SandboxError as exc:
                raise RemovalFailed(name, "stopping a kernel started meanwhile", str(exc), "Its account and files are "
                                    "gone; its tokens stay refused.", "Fix the cause, then " + again) from None
        await self._store.remove_user(name, account)
        self._users.forget(name)

    async def _remove_account(self, name: str, row: UserRow, account: str, again: str) -> None:
        try:
            await asyncio.to_thread(functools.partial(accounts.remove_account, account, force=True))
        except SandboxError as exc:
            # userdel may have gone half way (user gone, group not): put the account back
            with contextlib.suppress(SandboxError, OSError):
                await asyncio.to_thread(self._users.prepare, row)
            await self._store.set_removing(name, removing=False)
            raise RemovalFailed(name, "removing its Unix account", str(exc), "Its kernels were stopped; nothing was "
                                "removed.", "Fix the cause (see the message), then " + again) from None

    async def _delete_folders(self, name: str, row: UserRow, again: str, *, delete_files: bool) -> None:
        try:
            await asyncio.to_thread(functools.partial(self._remove_folders, name, row, delete_files=delete_files))
        except (SandboxError, OSError) as exc:
            undo = ""
            try:
                # back as it was, but for what was deleted: account, folders (for the next kernels)
                await asyncio.to_thread(self._users.prepare, row)
            except (SandboxError, OSError) as again_exc:
                undo = f" Restoring its account and folders failed too ({again_exc}); the next server start does it."
            await self._store.set_removing(name, removing=False)
            raise RemovalFailed(name, "deleting its files", str(exc), "Its kernels were stopped and some of its files "
                                "may be gone; the user still exists." + undo, "Fix the cause (see the message), then "
                                + again) from None

    def _stop(self, name: str, row: UserRow) -> None:
        if self._users.identity(row) is not None:
            self.sweep(row.uid)
            return
        # without isolation kernels run as the server's own uid: they cannot be told apart by
        # uid, so a server with kernels of this user must be stopped first
        user_run = user_run_folder(str(self._settings.run_dir), row.uid)
        live = [n for n in (os.listdir(user_run) if os.path.isdir(user_run) else []) if n != TMP]
        if live:
            raise SandboxError(f"{len(live)} kernel(s) of {name!r} may be running (folders in {user_run}), and "
                               "without isolation they cannot be stopped from here", path=user_run)

    def sweep(self, uid: int) -> None:
        """End every task of `uid` and confirm that none is left (raises TasksRemain if one is),
        then remove its cgroups, System V IPC objects and network namespace. Blocking."""
        trees = cgroupkill.find_trees(self._settings.cgroup_prefix, f"u{uid}")
        try:
            # frozen and killed: forks, a main thread that exited, a stopped process, none of it helps
            cgroupkill.kill_trees(trees, timeout=KILL_WAIT)
        except SandboxError as exc:
            log.warning("uid %d: %s; ending its tasks one by one", uid, exc)
        tasks.kill_tasks(uid, timeout=KILL_WAIT)  # whatever of the uid is not in those cgroups
        left = tasks.live_tasks(uid)
        if left:
            raise tasks.TasksRemain(uid, left, KILL_WAIT)
        cgroupkill.remove_trees(trees)
        removed = ipc.remove_owned_by(uid)
        if removed:
            log.info("uid %d: removed %d System V IPC object(s)", uid, removed)
        self._remove_network(uid)

    def _remove_network(self, uid: int) -> None:
        # the names depend on network_prefix only; 'egress' takes down the link and set element too,
        # whichever mode the server ran in (the `serve` option may differ from this command's)
        plan = NetworkPlan(mode="egress", prefix=self._settings.network_prefix,
                           addresses=IPv4Network(self._settings.kernel_network_range))
        nets = UserNetworks(plan)
        if nets.present(uid):
            nets.remove(uid)

    def _remove_folders(self, name: str, row: UserRow, *, delete_files: bool) -> None:
        if delete_files:
            remove_tree(str(self._settings.users_dir), name)
        remove_tree(str(self._settings.run_dir), str(row.uid))
        remove_tree(str(self._settings.run_dir), name)  # the runtime folder of versions before 2026-11-27
