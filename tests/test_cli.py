"""The `kernelpool` command as a user runs it: real processes, a real data folder."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx2
import pytest

from testkit.client import mcp_client
from testkit.server import NEUTRAL_CWD, KernelpoolServer, free_port, server_env
from tests.conftest import METRICS_TOKEN, SANDBOX_SKIP


def test_users_and_tokens(fresh_server: KernelpoolServer) -> None:
    kp = fresh_server
    out = kp.cli("users", "add", "dana")
    assert re.fullmatch(r"kp_[0-9a-f]{8}_[0-9a-f]{16}_[A-Za-z0-9_-]{43}\n", out.stdout), "the token (id, user key, secret) alone on stdout"
    assert "created user dana" in out.stderr
    kp.tokens["dana"] = out.stdout.strip()
    assert kp.cli("users", "list").stdout.split("\t")[0] == "dana"

    dup = kp.cli("users", "add", "dana", check=False)
    assert dup.returncode == 2 and "already exists" in dup.stderr and dup.stdout == ""
    bad = kp.cli("users", "add", "../etc", check=False)
    assert bad.returncode == 2 and "invalid user name" in bad.stderr
    assert kp.cli("users", "list").stdout.count("\n") == 1, "bad input added nothing"

    second = kp.cli("tokens", "create", "dana", "--expires", "30d").stdout.strip()
    listed = kp.cli("tokens", "list", "dana").stdout.splitlines()
    assert len(listed) == 2 and all("\tactive\t" in line for line in listed)
    token_id = second.split("_")[1]
    kp.cli("tokens", "revoke", token_id)
    states = sorted(line.split("\t")[2] for line in kp.cli("tokens", "list", "dana").stdout.splitlines())
    assert states == ["active", "revoked"]
    again = kp.cli("tokens", "revoke", token_id, check=False)
    assert again.returncode == 2
    nouser = kp.cli("tokens", "create", "nobody-here", check=False)
    assert nouser.returncode == 2 and "no such user" in nouser.stderr
    # only hashes are stored: the token text is nowhere in the database
    db = Path(os.path.join(kp.data_dir, "kernelpool.db")).read_bytes()
    assert kp.tokens["dana"].encode() not in db and second.encode() not in db

    limits = kp.cli("users", "set-limits", "dana", "--memory", "nonsense", check=False)
    assert limits.returncode == 2 and "memory" in limits.stderr.lower()
    kp.cli("users", "set-limits", "dana", "--memory", "512M", "--cpus", "0.5", "--pids", "100")
    assert "kernel_memory=512M" in kp.cli("users", "list").stdout

    kp.cli("users", "remove", "dana")
    del kp.tokens["dana"]
    assert kp.cli("users", "list").stdout == ""
    gone = kp.cli("users", "remove", "dana", check=False)
    assert gone.returncode == 2 and "no such user" in gone.stderr


async def test_first_start_creates_a_user_and_prints_its_token_once(fresh_server: KernelpoolServer, server_args: list[str]) -> None:
    kp = fresh_server
    kp.start(*server_args)
    printed = kp.log()
    match = re.search(r"created user 'default'.*?\n\s+(kp_\S+)\n", printed, re.S)
    assert match, printed
    kp.tokens["default"] = match.group(1)
    assert f"http://127.0.0.1:{kp.port}/mcp" in printed
    async with mcp_client(kp.url, kp.tokens["default"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "hello.ipynb", "mode": "create"})
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "hello.ipynb", "cell_index": -1, "cell_source": "1+1"})
        assert [b.text for b in r.content] == ["2"]
    kp.stop()
    kp.start(*server_args)
    assert kp.log().count("created user") == 1, "a second start creates nobody"


async def _kernel_limits(kp: KernelpoolServer, user: str, notebook: str) -> tuple[int, str]:
    """The memory limit and pids.max of `user`'s kernel for `notebook` (started if new)."""
    async with mcp_client(kp.url, kp.tokens[user], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": "import os; print(os.getpid())"})
        pid = int(r.content[0].text)
    # the kernel sees only its own cgroup (a cgroup namespace): read its path from the host
    with open(f"/proc/{pid}/cgroup") as f:
        cg = dict(line.split(":", 2)[1:] for line in f.read().splitlines())
    memory = int(Path(f"/sys/fs/cgroup/memory{cg['memory']}/memory.limit_in_bytes").read_text())
    return memory, Path(f"/sys/fs/cgroup/pids{cg['pids']}/pids.max").read_text().strip()


async def test_limits_set_from_the_cli_reach_new_kernels(fresh_server: KernelpoolServer) -> None:
    if SANDBOX_SKIP:
        pytest.skip(f"needs cgroups: {SANDBOX_SKIP}")
    kp = fresh_server
    kp.add_user("erin")
    kp.cli("users", "set-limits", "erin", "--memory", "300M", "--pids", "77")
    kp.env["KERNELPOOL_METRICS_TOKEN"] = METRICS_TOKEN
    kp.start()
    assert await _kernel_limits(kp, "erin", "l.ipynb") == (300 * 2**20, "77")
    # erin's warm kernel (pool_size 1) was started with those limits; new ones reach her next
    # kernel all the same: the stale warm one is not handed out
    metrics = f"{kp.base}/metrics"
    deadline = time.monotonic() + 30
    while 'kernelpool_kernels{state="warm",user="erin"} 1.0' not in httpx2.get(
            metrics, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text:
        assert time.monotonic() < deadline, "erin's warm kernel did not start"
        await asyncio.sleep(0.1)
    kp.cli("users", "set-limits", "erin", "--memory", "200M", "--pids", "55")
    assert await _kernel_limits(kp, "erin", "m.ipynb") == (200 * 2**20, "55")


def test_serving_without_isolation_is_refused_unless_asked_for(fresh_server: KernelpoolServer) -> None:
    kp = fresh_server
    kp.add_user("fay")
    # an interpreter that other uids cannot run stands for a host that cannot isolate
    env = kp.env | {"KERNELPOOL_KERNEL_PYTHON": "/root/no-such/python"}
    proc = subprocess.run(
        [*kp.command, "serve", "--data-dir", kp.data_dir, "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60, cwd=NEUTRAL_CWD,
    )
    assert proc.returncode != 0
    assert "cannot isolate kernels" in proc.stderr and "--insecure-no-sandbox" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_insecure_mode_says_so(fresh_server: KernelpoolServer) -> None:
    kp = fresh_server
    kp.add_user("gus")
    kp.start("--insecure-no-sandbox")
    health = httpx2.get(f"{kp.base}/healthz").json()
    assert health["isolation"]["sandboxed"] is False
    assert any("WITHOUT isolation" in w for w in health["isolation"]["warnings"])
    assert "WITHOUT isolation" in kp.log()


def test_doctor_reports_the_host(fresh_server: KernelpoolServer) -> None:
    out = fresh_server.cli("doctor", "--json", check=False)
    report = json.loads(out.stdout)
    assert report["host"]["root"] == (os.geteuid() == 0)
    if SANDBOX_SKIP is None:
        assert out.returncode == 0
        assert report["in_force"]["sandboxed"] is True
        assert report["in_force"]["cgroup_version"] in (1, 2)
    else:
        assert out.returncode == 1 and "cannot isolate" in report["in_force"]["error"]
    text = fresh_server.cli("doctor", check=False).stdout
    assert "switch uids:" in text and "in force:" in text


async def test_configuration_file(fresh_server: KernelpoolServer, server_args: list[str], tmp_path) -> None:
    kp = fresh_server
    cfg = tmp_path / "kp.toml"
    cfg.write_text('first_user = "zed"\nmax_output_chars = 150\n')
    kp.start("--config", str(cfg), *server_args)
    match = re.search(r"created user 'zed'.*?\n\s+(kp_\S+)\n", kp.log(), re.S)
    assert match, kp.log()
    kp.tokens["zed"] = match.group(1)
    async with mcp_client(kp.url, kp.tokens["zed"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "big.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "big.ipynb", "code": "print('x' * 1000)"})
        shown = r.content[0].text
        assert len(shown) < 300 and "characters cut" in shown
    bad = tmp_path / "bad.toml"
    bad.write_text('no_such_setting = 1\n')
    proc = subprocess.run([*kp.command, "serve", "--config", str(bad), "--data-dir", kp.data_dir],
                          env=kp.env, capture_output=True, text=True, timeout=60, cwd=NEUTRAL_CWD)
    assert proc.returncode == 2 and "no_such_setting" in proc.stderr


def test_json_logs(fresh_server: KernelpoolServer, server_args: list[str]) -> None:
    kp = fresh_server
    kp.add_user("lee")
    kp.start("--log-json", *server_args)
    kp.stop()
    lines = [line for line in kp.log().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records and all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert any("Application startup complete" in r["message"] for r in records)


async def test_a_data_folder_users_cannot_reach_is_refused_at_start_with_its_fix(server_args: list[str]) -> None:
    """A data folder below a 0700 folder (root's home, say): kernels, as the users' uids, could not
    reach their folders. The server refuses to start, names the folder and the fix, and makes
    nothing; doctor says the same. With the fix applied, it starts and a kernel runs there."""
    if SANDBOX_SKIP is not None:
        pytest.skip(f"kernels run as the server's own user here ({SANDBOX_SKIP}): any folder it can reach will do")
    parent = tempfile.mkdtemp(prefix="kp-test-0700-", dir="/var/tmp")  # mode 0700
    data = os.path.join(parent, "data")
    kp = KernelpoolServer(data, server_env())
    try:
        proc = subprocess.run([*kp.command, "serve", "--data-dir", data, "--port", str(free_port())],
                              env=kp.env, capture_output=True, text=True, timeout=60, cwd=NEUTRAL_CWD)
        assert proc.returncode == 2, proc
        assert (f"could not reach their folders in the data folder {data}: {parent} is mode drwx------, which other "
                "uids may not pass. Nothing was changed.") in proc.stderr, proc.stderr
        assert "such as /var/lib/kernelpool (--data-dir, KERNELPOOL_DATA_DIR or data_dir" in proc.stderr, proc.stderr
        assert f"chmod o+x {parent}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not os.path.exists(data)
        doctor = kp.cli("doctor", check=False)
        assert doctor.returncode == 1, doctor
        assert "users' folders:      NOT reachable: users' kernels run as the users' own uids" in doctor.stdout
        report = json.loads(kp.cli("doctor", "--json", check=False).stdout)["data_folder"]
        assert report["reachable_by_users"] is False and f"{parent} is mode drwx------" in report["problem"]

        os.chmod(parent, 0o711)  # the fix the message gives
        assert "users' folders:      reachable by users' uids" in kp.cli("doctor").stdout
        kp.add_user("nia")
        kp.start(*server_args)
        async with mcp_client(kp.url, kp.tokens["nia"], mode="auto") as c:
            await c.call_tool("use_notebook", {"notebook": "here.ipynb", "mode": "create"})
            r = await c.call_tool("execute_code", {"notebook": "here.ipynb", "code": "import os; print(os.getcwd(), 1+1)"})
            assert not r.is_error and r.content[0].text.split() == [os.path.join(data, "users", "nia"), "2"], r
    finally:
        kp.cleanup()
        shutil.rmtree(parent, ignore_errors=True)
