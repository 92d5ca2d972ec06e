"""The capability list of docs/deployment.md, checked without Docker: the server runs as root
with its capability bounding set cut to that list (`setpriv --bounding-set`, what
`--cap-drop=ALL --cap-add=...` does to a container's root), and a kernel still runs as the
user's uid in its cgroup and saves the notebook as that uid. Dropping one of the capabilities
that uid switching and file ownership need makes it fail. Needs root, a writable cgroup
hierarchy and setpriv (util-linux)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from testkit.client import mcp_client
from testkit.server import KernelpoolServer, kernelpool_command, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

pytestmark = [
    pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"sandbox unavailable: {SANDBOX_SKIP}"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed"),
]

# for the default kernel_network = "egress": sys_admin and net_admin make, join and firewall the
# users' network namespaces
DOCUMENTED = ["setuid", "setgid", "chown", "dac_override", "fowner", "kill", "sys_admin", "net_admin"]


class CappedServer(KernelpoolServer):
    caps: list[str] = []

    def start(self, *extra: str, wait: float = 60, port: int | None = None) -> None:
        bounding = "-all," + ",".join(f"+{c}" for c in self.caps)
        self.command = ["setpriv", "--bounding-set", bounding, "--", *kernelpool_command()]
        try:
            super().start(*extra, wait=wait, port=port)
        finally:
            # only the server runs capped: the CLI of cleanup() must be able to remove the accounts
            # (capped, `users remove` failed and left one account behind per run)
            self.command = kernelpool_command()


def _capped(caps: list[str]) -> CappedServer:
    server = CappedServer(make_data_dir(), server_env())
    server.caps = caps
    return server


async def test_documented_capabilities_suffice() -> None:
    server = _capped(DOCUMENTED)
    try:
        token = server.add_user("capuser")
        server.start()
        status = Path(f"/proc/{server.pid}/status").read_text() if server.proc else ""
        assert "CapBnd:\t00000000002010eb" in status  # exactly the eight
        async with mcp_client(server.url, token) as client:
            r = await client.call_tool("use_notebook", {"notebook": "caps.ipynb", "mode": "create"})
            assert not r.is_error, r.content
            r = await client.call_tool("insert_execute_code_cell",
                                       {"cell_index": -1, "cell_source": "import os; os.getuid()"})
            assert not r.is_error, r.content
        uid = int(r.structured_content["outputs"][0]["text"])
        assert uid != 0
        path = os.path.join(server.data_dir, "users", "capuser", "caps.ipynb")
        assert os.stat(path).st_uid == uid
    finally:
        server.cleanup()


@pytest.mark.parametrize("missing", ["setuid", "chown", "dac_override", "net_admin", "sys_admin"])
async def test_without_one_it_fails(missing: str) -> None:
    server = _capped([c for c in DOCUMENTED if c != missing])
    try:
        token = server.add_user("capuser")
        try:
            server.start()
        except RuntimeError:  # refused to start: a failure, as expected
            return
        async with mcp_client(server.url, token) as client:
            r = await client.call_tool("use_notebook", {"notebook": "caps.ipynb", "mode": "create"})
            if not r.is_error:
                r = await client.call_tool("execute_code", {"code": "1+1", "notebook": "caps.ipynb"})
            assert r.is_error, f"worked without {missing}"
    except Exception as exc:
        if "worked without" in str(exc):
            raise
    finally:
        server.cleanup()
