"""pip inside a kernel: `%pip install X` and `!pip install X` install X for that user only.

Runs inside user kernels (never in the server), so it imports nothing of kernelpool and only the
standard library. The kernel's environment (built by `kernelpool.kernels.packages.env_vars`) already
makes pip install into the user's own folder (`PIP_PREFIX=~/.local`) and puts that folder's
site-packages on `sys.path` from the kernel's start; this module adds what pip alone does not:

- `load_ipython_extension` (loaded by every kernel through its argv) replaces IPython's `%pip`
  magic and routes `!pip ...` / `!python -m pip ...` through `main`, then refreshes the import
  system's caches so that what was just installed imports at once;
- `main` (`python -m kernelpool.kernels.pip_extension ARGS`) runs pip, passes its output through, and
  when it fails because the package index cannot be reached or the user's disk is full, ends
  with one plain sentence that says so.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from typing import Any

_DISK = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")
_NETWORK = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "Connection refused",
    "ProxyError", "Max retries exceeded", "No route to host", "Read timed out",
)
# a shell line that runs pip: `pip ...`, `pip3 ...`, `/path/pip ...`, `python -m pip ...`
_PIP_COMMAND = re.compile(r"^\s*(?:\S*/)?(?:pip3?(?:\.\d+)?|python3?(?:\.\d+)?\s+-m\s+pip)(?=\s|$)(.*)$", re.S)


def diagnose(output: str, prefix: str | None) -> str | None:
    """The reason, in words, that a failed pip run failed, when it is the disk or the network."""
    if any(mark in output for mark in _DISK):
        where = prefix or os.path.expanduser("~")
        free = _free_bytes(where)
        room = f" ({free / 1e6:.1f} MB free)" if free is not None else ""
        return (f"kernelpool: the install failed because your folder is full{room}: {where} has no room for "
                "the package. Remove files you no longer need (pip's cache is in ~/.cache/pip), or ask "
                "the server's administrator for more space.")
    if any(mark in output for mark in _NETWORK):
        index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
        return (f"kernelpool: the install failed because this kernel cannot reach the package index ({index}). "
                "Kernels on this server may have no network access; ask its administrator to install the "
                "package beside the server (then every user has it), or to give kernels network access.")
    return None


def _free_bytes(path: str) -> int | None:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or "/")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _own_folders() -> list[str]:
    # the user's site-packages (PYTHONPATH, set by the server) and scripts folder
    folders = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    prefix = os.environ.get("PIP_PREFIX")
    if prefix:
        folders.append(os.path.join(prefix, "bin"))
    return folders


def _entries(folders: list[str]) -> set[str]:
    found: set[str] = set()
    for folder in folders:
        with contextlib.suppress(OSError):
            found.update(os.path.join(folder, name) for name in os.listdir(folder))
    return found


def _remove_new(before: set[str], folders: list[str]) -> list[str]:
    """What a failed install added to the user's folders (pip leaves half-copied packages behind
    when the disk fills up): removed, so that nothing broken imports."""
    import shutil

    removed = []
    for path in sorted(_entries(folders) - before):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(os.path.basename(path))
        except OSError:
            pass
    return removed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folders = _own_folders()
    before = _entries(folders)
    proc = subprocess.Popen([sys.executable, "-m", "pip", *args],  # noqa: S603 (in the user's kernel, as the user: their arguments)
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.stdout is None:
        raise RuntimeError("pip's output is not piped")
    tail: deque[str] = deque(maxlen=400)
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        tail.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    code = proc.wait()
    if code != 0:
        removed = _remove_new(before, folders) if "install" in args else []
        reason = diagnose("".join(tail), os.environ.get("PIP_PREFIX"))
        if removed:
            print(f"kernelpool: removed what the failed install left half-done: {', '.join(removed)}", flush=True)
        if reason:
            print(reason, flush=True)
    return code


def _pip_line(line: str) -> str:
    return " ".join([shlex.quote(sys.executable), "-m", "kernelpool.kernels.pip_extension", line])


def load_ipython_extension(ip: Any) -> None:
    """Called by IPython in every kernelpool kernel (`--IPKernelApp.extensions=kernelpool.kernels.pip_extension`)."""
    original_system = ip.system

    def system(cmd: str) -> Any:
        match = _PIP_COMMAND.match(cmd)
        if match is None or any(op in cmd for op in ("|", "&&", ";", "||", ">", "<", "`", "$(")):
            return original_system(cmd)
        try:
            return original_system(_pip_line(match.group(1).strip()))
        finally:
            importlib.invalidate_caches()

    def pip_magic(line: str) -> None:
        """Run pip in this kernel; packages go into your own folder (~/.local) and import at once."""
        system(f"pip {line}")

    ip.system = system
    ip.register_magic_function(pip_magic, magic_kind="line", magic_name="pip")


if __name__ == "__main__":
    raise SystemExit(main())
