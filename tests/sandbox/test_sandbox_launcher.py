"""spawn/enter for real, as root: ids, no_new_privs, umask, cgroup, network namespace."""

from __future__ import annotations

import json
import os
import socket
import textwrap
from pathlib import Path

import pytest

from sandbox import CgroupBackend, Identity, LaunchError, LaunchSpec, Limits, spawn

REPORT = """
import json, os, socket
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
umask = os.umask(0)
print(json.dumps({
    "resuid": os.getresuid(), "resgid": os.getresgid(), "groups": os.getgroups(),
    "umask": umask, "nnp": status["NoNewPrivs"].strip(), "cwd": os.getcwd(),
    "cgroup": open("/proc/self/cgroup").read(), "env": dict(os.environ),
    "ifaces": [name for _, name in socket.if_nameindex()], "sid": os.getsid(0), "pid": os.getpid(),
}))
"""

ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


def run(spec: LaunchSpec) -> tuple[int, str]:
    r, w = os.pipe()
    try:
        spec.stdout = spec.stderr = w
        proc = spawn(spec)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as out:
        text = out.read().decode()
    return proc.wait(timeout=30), text


def test_child_runs_as_configured(v1: CgroupBackend, identity: Identity, user_python: str) -> None:
    cg = v1.create("alice/k-1", Limits(pids=64))
    os.environ["KPTEST_SERVER_SECRET"] = "must not leak"
    try:
        code, out = run(LaunchSpec([user_python, "-c", REPORT], dict(ENV), identity.home, identity, cg))
    finally:
        del os.environ["KPTEST_SERVER_SECRET"]
    assert code == 0, out
    seen = json.loads(out)
    assert seen["resuid"] == [identity.uid] * 3
    assert seen["resgid"] == [identity.gid] * 3
    assert seen["groups"] == []
    assert seen["umask"] == 0o077
    assert seen["nnp"] == "1"
    assert seen["cwd"] == identity.home
    assert seen["env"] == ENV
    assert seen["sid"] == seen["pid"]  # leads its own session
    lines = dict(line.split(":", 2)[1:] for line in seen["cgroup"].splitlines())
    for controller in ("memory", "cpu", "pids"):
        assert lines[controller].endswith(f"/{v1.prefix}/alice/k-1"), lines
    assert seen["ifaces"] == [name for _, name in socket.if_nameindex()]  # host network by default


