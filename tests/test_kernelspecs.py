"""Kernels of other languages and environments: Bash (bash_kernel), R (IRkernel) and a second
Python environment (its own venv with ipykernel), each in its own notebook, recorded there, and
isolated like the server's Python: real kernels on a real server, attacked from inside.

The second environment and bash_kernel are installed by this module into a venv of their own
(cached in /var/tmp between runs); IRkernel comes from Debian (`r-cran-irkernel`, installed by
.ci/run): without it the R cases are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from typing import Any

import nbformat
import pytest

from testkit.client import mcp_client, text
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"kernels cannot be isolated here: {SANDBOX_SKIP}")

KERNELS_VENV = "/var/tmp/kp-test-kernels-venv"  # reachable by users' uids (not below /tmp, not in /root)
HAS_R = os.path.isfile("/usr/share/jupyter/kernels/ir/kernel.json")
R_SKIP = pytest.mark.skipif(not HAS_R, reason="IRkernel is not installed (apt-get install r-cran-irkernel)")
MEMORY = "256M"


def _kernels_venv() -> str:
    """A venv with ipykernel and bash_kernel, their kernelspecs in its share/jupyter: 'py2env' and 'bash'."""
    marker = os.path.join(KERNELS_VENV, ".ready")
    if not os.path.exists(marker):
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--clear", KERNELS_VENV], check=True)
        os.chmod(KERNELS_VENV, 0o755)
        py = os.path.join(KERNELS_VENV, "bin", "python")
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "ipykernel", "bash_kernel"],
                       check=True)
        subprocess.run([py, "-m", "ipykernel", "install", "--prefix", KERNELS_VENV, "--name", "py2env",
                        "--display-name", "Python (second environment)"], check=True, capture_output=True)
        subprocess.run([py, "-m", "bash_kernel.install", "--prefix", KERNELS_VENV], check=True, capture_output=True)
        open(marker, "w").close()
    return os.path.join(KERNELS_VENV, "share", "jupyter")


@pytest.fixture(scope="module")
def ks() -> Iterator[KernelpoolServer]:
    specs = "bash,py2env" + (",ir" if HAS_R else "")
    server = KernelpoolServer(make_data_dir(), server_env(
        JUPYTER_PATH=_kernels_venv(), KERNELPOOL_KERNELSPECS=specs, KERNELPOOL_KERNELSPEC_POOL_SIZES="bash=1",
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_KERNEL_MEMORY=MEMORY, KERNELPOOL_EXECUTE_TIMEOUT="60"))
    try:
        for name in ("alice", "bob"):
            server.add_user(name)
        server.start()
        yield server
    finally:
        server.cleanup()


async def run(server: KernelpoolServer, user: str, notebook: str, kernel: str, code: str) -> Any:
    """Run `code` in `user`'s notebook of `kernel` (created if new); the tool result."""
    async with mcp_client(server.url, server.tokens[user], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create", "kernel": kernel})
        if r.is_error and "already exists" not in text(r):
            raise AssertionError(text(r))
        return await c.call_tool("execute_code", {"notebook": notebook, "code": code})


def on_disk(server: KernelpoolServer, user: str, path: str) -> nbformat.NotebookNode:
    return nbformat.read(os.path.join(server.data_dir, "users", user, path), as_version=4)


def account(server: KernelpoolServer, user: str) -> pwd.struct_passwd:
    return pwd.getpwnam(f"{server.env['KERNELPOOL_ACCOUNT_PREFIX']}{user}")


async def test_each_kernel_runs_in_its_notebook_and_is_recorded_there(ks: KernelpoolServer) -> None:
    cases = [("sub/sh.ipynb", "bash", "echo $((6*7)) $(basename $PWD)", "42 sub", "bash"),
             ("py2.ipynb", "py2env", "import sys; print(sys.prefix)", KERNELS_VENV, "python")]
    if HAS_R:
        cases.append(("sub/r.ipynb", "ir", "cat(6*7, basename(getwd()))", "42 sub", "R"))
    async with mcp_client(ks.url, ks.tokens["alice"], mode="legacy") as c:
        listed = (await c.call_tool("list_kernelspecs", {})).structured_content["kernelspecs"]
        assert [s["name"] for s in listed] == ["python3", "bash", "py2env"] + (["ir"] if HAS_R else [])
        assert listed[0]["default"] and {s["language"] for s in listed} >= {"python", "bash"}
        for path, kernel, code, said, language in cases:
            r = await c.call_tool("use_notebook", {"notebook": path, "mode": "create", "kernel": kernel})
            assert not r.is_error and r.structured_content["kernel"] == kernel, text(r)
            r = await c.call_tool("insert_execute_code_cell", {"notebook": path, "cell_index": -1, "cell_source": code})
            assert not r.is_error and said in text(r), (kernel, text(r))
            nb = on_disk(ks, "alice", path)
            nbformat.validate(nb)
            assert nb.metadata.kernelspec.name == kernel and nb.metadata.kernelspec.language == language
            assert nb.metadata.language_info.name == language.lower()
            assert said in "".join(o.get("text", "") for o in nb.cells[0].outputs), nb.cells[0].outputs
        kernels = {k["notebook"]: k["kernel"] for k in (await c.call_tool("list_kernels", {})).structured_content["kernels"]}
        assert {p: kernels[p] for p, *_ in cases} == {p: k for p, k, *_ in cases}
        # restart keeps the kind; an existing notebook opens with its own kernel
        r = await c.call_tool("restart_notebook", {"notebook": "sub/sh.ipynb"})
        assert r.structured_content["kernel"] == "bash", text(r)
        assert not (await c.call_tool("unuse_notebook", {"notebook": "py2.ipynb"})).is_error
        r = await c.call_tool("use_notebook", {"notebook": "py2.ipynb"})
        assert r.structured_content["kernel"] == "py2env", text(r)
        r = await c.call_tool("execute_code", {"notebook": "sub/sh.ipynb", "code": "echo $BASH_VERSION"})
        assert text(r).strip()[:1].isdigit(), text(r)


async def test_kernels_not_offered_are_refused_with_the_list(ks: KernelpoolServer) -> None:
    folder = os.path.join(ks.data_dir, "users", "bob")
    async with mcp_client(ks.url, ks.tokens["bob"], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": "j.ipynb", "mode": "create", "kernel": "julia-1.9"})
        assert r.is_error and "'julia-1.9' is not offered" in text(r) and "bash (Bash)" in text(r), text(r)
        assert not os.path.exists(os.path.join(folder, "j.ipynb"))
        # a notebook made elsewhere with a kernel this server does not offer
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "julia-1.9", "display_name": "Julia", "language": "julia"}
        assert not (await c.call_tool("write_file", {"path": "j.ipynb", "content": nbformat.writes(nb)})).is_error
        for tool, args in (("use_notebook", {}), ("execute_code", {"code": "1"}), ("restart_notebook", {})):
            r = await c.call_tool(tool, {"notebook": "j.ipynb", **args})
            assert r.is_error and "'julia-1.9' is not offered" in text(r) and "python3" in text(r), (tool, text(r))
        assert not (await c.call_tool("list_kernels", {})).structured_content["kernels"]
        # an existing notebook keeps its kernel
        assert not (await c.call_tool("use_notebook", {"notebook": "s.ipynb", "mode": "create", "kernel": "bash"})).is_error
        r = await c.call_tool("use_notebook", {"notebook": "s.ipynb", "kernel": "python3"})
        assert r.is_error and "records kernel 'bash'" in text(r), text(r)


BASH_PROBE = r'''
own=$(id -u); others=0
for p in /proc/[0-9]*; do [ "$(stat -c %u $p 2>/dev/null || echo $own)" = "$own" ] || others=$((others+1)); done
cat {bob}/secret.ipynb >/dev/null 2>&1 && bob=ALLOWED || bob=denied
ls {bob} >/dev/null 2>&1 && bobls=ALLOWED || bobls=denied
cat /etc/shadow >/dev/null 2>&1 && shadow=ALLOWED || shadow=denied
(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && port=ALLOWED || port=refused
printf '{{"uid": %s, "others": %s, "server": %s, "bob": "%s", "bobls": "%s", "shadow": "%s", "port": "%s", "passwd": %s}}\n' \
  $own $others $([ -e /proc/{server} ] && echo true || echo false) $bob $bobls $shadow $port $(grep -c . /etc/passwd)
'''

R_PROBE = r'''
own <- as.integer(system("id -u", intern = TRUE))
pids <- grep("^[0-9]+$", list.files("/proc"), value = TRUE)
others <- sum(sapply(pids, function(p) {{ i <- file.info(file.path("/proc", p))$uid; !is.na(i) && i != own }}))
try_read <- function(path) tryCatch({{ suppressWarnings(readLines(path, n = 1)); "ALLOWED" }}, error = function(e) "denied")
con <- tryCatch({{ s <- suppressWarnings(socketConnection("127.0.0.1", {port}, open = "r+b", timeout = 3)); close(s); "ALLOWED" }},
                error = function(e) "refused")
cat(sprintf('{{"uid": %d, "others": %d, "server": %s, "bob": "%s", "bobls": "%s", "shadow": "%s", "port": "%s", "passwd": %d}}\n',
    own, others, tolower(file.exists("/proc/{server}")), try_read("{bob}/secret.ipynb"),
    if (length(tryCatch(list.files("{bob}"), warning = function(w) NULL)) > 0) "ALLOWED" else "denied",
    try_read("/etc/shadow"), con, length(readLines("/etc/passwd"))))
'''


@pytest.mark.parametrize("kernel", ["bash", pytest.param("ir", marks=R_SKIP)])
async def test_other_kernels_are_isolated_like_python(ks: KernelpoolServer, kernel: str) -> None:
    assert (await run(ks, "bob", "secret.ipynb", "python3", "SECRET = 1")).is_error is False
    bob = os.path.join(ks.data_dir, "users", "bob")
    server_pid = ks.proc.pid if ks.proc else 1
    probe = (BASH_PROBE if kernel == "bash" else R_PROBE).format(bob=bob, port=ks.port, server=server_pid)
    r = await run(ks, "alice", f"probe-{kernel}.ipynb", kernel, probe)
    assert not r.is_error, text(r)
    got = json.loads(text(r).strip().splitlines()[-1])
    assert got == {"uid": account(ks, "alice").pw_uid, "others": 0, "server": False, "bob": "denied",
                   "bobls": "denied", "shadow": "denied", "port": "refused", "passwd": got["passwd"]}, got
    assert got["passwd"] <= 3, "the kernel's /etc/passwd names its own user (and root, nobody) only"


async def test_bash_memory_over_the_limit_is_killed_in_its_cgroup(ks: KernelpoolServer) -> None:
    code = "x=$(head -c 600M /dev/zero | tr '\\0' a); echo survived ${#x}"
    r = await run(ks, "alice", "oom-sh.ipynb", "bash", code)
    said = text(r)
    assert "survived" not in said, said
    # bash_kernel restarts the bash the OOM killer took; the server says why, in words
    assert "killed because it ran out of memory (limit 256.0 MiB)" in r.structured_content["message"], said
    # the kernel (or a fresh one) still answers; bob's kernel was never touched
    r = await run(ks, "alice", "oom-sh.ipynb", "bash", "echo fine")
    assert "fine" in text(r), text(r)


@R_SKIP
async def test_r_memory_over_the_limit_kills_the_kernel_with_its_cause(ks: KernelpoolServer) -> None:
    r = await run(ks, "alice", "oom-r.ipynb", "ir", "x <- numeric(1e8); x[1] <- 1; cat('survived')")
    assert r.is_error, text(r)
    message = r.structured_content["message"]
    assert "out of memory" in message and "256 MiB" in message, message
    r = await run(ks, "alice", "oom-r.ipynb", "ir", "cat(exists('x'))")
    assert text(r).strip() == "FALSE", "the next call gets a fresh R kernel"
    await asyncio.sleep(0)


def test_a_kernelspec_that_is_missing_or_sets_who_the_user_is_stops_the_server(tmp_path: Any) -> None:
    bad = tmp_path / "kernels" / "badenv"
    bad.mkdir(parents=True)
    (bad / "kernel.json").write_text(json.dumps({
        "argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Bad", "language": "python", "env": {"HOME": "/root"}}))
    os.chmod(tmp_path, 0o755)
    for specs, said in (("nosuch", "'nosuch' is not installed where Jupyter looks"), ("badenv", "sets HOME in its env")):
        server = KernelpoolServer(make_data_dir(), server_env(JUPYTER_PATH=str(tmp_path), KERNELPOOL_KERNELSPECS=specs))
        try:
            with pytest.raises(RuntimeError) as failed:
                server.start(wait=30)
            assert said in str(failed.value), str(failed.value)[-2000:]
        finally:
            server.cleanup()
