"""The one builder of the environments kernelpool starts processes with: a kernel's and the fork server's.

Both are built from nothing: none of the server's own variables (tokens, paths, config) reach
a kernel, nor the fork server, whose memory every forked kernel inherits. What the fork server
gets is read at import time by what it preloads, so it must already be what a kernel's
environment says (PATH, LANG, PYDEVD_DISABLE_FILE_VALIDATION).
"""

from __future__ import annotations

import os

from kernelpool.kernels import packages

_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def scrubbed_env(python: str, home: str, path_first: str | None = None, **more: str) -> dict[str, str]:
    """PATH (`path_first`, the interpreter's folder, the system's), LANG, HOME and what every
    kernel's imports expect; `more` adds variables."""
    return {
        "PATH": ":".join(p for p in (path_first, os.path.dirname(python), _SYSTEM_PATH) if p),
        "LANG": "C.UTF-8",
        "HOME": home,
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        **more,
    }


def kernel_env(python: str, account: str, folder: str, runtime: str, *, user_packages: bool) -> dict[str, str]:
    """A kernel's environment: HOME is the user's `folder`, temporary and runtime files go to
    `runtime`; with `user_packages`, pip installs into the user's folder (`packages.env_vars`)."""
    own = packages.env_vars(python, folder) if user_packages else {}
    first = own.pop("PATH", None)
    return {
        **own,
        **scrubbed_env(
            python, folder, first,
            USER=account,
            LOGNAME=account,
            TMPDIR=runtime,
            JUPYTER_RUNTIME_DIR=runtime,
            IPYTHONDIR=os.path.join(folder, ".ipython"),
            MPLBACKEND="module://matplotlib_inline.backend_inline",
        ),
    }


def other_kernel_env(program: str, spec_env: dict[str, str], account: str, folder: str, runtime: str) -> dict[str, str]:
    """The environment of a kernel of an allowed kernelspec (`kernels.specs`): the scrubbed one
    with the spec's `env` (R_HOME, a PATH of its own, ...) on top, but never the variables that
    say who and where the user is (`specs.PROTECTED_ENV`, refused at start-up already)."""
    base = scrubbed_env(program, folder, USER=account, LOGNAME=account, TMPDIR=runtime, JUPYTER_RUNTIME_DIR=runtime,
                        IPYTHONDIR=os.path.join(folder, ".ipython"))
    own = {k: v for k, v in base.items() if k in ("HOME", "USER", "LOGNAME", "TMPDIR", "JUPYTER_RUNTIME_DIR")}
    return {**base, **spec_env, **own}


def fork_server_env(python: str) -> dict[str, str]:
    """The fork server's environment, before `zygote.server` adds PYTHONPATH for a source checkout."""
    return scrubbed_env(python, "/nonexistent")