def test_network_none_has_only_loopback(identity: Identity, user_python: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code_text = f"""
    import socket
    print(sorted(name for _, name in socket.if_nameindex()))
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2)
        print("reached the host")
    except OSError as exc:
        print("refused", type(exc).__name__)
    own = socket.socket(); own.bind(("127.0.0.1", 0)); own.listen()
    socket.create_connection(own.getsockname(), timeout=2)
    print("loopback up")
    """
    try:
        code, out = run(
            LaunchSpec([user_python, "-c", textwrap.dedent(code_text)], dict(ENV), identity.home, identity, network="none")
        )
        listener.setblocking(False)  # noqa: FBT003 (the socket module takes no keyword)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert code == 0, out
    assert out.splitlines() == ["['lo']", "refused ConnectionRefusedError", "loopback up"]


def test_failure_in_enter_never_execs(identity: Identity) -> None:
    marker = os.path.join(identity.home, "ran")
    spec = LaunchSpec(["/usr/bin/touch", marker], dict(ENV), "/nonexistent/dir", identity)
    with pytest.raises(LaunchError) as caught:
        spawn(spec)
    assert caught.value.step == "chdir"
    assert "No such file" in str(caught.value)
    assert not os.path.exists(marker)


def test_cwd_is_entered_as_the_user_not_as_root(identity: Identity) -> None:
    # a root-only folder: root could chdir there, the user cannot, so the order is visible
    private = os.path.join(identity.home, "root-only")
    os.mkdir(private, 0o700)
    os.chown(private, 0, 0)
    marker = os.path.join(identity.home, "ran")
    with pytest.raises(LaunchError, match="Permission denied") as caught:
        spawn(LaunchSpec(["/usr/bin/touch", marker], dict(ENV), private, identity))
    assert caught.value.step == "chdir"
    assert not os.path.exists(marker)


def test_unjoinable_cgroup_never_execs(v1: CgroupBackend, identity: Identity) -> None:
    cg = v1.create("bob/k-1", Limits())
    cg.remove()  # the object now points at directories that are gone
    marker = os.path.join(identity.home, "ran")
    with pytest.raises(LaunchError) as caught:
        spawn(LaunchSpec(["/usr/bin/touch", marker], dict(ENV), identity.home, identity, cg))
    assert caught.value.step == "join cgroup"
    assert not os.path.exists(marker)


def test_dev_mode_without_identity(user_python: str) -> None:
    code, out = run(LaunchSpec([user_python, "-c", REPORT], dict(ENV), "/", umask=0o027))
    assert code == 0, out
    seen = json.loads(out)
    assert seen["resuid"] == [os.geteuid()] * 3
    assert seen["nnp"] == "1" and seen["umask"] == 0o027


def test_exec_failure_is_an_oserror() -> None:
    with pytest.raises(FileNotFoundError):
        spawn(LaunchSpec(["/nonexistent/binary"], dict(ENV), "/"))


def test_default_streams_are_devnull(user_python: str) -> None:
    proc = spawn(LaunchSpec([user_python, "-c", "print('x' * 100000)"], dict(ENV), "/"))
    assert proc.wait(timeout=30) == 0
    assert proc.stdin is None and proc.stdout is None


def test_spec_is_checked_in_the_parent() -> None:
    with pytest.raises(LaunchError):
        spawn(LaunchSpec([], {}, "/"))
    with pytest.raises(LaunchError):
        spawn(LaunchSpec(["/bin/true"], {}, "relative"))
    with pytest.raises(LaunchError):
        spawn(LaunchSpec(["/bin/true"], {}, "/", network="bridge"))  # type: ignore[arg-type]


def test_spec_travels_as_json() -> None:
    """`to_json`/`from_json`: how kernelpool's fork server hands a spec to the child that enters it."""
    from sandbox.launcher import CgroupProcs

    spec = LaunchSpec(
        ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "/run/k.json"], {"PATH": "/usr/bin", "HOME": "/h"}, "/h",
        Identity("kp-alice", 20001, 20001, "/h"), CgroupProcs(("/sys/fs/cgroup/x/cgroup.procs",)),
        network="none", netns="/run/netns/kp-20001", umask=0o027, private_views=True, tmpfs_bytes=1 << 20,
        keep_paths=("/tmp/a",), hide_mounts_below=("/data/users",), seccomp=True,
        replaced_files={"/etc/passwd": "root:x:0:0::/root:/bin/sh\n"},
    )
    back = LaunchSpec.from_json(spec.to_json())
    assert back == spec and back.cgroup is not None
    assert back.cgroup.procs_files() == ["/sys/fs/cgroup/x/cgroup.procs"]
    assert LaunchSpec.from_json(LaunchSpec(["/bin/true"], {}, "/").to_json()) == LaunchSpec(["/bin/true"], {}, "/")
    with pytest.raises(ValueError):
        LaunchSpec(["/bin/true"], {}, "/", stdout=1).to_json()  # a descriptor of this process cannot travel


