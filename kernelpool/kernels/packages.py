"""Per-user packages: what `%pip install X` in a kernel installs goes into that user's own folder.

Called by `kernels.environment` when it builds a kernel's environment and by `kernels.launch`
before each kernel start.
The mechanism (why it is this one: docs/deployment.md, "Packages"):

- `PIP_PREFIX=~/.local` in the kernel's environment: every pip the user runs (`%pip`, `!pip`,
  `!python -m pip`) installs into `~/.local/lib/pythonX.Y/site-packages` and `~/.local/bin`.
  User site-packages (`pip install --user`, `PYTHONUSERBASE`) do not exist in a virtual
  environment, which is how the server is installed; `--target` reinstalls every dependency
  and refuses upgrades; a venv per user would not be the interpreter the fork server forked.
- `PYTHONPATH=` that site-packages folder: a stock `python -m ipykernel_launcher` puts it on
  `sys.path` ahead of the server's site-packages (so a user's newer version wins in their own
  kernels), and the fork server's child applies the same variable the same way at its start.
- The folder exists before the kernel starts (created here, as the user's), so that a package
  installed into it imports at once: Python remembers a missing `sys.path` folder as missing.
- `kernelpool.kernels.pip_extension` (an IPython extension every kernel loads) words the failures that
  pip leaves cryptic: no network, no disk space.

The server's own virtual environment is root's and read-only to every user's uid: nothing a
kernel runs can change it, and what the administrator installs there every user sees.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess

from sandbox import SafeRoot

log = logging.getLogger(__name__)

PREFIX = ".local"  # in the user's folder (their HOME in kernels)
EXTENSION = "kernelpool.kernels.pip_extension"
_ANCHOR = "/kernelpool-prefix"


@functools.cache
def layout(python: str) -> tuple[list[str], str]:
    """The site-packages folders and the scripts folder of a pip `--prefix` install, for the
    interpreter `python`, relative to the prefix (asked of that interpreter: its version decides)."""
    code = (
        "import json, sysconfig\n"
        f"v = {{'base': {_ANCHOR!r}, 'platbase': {_ANCHOR!r}}}\n"
        "print(json.dumps([sysconfig.get_path(k, 'posix_prefix', vars=v) for k in ('purelib', 'platlib', 'scripts')]))"
    )
    out = subprocess.run([python, "-I", "-c", code],  # noqa: S603 (the configured kernel interpreter, our program)
                         capture_output=True, text=True, timeout=60, check=True, cwd="/")
    purelib, platlib, scripts = (os.path.relpath(p, _ANCHOR) for p in json.loads(out.stdout))
    sites = [purelib] if platlib == purelib else [purelib, platlib]
    return sites, scripts


def env_vars(python: str, folder: str) -> dict[str, str]:
    """The variables a kernel of the user whose folder is `folder` gets for its own packages
    (PATH is returned as the folder to put first)."""
    sites, scripts = layout(python)
    prefix = os.path.join(folder, PREFIX)
    return {
        "PIP_PREFIX": prefix,
        "PYTHONPATH": os.pathsep.join(os.path.join(prefix, s) for s in sites),
        "PATH": os.path.join(prefix, scripts),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def ensure_folders(python: str, root: SafeRoot) -> None:
    """Create the user's site-packages folders (owned by the user) if missing; a failure (a full
    disk, a link planted there) only costs the import-at-once, so it is logged, not raised."""
    sites, _ = layout(python)
    for site in sites:
        try:
            root.makedirs(f"{PREFIX}/{site}")
        except Exception as exc:
            log.warning("%s: cannot create %s/%s for the user's packages: %s", root.root, PREFIX, site, exc)
