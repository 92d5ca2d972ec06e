"""`kernelpool doctor`: what isolation this host gives and what is in force. Callers:
`kernelpool.cli.main`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from kernelpool.commands.common import _settings
from kernelpool.errors import fmt_bytes


async def _doctor(args: argparse.Namespace) -> int:
    from kernelpool.disk import DiskSpace, data_folder_report
    from kernelpool.errors import SandboxUnavailable
    from kernelpool.kernels.isolation import decide
    from kernelpool.kernels.networks import report as network_report

    settings = _settings(args)
    report: dict[str, Any] = {"euid": os.geteuid(), "data_dir": str(settings.data_dir)}
    try:
        iso = decide(settings)
        report["host"] = iso.host
        report["in_force"] = iso.describe()
        report["network"] = network_report(settings, iso.network, sandboxed=iso.sandboxed) | {"fallback": iso.fallback()}
        ok = True
    except SandboxUnavailable as exc:
        from sandbox import probe

        report["host"] = probe()
        report["in_force"] = {"sandboxed": False, "error": str(exc)}
        report["network"] = {"mode": settings.kernel_network, "isolated": False, "why": "the sandbox cannot run here"}
        ok = False
    folder = settings.data_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # not created yet: the filesystem it will be on
    report["disk"] = DiskSpace(folder, settings.disk_free_floor_bytes).report() | {"path": str(settings.data_dir)}
    data = report["data_folder"] = data_folder_report(settings)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_doctor(report)
    if report["disk"]["low"] or data["refused"]:
        return 1
    if settings.insecure_no_sandbox:
        return 0
    return 0 if ok and data["reachable_by_users"] else 1


def _print_doctor(report: dict[str, Any]) -> None:
    from kernelpool.kernels.networks import describe_report

    disk, data = report["disk"], report["data_folder"]
    print(f"data folder:         {disk['path']}: {fmt_bytes(disk['free_bytes'])} free of {fmt_bytes(disk['total_bytes'])}"
          + (f"; UNDER the floor of {fmt_bytes(disk['floor_bytes'])} (disk_free_floor): new kernels and writes "
             "are refused" if disk["low"] else f" (floor {fmt_bytes(disk['floor_bytes'])})"))
    print("users' folders:      " + ("reachable by users' uids" if data["reachable_by_users"] else f"NOT reachable: {data['problem']}"))
    if data["earlier"]:
        print(f"earlier data folder: {'REFUSED: ' if data['refused'] else ''}{data['earlier']}")
    host = report["host"]
    print(f"running as uid {report['euid']}" + (" (root)" if host.get("root") else ""))
    print(f"switch uids:         {'yes' if host.get('setuid') else 'NO'}")
    print(f"create accounts:     {'yes' if host.get('accounts') else 'no'}")
    cg = host.get("cgroup") or {}
    print(f"cgroups:             v{cg.get('version')} controllers={','.join(cg.get('controllers') or [])} "
          f"writable={'yes' if cg.get('writable') else 'NO'}" if cg.get("version") else "cgroups:             NONE usable")
    print(f"network namespaces:  {'yes' if host.get('netns') else 'no'}")
    print(f"nftables:            {'yes' if host.get('nftables') else 'no'}"
          + (f" ({host['nftables_error']})" if host.get("nftables_error") else ""))
    print(f"ip forwarding:       {'on' if host.get('ip_forward') else 'off'}")
    print(f"no_new_privs:        {'yes' if host.get('no_new_privs') else 'no'}")
    print(f"mount isolation:     {'yes' if host.get('mount_namespace') else 'NO'} (mount namespace, private /tmp and /dev/shm)")
    print(f"pid isolation:       {'yes' if host.get('proc_hidepid') else 'NO'} (own /proc with hidepid=invisible)")
    print(f"cgroup namespaces:   {'yes' if host.get('cgroup_namespace') else 'NO'}")
    print(f"ipc namespaces:      {'yes' if host.get('ipc_namespace') else 'NO'}")
    print(f"own /sys:            {'yes' if host.get('private_sysfs') else 'NO'} (sysfs of the kernel's network namespace)")
    print(f"own /etc/passwd:     {'yes' if host.get('etc_overlay') else 'NO'} (an overlay on /etc)")
    print(f"seccomp:             {'yes' if host.get('seccomp') else 'NO'}"
          + (f" ({host['seccomp_error']})" if host.get("seccomp_error") else ""))
    inf = report["in_force"]
    print("in force:            " + ("sandbox (per-user uid, cgroup limits, private /tmp, /dev/shm, /proc, /sys, "
                                      "cgroup views, IPC and /etc/passwd, seccomp filter)" if inf.get("sandboxed")
                                     else f"NO ISOLATION: {inf.get('error') or '; '.join(inf.get('warnings', []))}"))
    print("network in force:    " + describe_report(report["network"]))
