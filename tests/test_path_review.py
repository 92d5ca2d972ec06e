"""Every file-system call by path in kernelpool/ and sandbox/, and in the jupyter_client code that
runs on our kernels' files, reviewed for one question: can a tenant change the path? (The server
runs as root: a path a tenant can change is a way for the tenant to write as root.)

The root server must never create, truncate, chown, open or connect to a path a tenant can
change. Tenant-writable places are DATA/users/<name>/** and DATA/run/<uid>/tmp/** (the user's),
and DATA/run/<uid>/<kid>/s/ until it is locked (see sandbox/rundir.py). Each call below is
listed with why it is safe; a new call, or one more of the same in a function, fails this test
until someone has reviewed it and added it here. Calls through a directory descriptor
(`dir_fd=`) with O_NOFOLLOW resolve one name in a folder already opened without following
links, so they are listed by the function that holds the descriptor.
"""

from __future__ import annotations

import ast
import collections
import inspect
import json
import os
import textwrap
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# by name: functions that take a path
PATH_FUNCS = {
    "open", "os.open", "os.unlink", "os.remove", "os.rmdir", "os.mkdir", "os.makedirs", "os.rename", "os.replace",
    "os.chown", "os.lchown", "os.chmod", "os.lchmod", "os.stat", "os.lstat", "os.listdir", "os.scandir",
    "os.symlink", "os.link", "os.readlink", "os.utime", "os.truncate", "os.walk", "os.access", "os.chdir",
    "os.mkfifo", "os.mknod", "os.path.exists", "os.path.lexists", "os.path.isdir", "os.path.isfile",
    "os.path.islink", "os.path.realpath", "os.path.getsize", "os.path.samefile",
}
# by method name, on any object: pathlib, sockets (unix paths), zmq (ipc paths), sqlite
METHODS = {
    "connect", "bind", "mkdir", "exists", "is_file", "is_dir", "read_text", "read_bytes", "write_text",
    "write_bytes", "unlink", "rmdir", "touch", "chmod", "symlink_to", "iterdir", "glob", "rglob", "open",
    "sock_connect",
}

SERVER_CONFIG = "a path from the server's configuration or the host (DATA itself, /proc, /sys/fs/cgroup, /etc): no tenant writes there"
CGROUP = "cgroup file system under the server's own cgroup folder: root's, tenants cannot write it"
DIR_FD = "one name resolved from a directory descriptor opened without following links; O_NOFOLLOW or follow_symlinks=False"
NETNS = "the namespace folder (/run/netns, root's; never below DATA): tenants cannot write there"
KERNEL_SIDE = "runs inside the user's kernel, as the user's uid (the IPython %pip wrapper): not the server"
FRESH_NS = "in a kernel's child before any user code runs, inside the fresh tmpfs of its own mount namespace"
SERVICE = "a method of our own (NotebookService/SafeRoot), not a file-system call: reviewed where it is defined"

