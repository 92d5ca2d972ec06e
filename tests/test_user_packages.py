"""Per-user packages: `%pip install X` / `!pip install X` in a kernel installs X for that user only,
into their own folder, importable at once and in their later kernels (forked or stock); other
users do not see it; the server's venv is never written; packages installed beside the server
are seen by everyone; a full disk and a missing network are said in words.

Real servers, real kernels, real pip against PyPI (tiny pure-Python packages). Needs root and
writable cgroups (kernels run as the users' uids: that is what keeps the server's venv
read-only to them), and PyPI: skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx2
import pytest

from sandbox import probe
from testkit.client import mcp_client
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

# tiny pure-Python packages that the project does not depend on
USER_PKG, USER_MOD = "text-unidecode==1.3", "text_unidecode"
BANG_PKG, BANG_MOD = "tomli-w==1.2.0", "tomli_w"
SERVER_PKG, SERVER_MOD = "pyjokes==0.8.3", "pyjokes"
PIP_TIMEOUT = 280


def _pypi_reason() -> str | None:
    try:
        r = httpx2.get("https://pypi.org/simple/text-unidecode/", timeout=20, follow_redirects=True)
    except httpx2.HTTPError as exc:
        return f"PyPI is unreachable from this host ({exc!r})"
    return None if r.status_code == 200 else f"PyPI answered {r.status_code}"


PYPI_SKIP = _pypi_reason()
pytestmark = [
    pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"needs isolation: {SANDBOX_SKIP}"),
    pytest.mark.skipif(PYPI_SKIP is not None, reason=f"needs PyPI: {PYPI_SKIP}"),
]


def text(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def run(server: KernelpoolServer, user: str, notebook: str, code: str, *, create: bool = False) -> str:
    async with mcp_client(server.url, server.tokens[user], mode="auto") as c:
        if create:
            r = await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
            assert not r.is_error, text(r)
        r = await c.call_tool("execute_code", {"code": code, "notebook": notebook, "timeout": PIP_TIMEOUT})
        return text(r)


def where(module: str) -> str:
    return (f"try:\n    import {module}\n    print('FOUND', {module}.__file__)\n"
            "except ModuleNotFoundError as exc:\n    print('MISSING', exc)\n")


def venv_state() -> dict[str, tuple[int, int, int]]:
    """Every file and folder of the server's venv (the one running the tests): mtime, size, owner."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(sys.prefix):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            state[os.path.relpath(path, sys.prefix)] = (st.st_mtime_ns, st.st_size, st.st_uid)
    return state


def not_installed(*modules: str) -> None:
    for module in modules:
        found = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, cwd="/")
        assert found.returncode != 0, f"{module} is already installed in the server's venv: pick another test package"


@pytest.fixture
def server() -> Iterator[KernelpoolServer]:
    kp = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="1"))
    try:
        kp.add_user("alice")
        kp.add_user("bob")
        kp.start()
        yield kp
    finally:
        kp.cleanup()


