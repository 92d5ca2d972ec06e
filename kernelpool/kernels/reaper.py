"""Reaping what a server that died without cleaning up left behind: its kernels (by the rows it
recorded), their runtime folders and cgroups. Called once at start-up (`KernelRegistry.reap_leftovers`),
before any kernel of this server runs.
"""

from __future__ import annotations

import contextlib
import logging
import os

from kernelpool.store import KernelRow, Store
from sandbox import CgroupBackend
from sandbox.fs import remove_tree
from sandbox.rundir import TMP, remove_kernel_folder

log = logging.getLogger(__name__)


async def reap_leftovers(store: Store, cgroups: CgroupBackend | None, run_dir: str) -> int:
    """Kill the recorded kernels that still run, remove their folders and every cgroup below our
    prefix; returns how many kernels, folders and cgroups went."""
    reaped = 0
    for row in await store.list_kernels():
        _reap_row(row, cgroups, run_dir)
        await store.remove_kernel(row.id)
        reaped += 1
    # kernel folders that no row names (a crash between creating one and recording it)
    for user_run in _user_run_folders(run_dir):
        for name in os.listdir(user_run):
            if name != TMP:
                with contextlib.suppress(Exception):
                    remove_tree(user_run, name)
                    reaped += 1
    if cgroups is not None:
        reaped += _remove_cgroups(cgroups)
    return reaped


def _reap_row(row: KernelRow, cgroups: CgroupBackend | None, run_dir: str) -> None:
    import psutil

    if row.pid:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            proc = psutil.Process(row.pid)
            cmdline = " ".join(proc.cmdline())  # a forked kernel shows its zygote's
            if ("ipykernel" in cmdline or "kernelpool.kernels.zygote.child" in cmdline) and abs(proc.create_time() - row.started_at) < 120:
                os.killpg(row.pid, 9)
    if row.cgroup and cgroups is not None:
        cg = cgroups.get(row.cgroup)
        if cg is not None:
            with contextlib.suppress(Exception):
                cg.remove()
    if row.connection_file:
        # its folder of root's; files of older versions in a user's own folder are left
        # alone (the root server does not touch paths a user can change)
        try:
            remove_kernel_folder(run_dir, row.connection_file)
        except Exception as exc:
            log.warning("kernel %s: removing its runtime folder: %s", row.id, exc)


def _remove_cgroups(cgroups: CgroupBackend) -> int:
    # no kernel of ours runs yet, so everything below our prefix is left over: cgroups no row
    # names (a crash between creating one and recording it), and whatever layout an older
    # version used (other names, other depths). Processes in them are killed.
    root = cgroups.get("")
    if root is None:
        return 0
    stale = [d for top in root.directories() for d, _, _ in os.walk(top) if d != top]
    try:
        root.remove()
    except Exception as exc:
        log.warning("removing leftover cgroups: %s", exc)
        return 0
    return len(stale)


def _user_run_folders(run_dir: str) -> list[str]:
    """RUN/<uid> folders (root's: listing them follows nothing a tenant made)."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return [os.path.join(run_dir, n) for n in names if n.isdigit() and not os.path.islink(os.path.join(run_dir, n))]