REVIEWED: dict[tuple[str, str, str], tuple[int, str]] = {
    # kernelpool
    ("kernelpool/kernels/zygote/child.py", "_child", "os.open"): (1, "/dev/null"),
    ("kernelpool/app.py", "_Server.lifespan", ".open"): (1, "Store.open(): " + SERVICE),
    ("kernelpool/commands/common.py", "_with_store", ".open"): (1, "Store.open(): " + SERVICE),
    ("kernelpool/config.py", "_config_file_from", ".is_file"): (1, "the --config file: the administrator's"),
    ("kernelpool/kernels/isolation.py", "_first_blocked", "os.path.realpath"):
        (1, "the kernel interpreter, or the folder above DATA: configuration; stat only"),
    ("kernelpool/kernels/isolation.py", "_first_blocked", "os.stat"):
        (1, "folders on the way to the interpreter or to DATA: configuration; stat only"),
    ("kernelpool/kernels/isolation.py", "data_dir_unreachable", "os.path.isdir"): (1, "DATA's parents: configuration"),
    ("kernelpool/kernels/specs.py", "_checked", "shutil.which"): (1, "a kernelspec's program on the system PATH or "
                                                                 "its own: configuration, installed by root, read at start-up"),
    ("kernelpool/kernels/specs.py", "_checked", "os.access"): (1, "the same program, only to refuse a missing one"),
    ("kernelpool/kernels/isolation.py", "data_dir_unreachable", "os.path.isfile"):
        (1, "DATA/kernelpool.db: root's folder; stat only, for the message"),
    ("kernelpool/kernels/isolation.py", "data_dir_unreachable", "os.path.lexists"):
        (1, "/var/lib/kernelpool: the system's; stat only, for the message"),
    ("kernelpool/disk.py", "earlier_data_dir", ".is_file"):
        (1, "./kernelpool-data/kernelpool.db below the folder the administrator runs the CLI in: stat only"),
    ("kernelpool/disk.py", "earlier_data_dir", "os.path.realpath"): (2, "./kernelpool-data and DATA: compared, not opened"),
    ("kernelpool/disk.py", "check_earlier_data_dir", ".exists"): (1, "DATA/kernelpool.db: root's folder"),
    ("kernelpool/disk.py", "check_earlier_data_dir", "os.path.lexists"): (1, "DATA: configuration; for the message"),
    ("kernelpool/disk.py", "check_earlier_data_dir", ".is_dir"): (1, "DATA: configuration; for the message"),
    ("kernelpool/disk.py", "check_earlier_data_dir", ".iterdir"):
        (1, "DATA, which holds no database yet (no server ran there): whether it is empty, for the message"),
    ("kernelpool/kernels/wire.py", "Wire.connect", ".sock_connect"):
        (1, "a unix connect to a kernel's socket in DATA/run/<uid>/<kid>/s/, only after the provisioner locked s/ "
            "(root:<gid> 0750) and check_sockets found each entry a socket of the kernel's uid"),
    ("kernelpool/kernels/channels.py", "KernelChannels.open", ".connect"): (1, "Wire.connect: reviewed where it is defined"),
    ("kernelpool/kernels/launch.py", "KernelLauncher.open_channels", ".open"): (1, "KernelChannels.open: reviewed where it is defined"),
    ("kernelpool/users/upstream.py", "UpstreamUsers._leftover_files", "os.scandir"):
        (1, "DATA/users/<name> while there is no such user (no process of a removed uid is left): listed, nothing opened or followed; DATA/users is root's, 0711"),
    ("kernelpool/web/oidc.py", "client_secret", ".read_text"):
        (1, "oidc_client_secret_file, read once at start-up: the administrator's (a Docker or Kubernetes secret); no tenant names it"),
    ("kernelpool/kernels/reaper.py", "_user_run_folders", "os.listdir"): (1, "DATA/run: root's, 0711"),
    ("kernelpool/kernels/reaper.py", "_user_run_folders", "os.path.islink"): (1, "DATA/run/<uid>: in root's DATA/run"),
    ("kernelpool/kernels/reaper.py", "reap_leftovers", "os.listdir"):
        (1, "DATA/run/<uid>: root:<gid> 0710, only root creates entries; each is then removed with remove_tree"),
    ("kernelpool/notebooks/service.py", "NotebookService._exists", ".exists"): (1, SERVICE),
    ("kernelpool/notebooks/service.py", "NotebookService._read", ".read_bytes"): (1, SERVICE),
    ("kernelpool/notebooks/service.py", "NotebookService.create", ".exists"): (1, SERVICE),
    ("kernelpool/store.py", "Store.open", ".open"): (1, "the backend's open(): a method of our own, reviewed where it is defined"),
    ("kernelpool/db/sqlite.py", "SQLiteBackend.open", ".mkdir"): (1, "DATA: configuration"),
    ("kernelpool/db/sqlite.py", "SQLiteBackend.open", ".exists"): (1, "DATA/kernelpool.db: root's folder"),
    ("kernelpool/db/sqlite.py", "SQLiteBackend.open", ".connect"): (1, "sqlite DATA/kernelpool.db: root's folder"),
    ("kernelpool/db/sqlite.py", "SQLiteBackend.open", "os.chmod"): (1, "DATA/kernelpool.db, just created in root's folder"),
    ("kernelpool/db/postgres.py", "PostgresBackend._connect_listener", ".connect"): (1, "asyncpg to database_url: configuration, a network address"),
    ("kernelpool/notebooks/service.py", "NotebookService.must_exist", ".exists"): (1, SERVICE),
    ("kernelpool/mcp/notebooks.py", "use_notebook", ".open"): (1, "Workspace.open(): " + SERVICE),
    ("kernelpool/users/removal.py", "UserRemoval._stop", "os.path.isdir"): (1, "DATA/run/<uid>: root's"),
    ("kernelpool/users/removal.py", "UserRemoval._stop", "os.listdir"): (1, "DATA/run/<uid>: root's, only root adds entries"),
    ("kernelpool/users/accounts.py", "UserService._folder_owners_floor", "os.scandir"):
        (1, "DATA/users: root's, 0711, only root adds entries; each entry is lstat'ed (follow_symlinks=False), never opened"),
    ("kernelpool/kernels/networks.py", "UserNetworkPolicy.join", ".exists"): (1, "UserNetworks.exists(): " + NETNS),
    ("kernelpool/mcp/events.py", "EventScope.__call__.send_and_bind", ".bind"): (1, "binds a stream to its MCP session in memory: no file"),
    ("kernelpool/kernels/pip_extension.py", "_free_bytes", "os.path.exists"): (1, KERNEL_SIDE),
    ("kernelpool/kernels/pip_extension.py", "_entries", "os.listdir"): (1, KERNEL_SIDE),
    ("kernelpool/kernels/pip_extension.py", "_remove_new", "os.path.isdir"): (1, KERNEL_SIDE),
    ("kernelpool/kernels/pip_extension.py", "_remove_new", "os.path.islink"): (1, KERNEL_SIDE),
    ("kernelpool/kernels/pip_extension.py", "_remove_new", "shutil.rmtree"): (1, KERNEL_SIDE),
    ("kernelpool/kernels/pip_extension.py", "_remove_new", "os.unlink"): (1, KERNEL_SIDE),
    ("kernelpool/kernels/reaper.py", "_remove_cgroups", "os.walk"): (1, CGROUP + "; os.walk follows no link"),
    ("kernelpool/db/sqlite.py", "schema_version_on_disk", "open"): (1, "DATA/kernelpool.db: root's folder"),
    ("kernelpool/users/accounts.py", "UserService.clean_runtime", "os.scandir"):
        (1, "DATA/run: root's, 0711; each entry is then removed with remove_tree (descriptors, no link followed)"),
    ("kernelpool/users/accounts.py", "UserService._adopt_account", "os.path.realpath"):
        (2, "an account's home and DATA/users/<name> (whose parent is root's), compared as strings: nothing is opened or written"),
    ("kernelpool/kernels/zygote/server.py", "_zygote_env", "os.path.realpath"): (1, "kernelpool's own installed files"),
    ("sandbox/launcher.py", "_join_cgroup", "os.open"): (1, CGROUP),
    ("sandbox/_nft.py", "_binary", "shutil.which"): (1, "the nft command in root's PATH: system folders, root's"),
    ("sandbox/_nft.py", "_binary", "os.access"): (1, "/usr/sbin/nft, /sbin/nft: system folders, root's"),
    ("sandbox/views.py", "private_tmpfs", "os.path.isdir"): (1, FRESH_NS),
    ("sandbox/views.py", "private_tmpfs", "os.makedirs"): (1, FRESH_NS),
    ("sandbox/views.py", "_open_kept", "os.open"):
        (1, "the kernel's own folders, opened O_NOFOLLOW|O_PATH in the child before user code runs; every parent is root's"),
    ("sandbox/views.py", "read_mountinfo", "os.open"): (1, "/proc/self/mountinfo"),
    ("sandbox/views.py", "limit_shm", "os.open"): (1, "/proc/sys/kernel/shm*, in the kernel's child (root) before user code runs"),
    ("sandbox/views.py", "hide_dirs", "os.path.realpath"):
        (1, "HIDDEN_DIRS and the namespace folder: root's folders of the host (/run/...), in the kernel's child before user code"),
    ("sandbox/views.py", "hide_dirs", "os.path.isdir"): (1, "the same root's folders"),
    ("sandbox/views.py", "replace_files", "os.path.isdir"):
        (1, "/etc (the folder of the replaced files): the host's, root's; in the kernel's child before user code"),
    ("sandbox/views.py", "_layer", "os.stat"): (1, "/etc, the host's"),
    ("sandbox/views.py", "_layer", "os.mkdir"): (1, "the scratch tmpfs just mounted by the kernel's child (root, mode 0700)"),
    ("sandbox/views.py", "_layer", "os.open"): (1, "the same scratch tmpfs: root's alone, O_CREAT|O_EXCL|O_NOFOLLOW"),
    ("sandbox/views.py", "_layer", "os.link"): (1, "two names in that scratch tmpfs, root's alone"),
    ("sandbox/views.py", "_layer", "os.chown"): (1, "the layer folder just made in that scratch tmpfs"),
    ("sandbox/views.py", "_layer", "os.chmod"): (1, "the layer folder just made in that scratch tmpfs"),
    ("sandbox/views.py", "private_cgroupfs", "os.mkdir"): (1, FRESH_NS),
    ("kernelpool/commands/doctor.py", "_doctor", ".exists"): (1, "DATA and its parents, for the free space: configuration"),
    ("kernelpool/kernels/networks.py", "report", "os.listdir"): (1, NETNS),
    ("sandbox/launcher.py", "_network", "os.open"): (1, NETNS + "; opened read-only in the kernel's child before it drops root"),
    ("sandbox/netplan.py", "resolvers_from", "open"): (1, "/etc/resolv.conf: the host's"),
    ("sandbox/network.py", "UserNetworks.reap", "os.listdir"): (1, NETNS),
    ("sandbox/network.py", "UserNetworks.exists", "os.path.exists"): (1, NETNS),
    ("sandbox/network.py", "UserNetworks.ensure", "os.path.exists"): (2, NETNS),
    ("sandbox/network.py", "UserNetworks._create", "os.open"): (1, "/proc/thread-self/ns/net: the server's own thread"),
    ("sandbox/network.py", "UserNetworks._teardown", "os.path.exists"): (1, NETNS),
    ("sandbox/network.py", "_read", "open"): (1, "/proc/sys/net: the host's or a namespace's sysctl files"),
    ("sandbox/network.py", "_write", "open"): (2, "/proc/sys/net: the host's or a namespace's sysctl files"),
    ("sandbox/network.py", "_write", "os.open"): (1, "/proc/thread-self/ns/net: the server's own thread"),
    ("sandbox/_docker.py", "iptables", "shutil.which"): (1, "the iptables command on the server's PATH"),
    ("sandbox/probe.py", "_ip_forward", "open"): (1, "/proc/sys/net/ipv4/ip_forward"),
    # sandbox: cgroups, accounts, host probes
    ("sandbox/_cgroupfiles.py", "write_file", "os.open"): (1, CGROUP),
    ("sandbox/_cgroupfiles.py", "read_file", "open"): (1, CGROUP),
    ("sandbox/_cgroupfs.py", "own_cgroup_paths", "open"): (1, "/proc/self/cgroup"),
    ("sandbox/_cgroupfs.py", "Cgroup.all_pids", "os.walk"): (1, CGROUP),
    ("sandbox/_cgroupfs.py", "Cgroup.remove", "os.path.isdir"): (1, CGROUP),
    ("sandbox/_cgroupfs.py", "CgroupBackend.get", "os.path.isdir"): (1, CGROUP),
    ("sandbox/_cgroupfs.py", "CgroupBackend.list_children", "os.scandir"): (1, CGROUP),
    ("sandbox/_cgroupfs.py", "CgroupBackend.list_children", ".is_dir"): (1, CGROUP),
    ("sandbox/_cgroupfs.py", "CgroupBackend.writable", "os.path.exists"): (1, CGROUP),
    ("sandbox/_cgroupfs.py", "CgroupBackend.writable", "os.access"): (1, CGROUP),
    ("sandbox/accounts.py", "_tool", "shutil.which"): (1, "PATH and sbin folders: the host's"),
    ("sandbox/accounts.py", "_nologin", "os.path.exists"): (1, "/usr/sbin/nologin & co: the host's"),
    ("sandbox/tasks.py", "tasks_of", "os.listdir"): (2, "/proc and /proc/<pid>/task"),
    ("sandbox/tasks.py", "_status", "open"): (1, "/proc/<pid>[/task/<tid>]/status (read only)"),
    ("sandbox/ipc.py", "objects", "open"): (1, "/proc/sysvipc/* (read only)"),
    ("sandbox/network.py", "UserNetworks.present", ".exists"): (1, "UserNetworks.exists(): " + NETNS),
    ("sandbox/cgroups.py", "_creatable", "os.path.exists"): (1, CGROUP),
    ("sandbox/cgroups.py", "_creatable", "os.access"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "_mount_points", "open"): (1, "/proc/self/mountinfo"),
    ("sandbox/cgroupkill.py", "find_trees", "os.walk"):
        (1, "cgroup mounts (from /proc/self/mountinfo): root's, tenants create no cgroup; os.walk follows no link"),
    ("sandbox/cgroupkill.py", "find_trees", "os.path.isdir"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "find_trees", "os.path.islink"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "tasks_in", "os.walk"): (1, CGROUP + "; os.walk follows no link"),
    ("sandbox/cgroupkill.py", "_status_field", "open"): (1, "/proc/<tid>/status (read only)"),
    ("sandbox/cgroupkill.py", "kill_trees", "os.path.isdir"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "_freeze", "os.path.exists"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "_thaw", "os.path.exists"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "_kill", "os.path.exists"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "_kill_pinned", "os.path.exists"): (1, "/proc/<pid>/task/<tid>"),
    ("sandbox/cgroupkill.py", "remove_trees", "os.path.isdir"): (1, CGROUP),
    ("sandbox/cgroupkill.py", "remove_trees", "os.walk"): (1, CGROUP + "; os.walk follows no link"),
    ("sandbox/cgroupkill.py", "remove_trees", "os.rmdir"): (1, CGROUP),
    ("sandbox/cgroups.py", "_v1_mounts", "open"): (1, "/proc/self/mountinfo"),
    ("sandbox/cgroups.py", "CgroupV1Backend._make", "os.makedirs"): (1, CGROUP),
    ("sandbox/cgroups.py", "CgroupV1Backend._write_memory", "os.path.exists"): (1, CGROUP),
    ("sandbox/cgroups.py", "CgroupV1Backend._ancestor_quota", "os.path.exists"): (1, CGROUP),
    ("sandbox/cgroups.py", "CgroupV2Backend._make", "os.mkdir"): (1, CGROUP),
    ("sandbox/cgroups.py", "CgroupV2Backend._evacuate_own", "os.makedirs"): (1, CGROUP),
    ("sandbox/cgroups.py", "CgroupV2Backend._write_limits", "os.path.exists"): (1, CGROUP),
    ("sandbox/cgroups.py", "detect", "os.path.exists"): (1, CGROUP),
    ("sandbox/probe.py", "_has_cap_setuid", "open"): (1, "/proc/self/status"),
    ("sandbox/launcher.py", "enter", "os.chdir"): (1, "runs in the child after it dropped to the user's uid: the user's own access"),
    # sandbox/fs.py: SafeRoot; sandbox/folders.py: prepare_dir, remove_tree
    ("sandbox/fs.py", "SafeRoot._open_root", "os.open"):
        (1, "DATA/users/<name> with O_NOFOLLOW: its parent is root's, so the name cannot be swapped"),
    ("sandbox/fs.py", "SafeRoot._open_root", "os.path.islink"): (1, "only to word the error of the call above"),
    ("sandbox/fs.py", "SafeRoot._step", "os.open"): (1, DIR_FD),
    ("sandbox/fs.py", "SafeRoot._why", "os.stat"): (1, DIR_FD + " (to word an error)"),
    ("sandbox/fs.py", "SafeRoot._fsync_dir", "os.open"): (1, "'.' of a descriptor: " + DIR_FD),
    ("sandbox/fs.py", "SafeRoot._open_regular", "os.open"): (1, DIR_FD + "; O_NONBLOCK for planted FIFOs; fstat: regular "
                                                             "files only, no hard link to another owner's file"),
    ("sandbox/fs.py", "SafeRoot.write_bytes_atomic", "os.stat"): (1, DIR_FD),
    ("sandbox/fs.py", "SafeRoot.write_bytes_atomic", "os.open"): (1, DIR_FD + "; O_CREAT|O_EXCL of a random name, fchown/fchmod"),
    ("sandbox/fs.py", "SafeRoot.write_bytes_atomic", "os.rename"): (1, DIR_FD + "; rename replaces the entry, never follows it"),
    ("sandbox/fs.py", "SafeRoot.write_bytes_atomic", "os.unlink"): (2, DIR_FD + "; unlink removes a link, not its target"),
    ("sandbox/fs.py", "SafeRoot.write_bytes_atomic", "os.link"): (1, DIR_FD + "; follow_symlinks=False, of our own new temp "
                                                                 "file; fails if the name exists (exclusive create)"),
    ("sandbox/fs.py", "SafeRoot.usage", "os.open"): (1, "'.' of a descriptor: " + DIR_FD),
    ("sandbox/fs.py", "SafeRoot.makedirs", "os.mkdir"): (1, DIR_FD + "; then chowned through a descriptor"),
    ("sandbox/fs.py", "SafeRoot.makedirs", "os.open"): (1, DIR_FD),
    ("sandbox/fs.py", "SafeRoot.scan", "os.open"): (1, "'.' of a descriptor: " + DIR_FD),
    ("sandbox/fs.py", "SafeRoot.walk", "os.open"): (1, "'.' of a descriptor: " + DIR_FD),
    # sandbox/scan.py: bounded folder reads from descriptors SafeRoot opened
    ("sandbox/scan.py", "scan_dir", "os.scandir"): (1, "of a descriptor"),
    ("sandbox/scan.py", "scan_dir", "os.stat"): (1, DIR_FD),
    ("sandbox/scan.py", "walk_files.enter", "os.scandir"): (1, "of a descriptor"),
    ("sandbox/scan.py", "walk_files", "os.open"): (1, DIR_FD + "; O_DIRECTORY: a link or a file in its place fails"),
    ("sandbox/scan.py", "disk_usage.enter", "os.scandir"): (1, "of a descriptor"),
    ("sandbox/scan.py", "disk_usage", "os.stat"): (1, DIR_FD + "; follow_symlinks=False"),
    ("sandbox/scan.py", "disk_usage", "os.open"): (1, DIR_FD + "; O_DIRECTORY|O_NOFOLLOW: a link or a file in its place fails"),
    ("sandbox/scan.py", "_kind", ".is_dir"): (1, "DirEntry.is_dir(follow_symlinks=False): d_type, or an lstat by the folder's descriptor"),
    ("sandbox/scan.py", "_kind", ".is_file"): (1, "DirEntry.is_file(follow_symlinks=False): d_type, or an lstat by the folder's descriptor"),
    ("sandbox/fs.py", "SafeRoot.stat", "os.stat"): (1, DIR_FD),
    ("sandbox/fs.py", "SafeRoot.remove", "os.unlink"): (1, DIR_FD),
    ("sandbox/fs.py", "SafeRoot.rename", "os.rename"): (1, DIR_FD),
    ("sandbox/folders.py", "prepare_dir", "os.path.isdir"):
        (1, "parents of the data folders: configuration; the last component is opened with O_NOFOLLOW"),
    ("sandbox/folders.py", "prepare_dir", "os.mkdir"): (2, "DATA, DATA/users|run, DATA/users/<name>, DATA/run/<uid>[/tmp]: each in a root folder"),
    ("sandbox/folders.py", "prepare_dir", "os.chmod"): (1, "missing parents of the data folder: configuration"),
    ("sandbox/folders.py", "prepare_dir", "os.open"): (1, "O_NOFOLLOW of a folder whose parent is root's; fchown/fchmod the descriptor"),
    ("sandbox/folders.py", "prepare_dir", "os.path.islink"): (1, "only to word the error of the call above"),
    ("sandbox/folders.py", "remove_tree", "os.open"): (1, "DATA/users or DATA/run[/<uid>]: root's"),
    ("sandbox/folders.py", "remove_tree", "os.stat"): (1, DIR_FD),
    ("sandbox/folders.py", "remove_tree", "os.unlink"): (1, DIR_FD),
    ("sandbox/folders.py", "remove_tree", "os.rmdir"): (1, DIR_FD),
    ("sandbox/folders.py", "_remove_below", "os.open"): (1, "'..' of a descriptor, checked against the (dev, ino) it was entered from"),
    ("sandbox/folders.py", "_remove_below", "os.rmdir"): (1, DIR_FD),
    ("sandbox/folders.py", "_open_child_dir", "os.open"): (1, DIR_FD + "; another file system is refused"),
    ("sandbox/folders.py", "_empty_or_first_subdir", "os.scandir"): (1, "of a descriptor"),
    ("sandbox/folders.py", "_empty_or_first_subdir", ".is_dir"): (1, "DirEntry.is_dir(follow_symlinks=False)"),
    ("sandbox/folders.py", "_empty_or_first_subdir", "os.unlink"): (1, DIR_FD),
    # sandbox/rundir.py: the kernels' connection files and sockets
    ("sandbox/rundir.py", "KernelRunDir._open_parent", "os.open"): (1, "DATA/run/<uid>: root's, in root's DATA/run; O_NOFOLLOW"),
    ("sandbox/rundir.py", "KernelRunDir._open", "os.open"): (1, DIR_FD),
    ("sandbox/rundir.py", "KernelRunDir.create", "os.mkdir"): (2, DIR_FD + "; root's 0700, fchmod'ed through a descriptor"),
    ("sandbox/rundir.py", "KernelRunDir.create", "os.open"): (2, DIR_FD),
    ("sandbox/rundir.py", "KernelRunDir.share", "os.open"): (1, DIR_FD + "; the connection file, then fchown/fchmod"),
    ("sandbox/rundir.py", "KernelRunDir.missing_sockets", "os.stat"): (1, DIR_FD),
}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _callee(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    if name in PATH_FUNCS or (name or "").startswith("shutil."):
        return name
    if isinstance(call.func, ast.Attribute) and call.func.attr in METHODS:
        return "." + call.func.attr
    return None


def path_calls(tree: ast.AST) -> collections.Counter[tuple[str, str]]:
    """(enclosing function's qualified name, callee) -> count, for every path-taking call."""
    found: collections.Counter[tuple[str, str]] = collections.Counter()

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call):
                callee = _callee(child)
                if callee is not None:
                    found[(".".join(scope) or "<module>", callee)] += 1
            visit(child, scope)

    visit(tree, [])
    return found