VIEWS = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    return "ok" if libc.syscall(nr, *args) >= 0 else errno.errorcode[ctypes.get_errno()]
st = os.statvfs("/tmp")
print(json.dumps({
    "tmp": os.listdir("/tmp"), "shm": os.listdir("/dev/shm"), "tmp_size": st.f_blocks * st.f_frsize,
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "pid": os.getpid(),
    "cgroup": open("/proc/self/cgroup").read(), "cgroupfs": sorted(os.listdir("/sys/fs/cgroup")),
    "memory_below": [d for d in os.listdir("/sys/fs/cgroup/memory") if os.path.isdir("/sys/fs/cgroup/memory/" + d)],
    "seccomp": open("/proc/self/status").read().split("Seccomp:")[1].split()[0],
    "unshare_userns": call(272, 0x10000000), "io_uring_setup": call(425, 1, ctypes.create_string_buffer(120)),
    "net": sorted(os.listdir("/sys/class/net")), "sysvipc": open("/proc/sysvipc/shm").read().splitlines()[1:],
    "shmmax": int(open("/proc/sys/kernel/shmmax").read()), "pts": sorted(os.listdir("/dev/pts")),
    "passwd": open("/etc/passwd").read(), "group": open("/etc/group").read(),
    "netns": os.listdir("/run/netns") if os.path.isdir("/run/netns") else [],
}))
"""


def test_private_views_and_seccomp(v1: CgroupBackend, identity: Identity, user_python: str) -> None:
    import ctypes

    from sandbox.passwd import kernel_files

    cg = v1.create("u1/kviews", Limits(memory_bytes=256 << 20))
    marker = f"/tmp/kptest-host-{os.getpid()}"
    open(marker, "w").close()
    libc = ctypes.CDLL(None, use_errno=True)
    host_segment = libc.shmget(0, 4096, 0o1644)  # a SysV segment of the host's, which the child must not see
    assert host_segment >= 0
    try:
        spec = LaunchSpec([user_python, "-c", VIEWS], dict(ENV), identity.home, identity, cg, network="none",
                          private_views=True, tmpfs_bytes=8 << 20, seccomp=True, replaced_files=kernel_files(identity))
        code, out = run(spec)
        assert code == 0, out
        seen = json.loads(out)
    finally:
        os.unlink(marker)
        libc.shmctl(host_segment, 0, None)  # IPC_RMID
    # a fresh tmpfs, not the host's /tmp: only the way to the child's own folder (the test's home is there)
    home_top = identity.home.split("/")[2] if identity.home.startswith("/tmp/") else None
    assert seen["tmp"] == ([home_top] if home_top else []) and seen["shm"] == [], seen["tmp"]
    assert seen["tmp_size"] == 8 << 20
    assert seen["pids"] == [seen["pid"]], "hidepid: this test (root) is invisible to the child"
    assert all(line.endswith(":/") for line in seen["cgroup"].splitlines()), seen["cgroup"]
    assert {"memory", "cpu", "pids"} <= set(seen["cgroupfs"]) and seen["memory_below"] == []
    assert seen["seccomp"] == "2" and seen["unshare_userns"] == seen["io_uring_setup"] == "EPERM"
    # its own IPC namespace (capped like its tmpfs), the sysfs of its network namespace, a pty instance,
    # account files with only its own user, no network namespace names
    assert seen["sysvipc"] == [] and seen["shmmax"] == 8 << 20
    assert seen["net"] == ["lo"] and seen["pts"] == ["ptmx"] and seen["netns"] == []
    assert seen["passwd"] == kernel_files(identity)["/etc/passwd"] and seen["group"] == kernel_files(identity)["/etc/group"]
    assert f"{identity.name}:x:{identity.uid}:{identity.gid}::{identity.home}:" in seen["passwd"]
    assert "hidepid" not in Path("/proc/self/mountinfo").read_text(), "nothing leaked into the host's mounts"


def test_failing_view_step_is_named_and_never_execs(v1: CgroupBackend, identity: Identity, user_python: str,
                                                     tmp_path: Path) -> None:
    cg = v1.create("u1/kbad", Limits())
    ran = tmp_path / "ran"
    spec = LaunchSpec([user_python, "-c", f"open({str(ran)!r}, 'w')"], dict(ENV), identity.home, identity, cg,
                      private_views=True, keep_paths=("/tmp/kptest-no-such-folder/x",))
    with pytest.raises(LaunchError) as info:
        spawn(spec)
    assert info.value.step == "private /tmp"
    assert not ran.exists()


def test_cgroup_v2_view_is_rooted_at_the_kernels_cgroup(root_only: None) -> None:
    # a cgroup v2 host's layout (the unified tree is all of the root) cannot be had on this v1 host:
    # its cgroup2 mount at /sys/fs/cgroup/unified (no controllers) stands in for /sys/fs/cgroup
    from sandbox import views

    unified = "/sys/fs/cgroup/unified"
    if not os.path.exists(os.path.join(unified, "cgroup.procs")):
        pytest.skip("no cgroup2 mount at /sys/fs/cgroup/unified on this host")
    top = os.path.join(unified, f"kptest-v2-{os.getpid()}")
    leaf = os.path.join(top, "u1", "k1")
    os.makedirs(leaf)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                    f.write("0")
                views.enter_mount_namespace()
                views.enter_cgroup_namespace()
                views.private_cgroupfs([os.path.join(leaf, "cgroup.procs")], root=unified)
                below = [d for d in os.listdir(unified) if os.path.isdir(os.path.join(unified, d))]
                os.write(w, json.dumps({"below": below, "procs": Path(unified, "cgroup.procs").read_text().split(),
                                        "self": Path("/proc/self/cgroup").read_text()}).encode())
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as out:
            seen = json.loads(out.read())
        os.waitpid(pid, 0)
    finally:
        if w != -1:
            os.close(w)
        for path in (leaf, os.path.dirname(leaf), top):
            os.rmdir(path)
    assert seen["below"] == [], "no other cgroup listed"
    assert seen["procs"] == [str(pid)], "the root of the view is the child's own cgroup"
    assert seen["self"].strip().endswith("0::/")