async def test_pip_install_is_for_that_user_only(server: KernelpoolServer) -> None:
    not_installed(USER_MOD, BANG_MOD)
    alice_site = os.path.join(server.data_dir, "users", "alice", ".local")
    alice_uid = os.stat(os.path.join(server.data_dir, "users", "alice")).st_uid
    before = venv_state()

    # %pip in alice's (forked) kernel: into her folder, importable at once in the same kernel
    out = await run(server, "alice", "a.ipynb", f"%pip install {USER_PKG}", create=True)
    assert "Successfully installed text-unidecode" in out, out
    assert "kernelpool:" not in out, out
    out = await run(server, "alice", "a.ipynb", where(USER_MOD))
    assert out.startswith(f"FOUND {alice_site}/lib/"), out
    installed = out.split()[1]
    assert os.stat(installed).st_uid == alice_uid
    # bob: `!pip` in his kernel, importable at once there
    await run(server, "bob", "b.ipynb", "1", create=True)
    out = await run(server, "bob", "b.ipynb", f"!pip install {BANG_PKG}")
    assert "Successfully installed tomli-w" in out, out
    out = await run(server, "bob", "b.ipynb", where(BANG_MOD))
    assert out.startswith(f"FOUND {server.data_dir}/users/bob/.local/lib/"), out
    # neither sees the other's
    assert (await run(server, "bob", "b.ipynb", where(USER_MOD))).startswith("MISSING"), "bob sees alice's package"
    assert (await run(server, "alice", "a.ipynb", where(BANG_MOD))).startswith("MISSING"), "alice sees bob's package"
    # alice's later kernels: a new notebook (the warm pool's forked kernel) and a restarted one
    out = await run(server, "alice", "later.ipynb", where(USER_MOD), create=True)
    assert out.startswith(f"FOUND {alice_site}/"), out
    async with mcp_client(server.url, server.tokens["alice"], mode="auto") as c:
        assert not (await c.call_tool("restart_notebook", {"notebook": "a.ipynb"})).is_error
    assert (await run(server, "alice", "a.ipynb", where(USER_MOD))).startswith(f"FOUND {alice_site}/")
    forked_path = json.loads(await run(server, "alice", "a.ipynb", "import json, sys; print(json.dumps(sys.path))"))

    # the server's venv: not one file added, changed or handed to a user
    assert venv_state() == before

    # the stock start (no fork server) on the same data: the same packages, the same sys.path
    server.stop()
    server.env["KERNELPOOL_FORK_SERVER"] = "false"
    server.start()
    out = await run(server, "alice", "a.ipynb", where(USER_MOD))
    assert out.startswith(f"FOUND {alice_site}/"), out
    assert (await run(server, "bob", "b.ipynb", where(USER_MOD))).startswith("MISSING")
    assert (await run(server, "bob", "b.ipynb", where(BANG_MOD))).startswith("FOUND")
    stock_path = json.loads(await run(server, "alice", "a.ipynb", "import json, sys; print(json.dumps(sys.path))"))
    assert stock_path == forked_path
    assert any(p.startswith(alice_site) for p in stock_path)


async def test_a_package_beside_the_server_is_seen_by_every_user(server: KernelpoolServer) -> None:
    not_installed(SERVER_MOD)
    # alice's kernel is forked from a fork server that started before the package existed
    assert (await run(server, "alice", "s.ipynb", where(SERVER_MOD), create=True)).startswith("MISSING")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SERVER_PKG],
                       check=True, capture_output=True, timeout=PIP_TIMEOUT)
        for user in ("alice", "bob"):
            out = await run(server, user, "s.ipynb", where(SERVER_MOD), create=(user == "bob"))
            assert out.startswith(f"FOUND {sys.prefix}/"), (user, out)
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", SERVER_PKG.split("==")[0]],
                       capture_output=True, timeout=120)


async def test_a_full_disk_is_said_in_words() -> None:
    kp = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="0"))
    mount = os.path.join(kp.data_dir, "users", "carol")
    os.makedirs(mount)
    # a user's volume with room for a notebook but not for the package: a quota stand-in
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k,mode=0700", "tmpfs", mount],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(mount)
        kp.cleanup()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        kp.add_user("carol")
        kp.start()
        out = await run(kp, "carol", "full.ipynb", f"%pip install {USER_PKG}", create=True)
        assert "No space left on device" in out, out
        assert "kernelpool: the install failed because your folder is full" in out, out
        assert (await run(kp, "carol", "full.ipynb", where(USER_MOD))).startswith("MISSING")
    finally:
        kp.stop()
        subprocess.run(["umount", "-l", mount], capture_output=True)
        kp.cleanup()


@pytest.mark.skipif(not probe().get("netns"), reason="this host cannot give kernels a network namespace")
async def test_no_network_is_said_in_words() -> None:
    kp = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="0"))
    try:
        kp.add_user("dave")
        kp.start("--kernel-network", "none")
        out = await run(kp, "dave", "net.ipynb", f"%pip install {USER_PKG}", create=True)
        assert "kernelpool: the install failed because this kernel cannot reach the package index" in out, out
        assert "Successfully installed" not in out
    finally:
        kp.cleanup()
