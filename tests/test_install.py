"""What users install is what is tested: the server under test is the wheel in a venv, and its
kernels, forked or stock, see exactly what `python -m ipykernel_launcher` from that venv sees.

The regression this guards: the fork server was given PYTHONPATH=<the folder holding kernelpool>
to find its own module and removed that entry from its kernels' path. In a wheel install that
folder is site-packages, so every forked kernel lost it: only preloaded modules imported, and
IPython could not format a traceback. Tests that ran the server from the source tree never saw it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator

import pytest

from testkit.client import mcp_client
from testkit.server import FROM_SOURCE, ROOT, KernelpoolServer, kernelpool_command, make_data_dir, server_env

installed_only = pytest.mark.skipif(
    FROM_SOURCE, reason="KERNELPOOL_TEST_FROM_SOURCE=1 runs the checkout; these tests are about the installed wheel",
)
SITE = sysconfig.get_paths()["purelib"]


def text(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


def _wheel(folder: str, name: str, value: str) -> str:
    """A minimal pure-Python wheel made here: no build backend, no network."""
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kernelpool-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = os.path.join(folder, f"{name}-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name_in_zip, data in files.items():
            zf.writestr(name_in_zip, data)
    return path


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args],
                   check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def srv(server_args: list[str]) -> Iterator[KernelpoolServer]:
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_POOL_SIZE="1", KERNELPOOL_ACCOUNT_PREFIX=f"kpi{os.getpid() % 10000}-",
        KERNELPOOL_CGROUP_PREFIX=f"kernelpool-insttest-{os.getpid()}",
    ))
    try:
        server.add_user("ivy")
        server.start(*server_args)
        yield server
    finally:
        server.cleanup()


@installed_only
def test_the_server_under_test_is_the_installed_wheel(srv: KernelpoolServer) -> None:
    assert srv.command == [os.path.join(os.path.dirname(sys.executable), "kernelpool")]
    out = subprocess.run([sys.executable, "-c", "import kernelpool, sandbox; print(kernelpool.__file__); print(sandbox.__file__)"],
                         env=srv.env, cwd="/", capture_output=True, text=True, check=True).stdout.split()
    for module_file in out:
        assert module_file.startswith(SITE + os.sep), out
        assert not module_file.startswith(ROOT + os.sep), out
    assert srv.proc is not None
    assert os.readlink(f"/proc/{srv.pid}/cwd") == "/"
    with open(f"/proc/{srv.pid}/environ", "rb") as f:
        assert not any(v.startswith(b"PYTHONPATH=") for v in f.read().split(b"\0"))


@installed_only
async def test_kernels_import_what_is_installed_beside_the_server_after_start(srv: KernelpoolServer) -> None:
    """A forked kernel (and one already running) imports a package installed into the server's
    venv after the server started, has the venv's site-packages in its path, nothing of the
    source tree or the server's working folder, and shows ordinary tracebacks."""
    async with mcp_client(srv.url, srv.tokens["ivy"], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": "before.ipynb", "mode": "create"})
        assert not r.is_error, text(r)
        name = f"kp_beside_{os.getpid()}"
        with tempfile.TemporaryDirectory() as tmp:
            _pip("install", "--no-index", "--no-deps", _wheel(tmp, name, "seen-by-kernels"))
        try:
            r = await c.call_tool("use_notebook", {"notebook": "after.ipynb", "mode": "create"})
            assert not r.is_error, text(r)
            probe = f"import sys, json, {name}; print(json.dumps({{'v': {name}.VALUE, 'path': sys.path}}))"
            for nb in ("after.ipynb", "before.ipynb"):
                r = await c.call_tool("execute_code", {"notebook": nb, "code": probe})
                assert not r.is_error, text(r)
                got = json.loads(text(r).strip().splitlines()[-1])
                assert got["v"] == "seen-by-kernels"
                assert SITE in got["path"]
                assert not any(p == ROOT or p.startswith(ROOT + os.sep) for p in got["path"]), got["path"]
                assert "/" not in got["path"], got["path"]
            # not preloaded by the fork server: imported from site-packages in the kernel
            r = await c.call_tool("execute_code", {"notebook": "after.ipynb", "code": "import stack_data; print(stack_data.__file__)"})
            assert not r.is_error and text(r).strip().startswith(SITE), text(r)
            r = await c.call_tool("execute_code", {"notebook": "after.ipynb", "code": "def f():\n    return 1/0\nf()"})
            shown = text(r)
            assert r.structured_content["status"] == "error", shown
            assert "ZeroDivisionError" in shown and "Unexpected exception formatting" not in shown, shown
            assert "return 1/0" in shown, shown  # IPython's own formatting, with the source line
        finally:
            _pip("uninstall", "-y", name)


def test_kernelpool_command_is_the_console_script() -> None:
    cmd = kernelpool_command()
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd="/", timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr
    if not FROM_SOURCE:
        assert cmd == [os.path.join(os.path.dirname(sys.executable), "kernelpool")]
