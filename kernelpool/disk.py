"""The data folder on disk: an earlier version's folder that the default leaves aside, and free space.

`check_earlier_data_dir`: before 2026-12 the data folder's default was ./kernelpool-data, below
the folder the server started in, also as root; now it is /var/lib/kernelpool as root. Whoever
upgrades and starts the same way must not find an empty server with a new token beside their old
data: the CLI refuses while the new folder is empty, and says where the old one is and how to
move or keep it. Callers: `kernelpool serve`, the CLI's commands that open the database, `doctor`.

`DiskSpace`: the server's own writes (notebooks, new kernels' files) are refused while free space
is under `disk_free_floor`, with an error that says so, rather than started and left half-written.
Kernels write to the same filesystem on their own and can still fill it; a write of the
server's that fails anyway leaves the previous file in place (writes are atomic). Callers: the
notebook service and the kernel registry (before each write or start), `/healthz` and `doctor`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelpool.config import LEGACY_DATA_DIR, Settings
from kernelpool.errors import DiskLow, EarlierDataDir
from kernelpool.kernels.isolation import data_dir_unreachable


def earlier_data_dir(settings: Settings) -> Path | None:
    """./kernelpool-data when it holds an earlier version's database and is not the data folder,
    which was left at its default; else None."""
    if settings.given("data_dir"):
        return None
    try:
        old = Path.cwd() / LEGACY_DATA_DIR
    except OSError:  # the working folder was deleted
        return None
    if not (old / "kernelpool.db").is_file() or os.path.realpath(old) == os.path.realpath(settings.data_dir):
        return None
    return old


def check_earlier_data_dir(settings: Settings) -> str | None:
    """Raise EarlierDataDir when the data folder (the default) is empty and an earlier version's
    folder holds data; return a line to show at start when both hold data (the earlier one is
    not used), None when there is no earlier folder."""
    old = earlier_data_dir(settings)
    if old is None:
        return None
    new = settings.data_dir
    use_old = f"start with --data-dir {old}"
    if settings.db_path.exists():
        return (f"{old} holds the data of an earlier kernelpool and is not used: the data folder is {new}, the "
                f"default as root. To use {old} instead, {use_old}")
    if not os.path.lexists(new):
        move = f"To keep it, move it to the new default and start again: mv {old} {new}"
    elif new.is_dir() and not any(new.iterdir()):
        move = f"To keep it, move it to the new default and start again: rmdir {new} && mv {old} {new}"
    else:
        move = f"To keep it, move what it holds into {new} and start again"
    blocked = data_dir_unreachable(settings.model_copy(update={"data_dir": old.absolute()}))
    stay = (f"{use_old}" if blocked is None
            else f"{use_old} after letting users' uids reach it ({blocked.blocked}, which other uids may not pass)")
    raise EarlierDataDir(str(old), str(new), f"{move}; or {stay}; or, to start an empty server and leave {old} as it is, "
                         f"start with --data-dir {new}.")


def data_folder_report(settings: Settings) -> dict[str, Any]:
    """What `kernelpool doctor` says of the data folder: can users' uids reach their folders
    (what the server checks at start), and is an earlier version's folder left aside."""
    unreachable = data_dir_unreachable(settings)
    out: dict[str, Any] = {"path": str(settings.data_dir), "reachable_by_users": unreachable is None,
                           "problem": str(unreachable) if unreachable else None, "earlier": None, "refused": False}
    try:
        out["earlier"] = check_earlier_data_dir(settings)
    except EarlierDataDir as exc:
        out["earlier"], out["refused"] = str(exc), True
    return out


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    floor: int  # bytes; 0 = no floor

    def free(self) -> tuple[int, int]:
        """(bytes free to an unprivileged writer, total bytes) of the filesystem holding `path`."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def check(self, what: str) -> None:
        """Raise DiskLow when free space is under the floor; `what` names the refused action."""
        if self.floor <= 0:
            return
        free, _ = self.free()
        if free < self.floor:
            raise DiskLow(what, free, self.floor)

    def report(self) -> dict[str, Any]:
        free, total = self.free()
        return {"path": str(self.path), "free_bytes": free, "total_bytes": total, "floor_bytes": self.floor,
                "low": self.floor > 0 and free < self.floor}
