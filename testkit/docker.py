"""Docker on this machine for the container tests: the engine, stand-in Debian roots, images.

No image registry can be reached here, so every base is a Debian bookworm root made with
debootstrap from the mirror apt uses, cached in /var/cache/kernelpool-ci between runs, given the
host's CA bundle and imported with `docker import`. Two roots: `IMAGE_ROOT` (python3 with its
venv module: the Dockerfile's stand-in base) and `FRESH_ROOT` (python3 and ca-certificates only:
what a Debian 12 cloud image offers a newcomer; no venv module, no nftables). The engine is
Debian's docker.io, installed with apt when missing; `running_engine` starts `dockerd` when none
answers and stops it afterwards only if it started it. Used by tests/test_docker_image.py and
tests/test_readme.py (see /work/shared/DOCKER-NOTES.md for the facts behind each step).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import pytest

RUN = f"kpci{os.getpid()}"  # every name the container tests make carries it
CACHE = os.environ.get("KERNELPOOL_CI_CACHE", "/var/cache/kernelpool-ci")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# Before anything else in a container with --cgroupns=private and SYS_ADMIN on this cgroup v1
# host: each read-only controller mount is unmounted and mounted afresh read-write (a remount in
# place fails: "mount point is busy"); the private namespace shows the container's own subtree.
V1_REMOUNT = (
    "for c in memory cpu cpuacct pids; do"
    " if grep -q \" /sys/fs/cgroup/$c cgroup ro[, ]\" /proc/self/mounts; then"
    " umount /sys/fs/cgroup/$c && mount -t cgroup -o nosuid,nodev,noexec,$c cgroup /sys/fs/cgroup/$c; fi;"
    " done"
)


def docker(*args: str, timeout: float = 120, check: bool = True, input: str | None = None,
           stdin: IO[bytes] | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=input, stdin=stdin,
                         env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {shlex.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


# ---- the engine ---------------------------------------------------------------------------------

def apt_install(*packages: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            pytest.skip(f"cannot install {' '.join(packages)} with apt: {out.stderr.strip()[-300:]}")


def engine_answers() -> bool:
    with contextlib.suppress(subprocess.TimeoutExpired, FileNotFoundError):
        return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
    return False


@contextlib.contextmanager
def running_engine() -> Iterator[None]:
    """A Docker engine that answers: someone else's, left running, or one started here and stopped
    at the end (its log is kept when it does not stop in time)."""
    missing = [pkg for pkg, cmd in (("docker.io", "dockerd"), ("debootstrap", "debootstrap")) if not shutil.which(cmd)]
    if missing:
        apt_install(*missing)
    if engine_answers():
        yield
        return
    fd, log_path = tempfile.mkstemp(prefix=f"{RUN}-dockerd-", suffix=".log")
    with open(fd, "wb") as log:
        # a private cgroup namespace for every container by default: Compose 1.29 has no `cgroup:`
        # key, and the image's entry point makes its cgroups writable only in a private namespace
        started = subprocess.Popen(["dockerd", "--default-cgroupns-mode", "private"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not engine_answers():
            if started.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as f:
                    pytest.fail(f"dockerd did not come up:\n{f.read()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        started.send_signal(signal.SIGTERM)
        try:
            started.wait(60)
        except subprocess.TimeoutExpired:
            started.kill()  # its log stays, for whoever looks into why
            started.wait(10)
        else:
            os.unlink(log_path)


# ---- stand-in Debian roots and their images -----------------------------------------------------

def debian_mirror() -> str:
    """The mirror apt uses on this host (its bookworm suite), for debootstrap."""
    with contextlib.suppress(OSError), open("/etc/apt/sources.list.d/debian.sources") as f:
        for stanza in f.read().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
            if "bookworm" in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    with contextlib.suppress(OSError), open("/etc/apt/sources.list") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                return parts[1]
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Root:
    name: str  # its folder in CACHE
    packages: str  # debootstrap --include

    @property
    def path(self) -> str:
        return os.path.join(CACHE, self.name)


IMAGE_ROOT = Root("bookworm-rootfs", "python3,python3-venv,python-is-python3,ca-certificates")
FRESH_ROOT = Root("bookworm-fresh-rootfs", "python3,ca-certificates")


def stand_in_root(root: Root) -> str:
    """debootstrap's minimal bookworm root with `root.packages`, made once and kept in CACHE
    (about 80 s and 200-265 MB each). Returns its folder."""
    if os.path.isfile(os.path.join(root.path, "usr", "bin", "python3")):
        return root.path
    os.makedirs(CACHE, exist_ok=True)
    partial = f"{root.path}.{RUN}"
    try:
        out = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={root.packages}", "bookworm", partial, debian_mirror()],
            capture_output=True, text=True, timeout=900,
        )
        assert out.returncode == 0, f"debootstrap failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        shutil.rmtree(root.path, ignore_errors=True)
        os.rename(partial, root.path)  # whole or not at all: a run cut short leaves no half root behind
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root.path


def import_root(root: Root, tag: str) -> None:
    """`root` as the image `tag`, trusting what the host trusts: pip in `docker build` and in the
    container, and `%pip` in kernels (whose environment is built from nothing, so PIP_CERT does
    not reach them: /etc/pip.conf does)."""
    path = stand_in_root(root)
    shutil.copyfile(CA_BUNDLE, os.path.join(path, CA_BUNDLE.lstrip("/")))
    with open(os.path.join(path, "etc", "pip.conf"), "w") as f:
        f.write(f"[global]\ncert = {CA_BUNDLE}\n")
    with subprocess.Popen(["tar", "-C", path, "-c", "."], stdout=subprocess.PIPE) as tar:
        docker("import", "-c", f"ENV PIP_CERT={CA_BUNDLE}", "-c", f"ENV SSL_CERT_FILE={CA_BUNDLE}", "-", tag,
               stdin=tar.stdout, timeout=600)
    assert tar.returncode == 0


# ---- images shared by the container tests of one tree -------------------------------------------

# what the Dockerfile copies (see .dockerignore): the image of a tree is keyed by their contents
IMAGE_INPUTS = ("Dockerfile", "requirements.lock", "pyproject.toml", "README.md", "kernelpool", "sandbox",
                "docker/entrypoint.sh")


def tree_key(root: str) -> str:
    """A hash of the files the image is built from (12 hex digits)."""
    digest = hashlib.sha256()
    for top in IMAGE_INPUTS:
        path = os.path.join(root, top)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, dirs, names in os.walk(path) for f in names
            if "__pycache__" not in d and not f.endswith(".pyc"))
        for name in files:
            digest.update(os.path.relpath(name, root).encode() + b"\0")
            with open(name, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def base_image() -> str:
    """The stand-in base (IMAGE_ROOT imported), made once and kept: its id stays the same, so
    Docker's build cache holds across runs."""
    tag = "kernelpool-ci-base:bookworm"
    if not image_exists(tag):
        import_root(IMAGE_ROOT, tag)
    return tag


def kernelpool_image(root: str) -> str:
    """The kernelpool image of this tree, built once for every container test of the tree
    (tests/test_docker_image.py, tests/test_compose.py) and kept under a tag of its hash; the
    images of other trees are removed when a new one is built."""
    tag = f"kernelpool-ci:tree-{tree_key(root)}"
    if image_exists(tag):
        return tag
    docker("build", "--build-arg", f"BASE={base_image()}", "-t", tag, root, timeout=900,
           env=dict(os.environ, DOCKER_BUILDKIT="0"))
    listed = docker("images", "--format", "{{.Repository}}:{{.Tag}}", "kernelpool-ci").stdout.split()
    for old in listed:
        if old.startswith("kernelpool-ci:tree-") and old != tag:
            docker("rmi", old, check=False)
    return tag