def test_every_path_call_in_kernelpool_and_sandbox_is_reviewed() -> None:
    seen: dict[tuple[str, str, str], int] = {}
    for package in ("kernelpool", "sandbox"):
        for folder, _, names in sorted(os.walk(os.path.join(ROOT, package))):
            for name in sorted(n for n in names if n.endswith(".py")):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                with open(os.path.join(ROOT, rel)) as f:
                    tree = ast.parse(f.read())
                for (scope, callee), count in path_calls(tree).items():
                    seen[(rel, scope, callee)] = count
    new = {k: v for k, v in seen.items() if k not in REVIEWED or REVIEWED[k][0] != v}
    stale = {k: v[0] for k, v in REVIEWED.items() if seen.get(k) != v[0]}
    assert not new, f"path calls not reviewed yet (add them to REVIEWED with the reason they are safe): {new}"
    assert not stale, f"reviewed calls that are gone or changed in number: {stale}"


def _library() -> dict[str, Callable[..., Any]]:
    import jupyter_client.connect as connect
    import jupyter_client.manager as manager
    import jupyter_core.paths as paths

    mixin = connect.ConnectionFileMixin
    return {
        "jupyter_client.connect.write_connection_file": connect.write_connection_file,
        "ConnectionFileMixin.write_connection_file": mixin.write_connection_file,
        "ConnectionFileMixin._reconcile_connection_info": mixin._reconcile_connection_info,
        "ConnectionFileMixin.cleanup_connection_file": mixin.cleanup_connection_file,
        "ConnectionFileMixin.cleanup_ipc_files": mixin.cleanup_ipc_files,
        "ConnectionFileMixin._create_connected_socket": mixin._create_connected_socket,
        "jupyter_core.paths.secure_write": paths.secure_write,
        "KernelManager._async_cleanup_resources": manager.KernelManager._async_cleanup_resources,
    }


