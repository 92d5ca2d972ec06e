"""The README's commands, as a newcomer meets them: on a fresh Debian 12 machine, as root, from a
checkout in root's home.

The machine is a container of a stand-in Debian bookworm root (debootstrap with python3 and
ca-certificates only: no venv module, no nftables, as cloud images ship; testkit/docker.py),
started with a private cgroup namespace and named capabilities, its read-only cgroup v1 mounts
made writable before anything else, net.ipv4.ip_forward=1 given by Docker (a container's
/proc/sys is read-only; on a machine the server sets it itself), with apt and PyPI reached
through Docker's bridge. The
checkout is HEAD of this repository (`git archive`: commit what you want tested) in /root/kernelpool,
below root's 0700 home. The README's first command is copied from the README and run as written
in that folder; the token it prints works for the real MCP client (run inside the machine, where
the server listens on 127.0.0.1 as the command leaves it) and a kernel runs 1+1. Then, on the same
machine: the command again (nothing to install, the same data), the server without nftables (the
default network falls back to 'none' and says how to get egress), an explicit 'egress' without
nftables (refused), and an upgrade from a ./kernelpool-data of an earlier version (refused with
the fix; the fix followed works). Then the README's test command, with the venv module removed
again, and CONTRIBUTING.md's commands (scripts/check, a part of the suite from the wheel and from the
checkout). pip downloads everything from PyPI each run (about a minute): no cache is shared with it.

The tests run in order on one machine, and the container and image are removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from testkit.docker import FRESH_ROOT, RUN, V1_REMOUNT, docker, import_root
from testkit.server import ROOT
from tests.doc_commands import documented_commands

VENV = "/opt/kernelpool"
CHECKOUT = "/root/kernelpool"
DATA = "/var/lib/kernelpool"
URL = "http://127.0.0.1:8765"


def readme_commands() -> tuple[str, str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```sh\n(.*?)```", f.read(), re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_starts_with_the_two_commands() -> None:
    serve, test = readme_commands()
    assert serve == f"scripts/install {VENV} && {VENV}/bin/kernelpool serve"
    assert "\n" not in serve, "the first command is one line"
    assert test == "scripts/test"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert re.search(r"^scripts/test\b", f.read(), re.M), ".ci/run must run the README's test command"


def test_install_script_passes_shellcheck() -> None:
    if subprocess.run(["sh", "-c", "command -v shellcheck"], capture_output=True).returncode != 0:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", "scripts/install", "scripts/test", ".ci/run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_install_as_another_user_installs_nothing_and_says_what_to_do() -> None:
    """scripts/install as a user other than root, where /usr/bin/python3 lacks its venv module:
    no apt-get (a stand-in on the PATH would record it), the package and the command named, and
    a stop (no venv can be made). The stand-in interpreter fails the venv module's import, as
    Debian's python3 does without python3-venv; the real machine is in the container tests."""
    if os.geteuid() != 0:
        pytest.skip("switches to the nobody user")
    folder = tempfile.mkdtemp(prefix="kp-install-", dir="/var/tmp")
    try:
        os.chmod(folder, 0o777)  # nobody writes the stand-in apt-get's record here
        os.mkdir(os.path.join(folder, "scripts"))
        shutil.copy(os.path.join(ROOT, "scripts", "install"), os.path.join(folder, "scripts", "install"))
        tried = os.path.join(folder, "apt-get-ran")
        for name, body in (("apt-get", f"#!/bin/sh\ntouch {tried}\n"), ("python3", "#!/bin/sh\nexit 1\n")):
            with open(os.path.join(folder, name), "w") as f:
                f.write(body)
            os.chmod(os.path.join(folder, name), 0o755)
        out = subprocess.run(
            ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "env", f"PATH={folder}:/usr/bin:/bin",
             f"KERNELPOOL_PYTHON={folder}/python3", f"{folder}/scripts/install", f"{folder}/venv"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out
        assert not os.path.exists(tried), "apt-get was run as another user"
        assert "system packages missing: python3-venv" in out.stderr, out.stderr
        assert "install them as root: apt-get install python3-venv" in out.stderr, out.stderr
        assert "cannot make a virtual environment without them; stopping" in out.stderr, out.stderr
        assert not os.path.exists(f"{folder}/venv")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the fresh machine --------------------------------------------------------------------------

# run inside the machine by the venv's python (mcp and httpx2 come with kernelpool): the real
# client, on the README's URL, with a token; prints the tool's outcome as JSON
CLIENT = r"""
import asyncio, json, sys
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

async def main():
    url, token, notebook, code = sys.argv[1:5]
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(url + "/mcp", http_client=http), mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
        text = "".join(b.text for b in r.content if b.type == "text")
        if r.is_error and "already exists" not in text:
            print(json.dumps({"error": True, "text": text}))
            return
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": code})
        print(json.dumps({"error": r.is_error, "text": "".join(b.text for b in r.content if b.type == "text")}))

asyncio.run(main())
"""

# the machine's own python: SIGTERM to every `kernelpool serve`, and wait until they are gone
SERVERS = r"""
import os, signal, sys, time
def servers():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/kernelpool") for a in argv) and b"serve" in argv:
            found.append(int(pid))
    return found
for pid in servers():
    os.kill(pid, signal.SIGTERM)
deadline = time.monotonic() + 60
while servers() and time.monotonic() < deadline:
    time.sleep(0.2)
sys.exit(1 if servers() else 0)
"""

HEALTHZ = r"""
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:8765/healthz", timeout=3).read().decode())
except OSError as e:
    sys.exit(f"no answer: {e}")
"""


@dataclass
class Machine:
    name: str

    def sh(self, script: str, *, check: bool = True, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`script` in root's login-like shell on the machine, from the checkout."""
        extra = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
        return docker("exec", *extra, "-w", CHECKOUT, self.name, "bash", "-c", script, check=check, timeout=timeout)

    def python(self, program: str, *args: str, python: str = "/usr/bin/python3",
               check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`program` run by the machine's python (or `python`), with `args`."""
        return docker("exec", "-i", self.name, python, "-", *args, input=program, check=check, timeout=timeout)

    def start(self, command: str, log: str, env: dict[str, str] | None = None) -> None:
        """`command` in the background, from the checkout: its output to /root/<log>, then its exit
        status to /root/<log>.rc."""
        extra = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
        docker("exec", "-d", *extra, "-w", CHECKOUT, self.name, "bash", "-c",
               f"exec >/root/{log} 2>&1; {command}\necho $? >/root/{log}.rc")

    def log(self, log: str) -> str:
        return self.sh(f"cat /root/{log}", check=False).stdout

    def status(self, log: str) -> int | None:
        """The exit status of the command that writes /root/<log>; None while it runs."""
        out = self.sh(f"cat /root/{log}.rc", check=False)
        return int(out.stdout) if out.returncode == 0 and out.stdout.strip() else None

    def healthz(self) -> dict[str, Any] | None:
        out = self.python(HEALTHZ, check=False, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait_serving(self, log: str, wait: float) -> dict[str, Any]:
        """/healthz of the server that writes /root/<log>, once it answers; fails if it exits first."""
        deadline = time.monotonic() + wait
        while True:
            health = self.healthz()
            if health is not None:
                return health
            status = self.status(log)
            assert status is None, f"exited with {status}:\n{self.log(log)[-6000:]}"
            assert time.monotonic() < deadline, f"no /healthz in {wait} s:\n{self.log(log)[-6000:]}"
            time.sleep(1)

    def stop(self, log: str) -> None:
        """SIGTERM to the server; it shuts down cleanly (uvicorn re-raises the signal: 143 from bash)."""
        out = self.python(SERVERS, "stop", check=False, timeout=90)
        assert out.returncode == 0, f"a kernelpool serve did not stop: {out.stderr}"
        deadline = time.monotonic() + 30
        while self.status(log) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert self.status(log) in (0, 143), self.log(log)[-6000:]
        assert "Application shutdown complete" in self.log(log)

    def run_code(self, token: str, notebook: str, code: str) -> dict[str, Any]:
        out = self.python(CLIENT, URL, token, notebook, code, python=f"{VENV}/bin/python", timeout=300)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def machine(docker_engine: None) -> Iterator[Machine]:
    if os.geteuid() != 0:
        pytest.skip("the fresh machine needs root: it runs dockerd, debootstrap and apt")
    tag = f"kernelpool-ci-fresh:{RUN}"
    found = Machine(f"{RUN}-fresh")
    try:
        import_root(FRESH_ROOT, tag)
        docker("run", "-d", "--name", found.name, "--hostname", "fresh", "--cgroupns=private",
               "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--security-opt", "apparmor=unconfined",
               "--sysctl", "net.ipv4.ip_forward=1", tag,
               "sh", "-c", f"{V1_REMOUNT}; exec sleep infinity")
        # a clean checkout of HEAD, as `git clone` leaves it, in root's home
        archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", "HEAD"], capture_output=True,
                                 check=True, timeout=120).stdout
        docker("exec", found.name, "mkdir", CHECKOUT)
        subprocess.run(["docker", "exec", "-i", found.name, "tar", "-x", "-C", CHECKOUT], input=archive,
                       check=True, capture_output=True, timeout=120)
        yield found
    finally:
        docker("rm", "-f", "-v", found.name, check=False, timeout=120)
        docker("rmi", "-f", tag, check=False)


def _token(log: str) -> str:
    found = re.search(r"token \(shown once\):\s+(kp_\S+)", log)
    assert found, log[-6000:]
    return found.group(1)


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_the_first_command_on_a_fresh_debian(machine: Machine) -> None:
    """The README's first command, copied from the README, on a machine that has neither the
    venv module nor nftables, from a checkout in root's 0700 home: it installs both, then
    kernelpool, then serves; the printed token runs 1+1 in a kernel of a user's own uid, in
    egress mode, with the data in /var/lib/kernelpool."""
    serve, _ = readme_commands()
    assert machine.sh("python3 -c 'import ensurepip'", check=False).returncode != 0, "the venv module is there already"
    assert machine.sh("command -v nft || ls /usr/sbin/nft", check=False).returncode != 0, "nft is there already"
    assert machine.sh("stat -c %a /root").stdout.strip() == "700"
    machine.start(serve, "first.log")
    health = machine.wait_serving("first.log", wait=900)  # apt and pip fetch what they install
    log = machine.log("first.log")
    assert "scripts/install: system packages: installing python3-venv nftables with apt-get" in log, log[-6000:]
    assert f"MCP URL: {URL}/mcp" in log and f"data in {DATA}" in log, log[-6000:]
    assert health["status"] == "ok" and health["isolation"]["sandboxed"], health
    assert health["isolation"]["network"]["mode"] == "egress" and health["isolation"]["network"]["fallback"] is None, health
    token = _token(log)
    got = machine.run_code(token, "hello.ipynb", "import os\nprint(1+1, os.getuid(), os.getcwd())")
    assert not got["error"], got
    two, uid, cwd = got["text"].split()
    assert two == "2" and int(uid) >= 20000 and cwd == f"{DATA}/users/default", got
    assert machine.sh(f"test -f {DATA}/users/default/hello.ipynb && stat -c %u {DATA}/users/default/hello.ipynb").stdout.strip() == uid
    assert machine.sh(f"test -e {CHECKOUT}/kernelpool-data", check=False).returncode != 0  # nothing in the checkout
    machine.stop("first.log")


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_the_first_command_again_installs_nothing_and_keeps_the_data(machine: Machine) -> None:
    serve, _ = readme_commands()
    token = _token(machine.log("first.log"))
    machine.start(serve, "again.log")
    machine.wait_serving("again.log", wait=300)
    log = machine.log("again.log")
    assert "scripts/install: system packages: all there" in log and "apt-get" not in log, log[-6000:]
    assert f"using the virtual environment {VENV}" in log, log[-6000:]
    assert "created user" not in log and "shown once" not in log, log[-6000:]
    got = machine.run_code(token, "hello.ipynb", "print(21 * 2)")
    assert got == {"error": False, "text": "42\n"}, got
    machine.stop("again.log")


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_without_nftables_the_default_gives_loopback_only_and_says_how_to_get_egress(machine: Machine) -> None:
    token = _token(machine.log("first.log"))
    machine.sh("mv /usr/sbin/nft /usr/sbin/nft.hidden")
    try:
        machine.start(f"{VENV}/bin/kernelpool serve", "no-nft.log")
        health = machine.wait_serving("no-nft.log", wait=120)
        network = health["isolation"]["network"]
        assert network["mode"] == "none" and network["fallback"]["wanted"] == "egress", health
        assert network["fallback"]["fix"] == "apt-get install nftables, then restart kernelpool", health
        said = [line for line in machine.log("no-nft.log").splitlines() if "kernel_network" in line]
        assert len(said) == 1, said  # one clear line at start
        assert "WARNING" in said[0] and "'none'" in said[0] and "loopback only" in said[0], said
        assert "apt-get install nftables, then restart kernelpool" in said[0], said
        doctor = machine.sh(f"{VENV}/bin/kernelpool doctor")
        line = next(x for x in doctor.stdout.splitlines() if x.startswith("network in force:"))
        assert "none: a network namespace per user, loopback only (NOT the default 'egress'" in line, line
        assert "apt-get install nftables, then restart kernelpool" in line, line
        # the kernel's user has loopback only: no route anywhere else (TEST-NET-1, never routed;
        # the connect fails before any packet leaves)
        got = machine.run_code(token, "hello.ipynb", (
            "import errno, socket\ns = socket.socket()\ntry:\n    s.connect(('192.0.2.1', 80))\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])\nprint(1+1)"))
        assert got == {"error": False, "text": "ENETUNREACH\n2\n"}, got
        machine.stop("no-nft.log")
    finally:
        machine.sh("mv /usr/sbin/nft.hidden /usr/sbin/nft", check=False)


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_egress_asked_for_without_nftables_is_refused(machine: Machine) -> None:
    machine.sh("mv /usr/sbin/nft /usr/sbin/nft.hidden && printf 'kernel_network = \"egress\"\\n' > /root/egress.toml")
    try:
        for how, env in ((f"{VENV}/bin/kernelpool serve --kernel-network egress", None),
                         (f"{VENV}/bin/kernelpool serve", {"KERNELPOOL_KERNEL_NETWORK": "egress"}),
                         (f"{VENV}/bin/kernelpool serve --config /root/egress.toml", None)):
            out = machine.sh(how, check=False, env=env, timeout=60)
            assert out.returncode == 2, (how, env, out.stdout, out.stderr)
            assert "nftables for kernel_network = 'egress', which was set explicitly" in out.stderr, out.stderr
            assert "apt-get install nftables" in out.stderr, out.stderr
            assert machine.healthz() is None
    finally:
        machine.sh("mv /usr/sbin/nft.hidden /usr/sbin/nft", check=False)


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_an_earlier_kernelpool_data_folder_is_not_left_behind_silently(machine: Machine) -> None:
    """Upgrading: the data is in ./kernelpool-data of the checkout, as earlier versions kept it
    also as root. Started the same way, the server refuses, changes nothing and says how to move
    it; a data folder in root's home is refused with its fix; the fix followed works: the old
    token runs code again, and a copy left behind is pointed at when the server starts."""
    token = _token(machine.log("first.log"))
    machine.sh(f"mv {DATA} {CHECKOUT}/kernelpool-data")
    for cmd in ("serve", "users list", "tokens list"):
        out = machine.sh(f"{VENV}/bin/kernelpool {cmd}", check=False, timeout=60)
        assert out.returncode == 2, (cmd, out.stdout, out.stderr)
        assert f"{CHECKOUT}/kernelpool-data holds the data of an earlier kernelpool" in out.stderr, out.stderr
        assert machine.sh(f"test -e {DATA}", check=False).returncode != 0, f"{cmd} made {DATA}"
    doctor = machine.sh(f"{VENV}/bin/kernelpool doctor", check=False)
    assert doctor.returncode == 1 and "earlier data folder: REFUSED" in doctor.stdout, doctor.stdout
    out = machine.sh(f"{VENV}/bin/kernelpool serve", check=False, timeout=60)
    assert f"start with --data-dir {CHECKOUT}/kernelpool-data after letting users' uids reach it (/root is mode drwx------" in out.stderr
    # the folder where it is: refused, with the folder and the fix
    out = machine.sh(f"{VENV}/bin/kernelpool serve --data-dir {CHECKOUT}/kernelpool-data", check=False, timeout=60)
    assert out.returncode == 2, out
    assert (f"could not reach their folders in the data folder {CHECKOUT}/kernelpool-data: /root is mode drwx------"
            in out.stderr), out.stderr
    assert f"move it there first: mv {CHECKOUT}/kernelpool-data {DATA}" in out.stderr, out.stderr
    # the fix, as the first message words it
    move = re.search(r"start again: (mv \S+ \S+);", machine.sh(f"{VENV}/bin/kernelpool serve", check=False).stderr)
    assert move, "no mv command in the message"
    machine.sh(move.group(1))
    machine.sh(f"mkdir {CHECKOUT}/kernelpool-data && cp {DATA}/kernelpool.db {CHECKOUT}/kernelpool-data/")
    machine.start(f"{VENV}/bin/kernelpool serve", "moved.log")
    machine.wait_serving("moved.log", wait=120)
    log = machine.log("moved.log")
    assert (f"WARNING kernelpool: {CHECKOUT}/kernelpool-data holds the data of an earlier kernelpool and is not "
            f"used: the data folder is {DATA}") in log, log
    assert "created user" not in log, log
    got = machine.run_code(token, "hello.ipynb", "print(6 * 7)")
    assert got == {"error": False, "text": "42\n"}, got
    machine.stop("moved.log")
    machine.sh(f"rm -r {CHECKOUT}/kernelpool-data")


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_the_test_command_on_the_fresh_machine(machine: Machine) -> None:
    """The README's test command, with pytest arguments: not the whole suite (10+ minutes of both
    cores, and its container tests would need a Docker engine inside this container), but enough to
    show that it gets a fresh machine going: the venv module removed again, it installs it, builds
    the wheel, installs it with the test extras and runs tests that start sandboxed servers."""
    _, test = readme_commands()
    machine.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q python3-venv python3.11-venv")
    assert machine.sh("python3 -c 'import ensurepip'", check=False).returncode != 0
    out = machine.sh(f"{test} tests/unit tests/test_install.py -q -p no:cacheprovider", check=False, timeout=840)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "scripts/install: system packages: installing python3-venv with apt-get" in out.stderr, out.stderr[-6000:]
    assert re.search(r"^\d+ passed", out.stdout, re.M) and "skipped" not in out.stdout, out.stdout[-3000:]


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_the_contributing_commands_on_the_fresh_machine(machine: Machine) -> None:
    """CONTRIBUTING.md's commands, copied from the page, on the same machine after the README's test
    command: `scripts/check` (with pytest arguments: the whole suite is not for a container) installs
    ruff and mypy and passes both on the checkout before its tests; a part of the suite against the
    installed wheel; the same part from the checkout."""
    shown = [command for page, command in documented_commands() if page == "CONTRIBUTING.md"]
    assert shown and shown[0] == "scripts/check", shown
    for command in shown:
        run = f"{command} tests/unit -q -p no:cacheprovider" if command == "scripts/check" else command
        out = machine.sh(run, check=False, timeout=1200)
        said = out.stdout + out.stderr
        # pytest's own verdict lines first: a report that keeps only the start of a long message still names the test
        verdicts = [line for line in said.splitlines() if line.startswith(("FAILED ", "ERROR ", "E   "))]
        assert out.returncode == 0, (command, verdicts[:40], said[-6000:])
        # pytest's last line: "170 passed in 7.42s" with -q, framed in "=" without it
        assert re.search(r"^(=+ )?\d+ passed", out.stdout, re.M), (command, out.stdout[-3000:])
        if command == "scripts/check":
            assert "All checks passed!" in said and re.search(r"^Success: no issues found", out.stdout, re.M), said[-6000:]
