from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sandbox import probe


def test_probe_reports_this_host() -> None:
    found = probe()
    assert set(found) == {"root", "setuid", "accounts", "cgroup", "netns", "nftables", "nftables_error", "ip_forward",
                          "no_new_privs", "mount_namespace", "proc_hidepid", "cgroup_namespace", "seccomp", "seccomp_error",
                          "ipc_namespace", "private_sysfs", "etc_overlay"}
    assert found["root"] == (os.geteuid() == 0)
    assert found["no_new_privs"] is True  # any Linux since 3.5
    assert found["cgroup"]["version"] in (1, 2, None)
    # libseccomp2 is installed wherever kernelpool is (a dependency of the package and the image)
    assert found["seccomp"] is True and found["seccomp_error"] is None
    if found["root"]:
        assert found["setuid"] and found["netns"]
        assert found["mount_namespace"] and found["proc_hidepid"] and found["cgroup_namespace"]
        assert found["ipc_namespace"] and found["private_sysfs"] and found["etc_overlay"]
    # the probe ran in a throwaway child: nothing changed here
    assert "hidepid" not in Path("/proc/self/mountinfo").read_text()
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert found["ip_forward"] == (f.read().strip() == "1")
    try:
        from sandbox import _nft

        loads = _nft.available() is None
    except OSError:
        loads = False
    assert found["nftables"] == (loads and found["root"]), "nft is there, and root may read the ruleset"
    # why not, in words, exactly when it is not usable (the server's fallback and doctor say it)
    assert (found["nftables_error"] is None) == found["nftables"], found["nftables_error"]
    if not loads:
        assert "not installed" in found["nftables_error"]
    if found["cgroup"]["version"] is not None:
        assert {"memory", "cpu", "pids"} <= set(found["cgroup"]["controllers"]) or found["cgroup"]["version"] == 2


def test_sandbox_imports_nothing_of_the_layers_above() -> None:
    code = (
        "import sys, sandbox\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kernelpool', 'jupyter_client', 'ipykernel', 'mcp', 'zmq')]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