KERNEL_FOLDER = "DATA/run/<uid>/<kid>: root:<gid> 0750, only root writes in it, from creation to removal"
LOCKED = "DATA/run/<uid>/<kid>/s/k-N: entries of the socket folder, after it was locked (root:<gid> 0750)"
# what jupyter_client does by path on our kernels' files, reviewed against the layout of sandbox/rundir.py
LIBRARY_REVIEWED: dict[str, dict[str, tuple[int, str]]] = {
    "jupyter_client.connect.write_connection_file": {
        ".bind": (1, "tcp only (we use ipc)"),
        "os.path.exists": (1, "picking ipc names in s/ while it is still root's alone (pre_launch)"),
        "os.stat": (1, "the sticky-bit dance on " + KERNEL_FOLDER),
        "os.chmod": (1, "same; root's folder"),
    },
    "ConnectionFileMixin.write_connection_file": {"os.path.exists": (1, "kernel.json in " + KERNEL_FOLDER)},
    "ConnectionFileMixin._reconcile_connection_info": {
        "os.path.exists": (1, "kernel.json in " + KERNEL_FOLDER),
        "open": (1, "kernel.json in " + KERNEL_FOLDER),
        "os.remove": (1, "kernel.json in " + KERNEL_FOLDER),
    },
    "ConnectionFileMixin.cleanup_connection_file": {"os.remove": (1, "kernel.json in " + KERNEL_FOLDER)},
    "ConnectionFileMixin.cleanup_ipc_files": {"os.remove": (1, LOCKED + "; unlink never follows the last component")},
    "ConnectionFileMixin._create_connected_socket": {
        ".connect": (1, "zmq connect to " + LOCKED + ", after check_sockets found each a socket of the kernel's uid"),
    },
    "jupyter_core.paths.secure_write": {
        ".unlink": (1, "kernel.json in " + KERNEL_FOLDER),
        "os.open": (2, "kernel.json in " + KERNEL_FOLDER + " (O_CREAT|O_TRUNC: safe only because no tenant writes there)"),
    },
    "KernelManager._async_cleanup_resources": {},
}


