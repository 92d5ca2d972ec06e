"""SafeRoot against a real temp folder with links planted the way a user's kernel could."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from sandbox import FileTooLarge, InvalidPath, PathOutsideRoot, SafeRoot, prepare_dir


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret").write_text("top secret")
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "nb.ipynb").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text("a")
    return folder


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/etc/passwd", PathOutsideRoot),
        ("../outside/secret", PathOutsideRoot),
        ("sub/../../outside/secret", PathOutsideRoot),
        ("sub/a\0.txt", InvalidPath),
        ("sub//a.txt", InvalidPath),
        ("sub/", InvalidPath),
        ("./nb.ipynb", InvalidPath),
        ("", InvalidPath),
    ],
)
def test_bad_paths_are_refused_everywhere(root: Path, path: str, error: type[Exception]) -> None:
    safe = SafeRoot(str(root))
    with pytest.raises(error):
        safe.read_bytes(path)
    with pytest.raises(error):
        safe.write_bytes_atomic(path, b"x")
    with pytest.raises(error):
        safe.remove(path)


def test_reads_and_writes_inside(root: Path) -> None:
    safe = SafeRoot(str(root))
    assert safe.read_bytes("sub/a.txt") == b"a"
    safe.write_bytes_atomic("sub/b.txt", b"bee")
    assert (root / "sub" / "b.txt").read_bytes() == b"bee"
    assert safe.exists("sub/b.txt") and not safe.exists("sub/nope")
    with pytest.raises(FileNotFoundError):
        safe.read_bytes("sub/nope")
    with pytest.raises(FileNotFoundError):
        safe.read_bytes("nope/a.txt")
    with pytest.raises(IsADirectoryError):
        safe.read_bytes("sub")
    with pytest.raises(NotADirectoryError):
        safe.listdir("nb.ipynb")


def test_symlink_as_middle_component_is_refused(root: Path, outside: Path) -> None:
    os.symlink(outside, root / "evil")
    os.symlink("/etc", root / "etc")
    safe = SafeRoot(str(root))
    with pytest.raises(InvalidPath, match="symbolic link"):
        safe.read_bytes("evil/secret")
    with pytest.raises(InvalidPath, match="symbolic link"):
        safe.read_bytes("etc/passwd")
    with pytest.raises(InvalidPath):
        safe.write_bytes_atomic("evil/new", b"pwned")
    with pytest.raises(InvalidPath):
        safe.makedirs("evil/deeper")
    with pytest.raises(InvalidPath):
        safe.listdir("evil")
    with pytest.raises(InvalidPath):
        safe.stat("evil/secret")
    with pytest.raises(InvalidPath):
        safe.remove("evil/secret")
    with pytest.raises(InvalidPath):
        safe.rename("nb.ipynb", "evil/stolen")
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "top secret"


def test_symlink_as_final_component_is_refused(root: Path, outside: Path) -> None:
    os.symlink(outside / "secret", root / "link.ipynb")
    os.symlink("/etc/passwd", root / "passwd")
    safe = SafeRoot(str(root))
    with pytest.raises(InvalidPath, match="symbolic link"):
        safe.read_bytes("link.ipynb")
    with pytest.raises(InvalidPath, match="symbolic link"):
        safe.read_bytes("passwd")
    with pytest.raises(InvalidPath):
        safe.write_bytes_atomic("link.ipynb", b"pwned")
    assert (outside / "secret").read_text() == "top secret"
    entry = safe.stat("link.ipynb")
    assert entry is not None and entry.kind == "symlink"
    safe.remove("link.ipynb")  # removes the link, not its target
    assert not (root / "link.ipynb").is_symlink()
    assert (outside / "secret").read_text() == "top secret"


def test_symlinked_root_is_refused(tmp_path: Path, root: Path) -> None:
    os.symlink(root, tmp_path / "alias")
    with pytest.raises(InvalidPath):
        SafeRoot(str(tmp_path / "alias")).read_bytes("nb.ipynb")


def test_listdir_reports_links_without_following(root: Path, outside: Path) -> None:
    os.symlink(outside, root / "dirlink")
    os.symlink(outside / "secret", root / "filelink")
    entries = {e.name: e for e in SafeRoot(str(root)).listdir()}
    assert entries["dirlink"].kind == "symlink"
    assert entries["filelink"].kind == "symlink"
    assert entries["sub"].kind == "dir"
    assert entries["nb.ipynb"].kind == "file" and entries["nb.ipynb"].size == 2
    assert [e.name for e in SafeRoot(str(root)).listdir("sub")] == ["a.txt"]


def test_fifo_is_refused_without_hanging(root: Path) -> None:
    os.mkfifo(root / "pipe")
    with pytest.raises(InvalidPath, match="regular file"):
        SafeRoot(str(root)).read_bytes("pipe")


def test_max_bytes(root: Path) -> None:
    (root / "big").write_bytes(b"x" * 1000)
    safe = SafeRoot(str(root))
    assert safe.read_bytes("big", max_bytes=1000) == b"x" * 1000
    with pytest.raises(FileTooLarge):
        safe.read_bytes("big", max_bytes=999)


def test_a_file_larger_than_fstat_says_is_read_no_further_than_the_limit(root: Path) -> None:
    # a regular file whose size fstat gives as 0 but which reads as megabytes: what a file that a
    # kernel appends to between the server's fstat and its read looks like. /proc/kallsyms is one;
    # a bind mount puts it in the user's folder under a notebook's name
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    target = root / "grows.ipynb"
    target.write_bytes(b"")
    if subprocess.run(["mount", "--bind", "/proc/kallsyms", str(target)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount /proc/kallsyms here")
    try:
        assert os.stat(target).st_size == 0 and len(target.read_bytes()) > 100_000
        with pytest.raises(FileTooLarge) as refused:
            SafeRoot(str(root)).read_bytes("grows.ipynb", max_bytes=1000)
        assert refused.value.grew and refused.value.size == 1001, "read stopped one byte past the limit"
        assert "grew past 1000 bytes" in str(refused.value)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_scan_stops_at_its_limits_and_stats_only_what_it_keeps(root: Path, outside: Path) -> None:
    big = root / "big"
    big.mkdir()
    for i in range(3000):
        (big / f"f{i:05d}").write_bytes(b"x" * (i % 7))
    os.symlink(outside, big / "link")
    safe = SafeRoot(str(root))
    every = safe.scan("big", lambda name, kind: True, limit=10_000, max_scan=10_000)
    assert not every.cut and every.scanned == 3001 and len(every.entries) == 3001
    assert {e.kind for e in every.entries} == {"file", "symlink"}
    page = safe.scan("big", lambda name, kind: True, limit=100, max_scan=10_000)
    assert page.cut and len(page.entries) == 100 and page.scanned == 100
    none = safe.scan("big", lambda name, kind: name.endswith(".nothing"), limit=100, max_scan=500)
    assert none.cut and none.entries == [] and none.scanned == 500
    sizes = {e.name: e.size for e in safe.scan("big", lambda n, k: n.startswith("f001"), 1000, 10_000).entries}
    assert sizes == {f"f{i:05d}": i % 7 for i in range(100, 200)}
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "n.ipynb").write_text("{}")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.ipynb").write_text("{}")
    os.symlink(outside, root / "linked")
    found = safe.walk(lambda name: name.endswith(".ipynb"), limit=100, max_scan=100_000)
    assert sorted(e.name for e in found.entries) == ["nb.ipynb", "sub/deeper/n.ipynb"] and not found.cut
    cut = safe.walk(lambda name: name.endswith(".ipynb"), limit=100, max_scan=50)
    assert cut.cut and cut.scanned == 50


def test_atomic_write_readers_see_old_or_new(root: Path) -> None:
    old, new = b"A" * 300_000, b"B" * 200_000
    safe = SafeRoot(str(root))
    safe.write_bytes_atomic("nb.ipynb", old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add((root / "nb.ipynb").read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            safe.write_bytes_atomic("nb.ipynb", new if i % 2 == 0 else old)
    finally:
        stop.set()
        thread.join()
    assert seen <= {old, new}
    assert sorted(os.listdir(root)) == ["nb.ipynb", "sub"]  # no temp files left behind


def test_atomic_write_ownership_and_mode(root: Path, spare_uid: int) -> None:
    uid = spare_uid
    safe = SafeRoot(str(root), uid=uid, gid=uid)
    safe.write_bytes_atomic("nb.ipynb", b"{}")
    safe.write_bytes_atomic("fresh.ipynb", b"{}")
    for name in ("nb.ipynb", "fresh.ipynb"):
        info = os.stat(root / name)
        assert (info.st_uid, info.st_gid) == (uid, uid)
        assert stat.S_IMODE(info.st_mode) == 0o600
    safe.write_bytes_atomic("shared.txt", b"x", mode=0o640)
    assert stat.S_IMODE(os.stat(root / "shared.txt").st_mode) == 0o640


def test_makedirs_owner_mode_and_idempotence(root: Path, spare_uid: int) -> None:
    uid = spare_uid
    safe = SafeRoot(str(root), uid=uid, gid=uid)
    old_umask = os.umask(0o077)
    try:
        safe.makedirs("x/y/z")
        safe.makedirs("x/y/z")
        safe.makedirs("")
    finally:
        os.umask(old_umask)
    for folder in ("x", "x/y", "x/y/z"):
        info = os.stat(root / folder)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uid, 0o700)
    with pytest.raises(NotADirectoryError):
        safe.makedirs("nb.ipynb/inside")


def test_hard_link_to_a_file_the_user_does_not_own_is_refused(root: Path, outside: Path, spare_uid: int) -> None:
    uid = spare_uid
    os.link(outside / "secret", root / "hard")  # root-owned, nlink 2
    with pytest.raises(InvalidPath, match="hard link"):
        SafeRoot(str(root), uid=uid, gid=uid).read_bytes("hard")


def test_rename_and_remove(root: Path) -> None:
    safe = SafeRoot(str(root))
    safe.rename("nb.ipynb", "sub/moved.ipynb")
    assert (root / "sub" / "moved.ipynb").read_text() == "{}"
    safe.remove("sub/moved.ipynb")
    assert not safe.exists("sub/moved.ipynb")
    with pytest.raises(FileNotFoundError):
        safe.remove("sub/moved.ipynb")
    with pytest.raises(IsADirectoryError):
        safe.remove("sub")
    root_entry = safe.stat("")
    assert root_entry is not None and root_entry.kind == "dir"


def test_prepare_dir(tmp_path: Path, outside: Path, spare_uid: int) -> None:
    uid = spare_uid
    target = tmp_path / "data" / "users" / "alice"
    prepare_dir(str(target), uid, uid)
    info = os.stat(target)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, uid, 0o700)
    parent = os.stat(tmp_path / "data" / "users")
    assert (parent.st_uid, stat.S_IMODE(parent.st_mode)) == (0, 0o755)
    prepare_dir(str(target), uid, uid)  # idempotent
    os.chmod(target, 0o777)
    prepare_dir(str(target), uid, uid)  # repairs the mode
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    os.symlink(outside, tmp_path / "data" / "users" / "mallory")
    with pytest.raises(InvalidPath, match="symbolic link"):
        prepare_dir(str(tmp_path / "data" / "users" / "mallory"), uid, uid)
    assert os.stat(outside).st_uid == 0


# ---- the path rules (sandbox.fs.normalize_path; SafeRoot applies them too) -----------------

@pytest.mark.parametrize(("path", "why"), [
    ("a\u202eb.ipynb", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("a\u200bb", "U+200B ZERO WIDTH SPACE"),
    ("a\u200db", "U+200D ZERO WIDTH JOINER"),
    ("line\nbreak", "control character (U+000A)"),
    ("tab\there", "control character (U+0009)"),
    ("del\x7f", "control character (U+007F)"),
    ("a\u2028b", "line separator"),
    ("a\u2029b", "paragraph separator"),
    ("bad\udc80", "lone surrogate"),
    (" lead", "begins or ends with a space"),
    ("trail ", "begins or ends with a space"),
    ("dir\u00a0/x", "begins or ends with a space"),
    ("/".join(["d"] * 33), "more than 32 levels"),
    ("x" * 256, "longer than 255 bytes"),
    ("é" * 128, "longer than 255 bytes"),
])
def test_path_rules_refuse_with_a_reason(root: Path, path: str, why: str) -> None:
    from sandbox.fs import normalize_path

    with pytest.raises(InvalidPath) as err:
        normalize_path(path)
    assert why in str(err.value)
    with pytest.raises(InvalidPath):
        SafeRoot(str(root)).write_bytes_atomic(path, b"x")
    assert sorted(p.name for p in root.iterdir()) == ["nb.ipynb", "sub"], "nothing was created"


def test_path_rules_accept_and_normalise_to_nfc(root: Path) -> None:
    import unicodedata

    from sandbox.fs import normalize_path

    nfd = unicodedata.normalize("NFD", "café/ünï.ipynb")
    assert normalize_path(nfd) == unicodedata.normalize("NFC", nfd) != nfd
    assert normalize_path("/".join(["d"] * 32)) == "/".join(["d"] * 32)
    assert normalize_path("x" * 255) == "x" * 255
    assert normalize_path("inner space ok/名前.ipynb") == "inner space ok/名前.ipynb"
    # SafeRoot works on exact names: a non-NFC name is refused there, not silently another file
    with pytest.raises(InvalidPath) as err:
        SafeRoot(str(root)).write_bytes_atomic(unicodedata.normalize("NFD", "café"), b"x")
    assert "NFC" in str(err.value)


# ---- remove_tree ------------------------------------------------------------------------------

def test_remove_tree_of_any_depth_follows_no_link(tmp_path: Path, outside: Path) -> None:
    from sandbox.fs import remove_tree

    top = tmp_path / "tree"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for i in range(2100):
        os.mkdir("n", dir_fd=fd)
        if i % 300 == 0:
            os.symlink(str(outside), "dirlink", dir_fd=fd)
            os.symlink(str(outside / "secret"), "filelink", dir_fd=fd)
            os.mkfifo("fifo", dir_fd=fd)
        nxt = os.open("n", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    os.chmod(top / "n", 0o000)  # a folder its owner made unreadable: root goes through anyway
    if os.geteuid() != 0:
        os.chmod(top / "n", 0o700)
    assert remove_tree(str(tmp_path), "tree") is True
    assert not top.exists()
    assert (outside / "secret").read_text() == "top secret"
    assert remove_tree(str(tmp_path), "tree") is False
    (tmp_path / "file").write_text("x")
    os.symlink(str(outside), tmp_path / "link")
    assert remove_tree(str(tmp_path), "file") and remove_tree(str(tmp_path), "link")
    assert outside.is_dir() and not (tmp_path / "link").exists()
    with pytest.raises(InvalidPath):
        remove_tree(str(tmp_path), "a/b")


def test_remove_tree_stops_at_a_mount_point(tmp_path: Path) -> None:
    import subprocess

    from sandbox.errors import SandboxError
    from sandbox.fs import remove_tree

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tree" / "mnt"
    mnt.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kptest", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (mnt / "inside").write_text("kept")
        with pytest.raises(SandboxError, match="mount point"):
            remove_tree(str(tmp_path), "tree")
        assert (mnt / "inside").read_text() == "kept"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_remove_tree_empties_a_folder_that_is_a_mount_point(tmp_path: Path) -> None:
    import subprocess

    from sandbox.fs import remove_tree

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    vol = tmp_path / "alice"
    vol.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kptest", str(vol)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (vol / "d").mkdir()
        (vol / "d" / "f").write_text("x")
        assert remove_tree(str(tmp_path), "alice") is True
        assert vol.is_dir() and list(vol.iterdir()) == [], "a volume per user is emptied, its mount point stays"
    finally:
        subprocess.run(["umount", str(vol)], check=False)