def test_jupyter_client_path_calls_on_our_files_are_reviewed() -> None:
    got = {}
    for name, func in _library().items():
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(func)))
        calls = path_calls(ast.parse(source))
        got[name] = {callee: count for (_, callee), count in calls.items()}
    want = {name: {callee: n for callee, (n, _) in calls.items()} for name, calls in LIBRARY_REVIEWED.items()}
    assert got == want, "jupyter_client changed what it does by path: review the difference against sandbox/rundir.py"


# ---- the same question at run time: what a real server does by path under DATA ---------------

def _allowed(rel: str, event: str) -> str | None:
    """Why an absolute path DATA/`rel` is safe for the root server to use by name, or None."""
    import re

    parts = rel.split("/")
    if rel in (".", "kernelpool.db", "kernelpool.db-wal", "kernelpool.db-shm", "kernelpool.db-journal",
               "users", "run", "server.log"):
        return "the server's own files and folders"
    if parts[0] == "users" and len(parts) == 2:
        return "a user's folder, in root's DATA/users (opened with O_NOFOLLOW; everything inside goes by descriptor)"
    if parts[0] == "run" and len(parts) >= 2 and parts[1].isdigit():
        if len(parts) == 2:
            return "DATA/run/<uid>: root's"
        if parts[2] == "tmp":
            return "the user's tmp folder itself, in root's DATA/run/<uid>" if len(parts) == 3 else None
        if re.fullmatch(r"[0-9a-f]{12}", parts[2]):
            if len(parts) == 3 or parts[3:] in (["kernel.json"], ["s"]):
                return "a kernel folder, its connection file or socket folder: root's"
            if len(parts) == 5 and parts[3] == "s" and event == "os.remove":
                return "unlinking an entry of the locked socket folder"
    return None


def test_a_real_server_uses_no_tenant_path_by_name() -> None:
    import asyncio

    import pytest

    from testkit.client import mcp_client
    from testkit.server import KernelpoolServer, make_data_dir, server_env
    from tests.conftest import SANDBOX_SKIP

    if SANDBOX_SKIP is not None:
        pytest.skip(f"needs isolation: {SANDBOX_SKIP}")
    data = make_data_dir()
    log = data + ".audit"
    server = KernelpoolServer(data, server_env(
        PYTHONPATH=f"{ROOT}:{os.path.join(ROOT, 'tests', 'audit')}", KP_TEST_AUDIT_LOG=log, KP_TEST_AUDIT_DATA=data,
        KERNELPOOL_POOL_SIZE="1", KERNELPOOL_ACCOUNT_PREFIX=f"kpa{os.getpid() % 100000}-"))

    async def work() -> None:
        async with mcp_client(server.url, server.tokens["alice"], mode="auto") as c:
            for nb in ("a.ipynb", "sub/b.ipynb"):
                assert not (await c.call_tool("use_notebook", {"notebook": nb, "mode": "create"})).is_error
                r = await c.call_tool("insert_execute_code_cell", {"notebook": nb, "cell_index": -1,
                                                                   "cell_source": "open('f.txt', 'w').write('x')"})
                assert not r.is_error
            assert not (await c.call_tool("list_files", {"path": "sub"})).is_error
            assert not (await c.call_tool("restart_notebook", {"notebook": "a.ipynb"})).is_error
            assert not (await c.call_tool("unuse_notebook", {"notebook": "sub/b.ipynb"})).is_error

    try:
        server.add_user("alice")
        server.start()
        asyncio.run(work())
        server.stop()
        server.cli("users", "remove", "alice", "--delete-files")
        server.tokens.pop("alice")
    finally:
        server.cleanup()
    with open(log) as f:
        events = [json.loads(line) for line in f]
    os.unlink(log)
    by_name = [(e, p) for e, p, dir_fd, _ in events if os.path.isabs(p) and dir_fd is None]
    assert any(e == "open" and "/run/" in p and p.endswith(".json") for e, p in by_name), \
        "the hook saw the connection files being written"
    bad = sorted({(e, os.path.relpath(p, data)) for e, p in by_name if _allowed(os.path.relpath(p, data), e) is None})
    assert not bad, f"the server used paths a tenant can change, by name: {bad}"
