"""Client-given notebook and folder paths, and the one mapping of sandbox path errors.

The path rules themselves (characters, depth, name length, NFC, no '..') are
`sandbox.fs.normalize_path`'s, defined once for the whole server. What is added here is
only the tools' leniency about spelling ("./x//y.ipynb" is "x/y.ipynb"; backslashes are
folder separators), the `.ipynb` ending of a notebook, and the wording for clients.
Callers: the tool layer (arguments), the notebook service (`refusing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kernelpool.errors import PathRefused
from sandbox.errors import PathError, SandboxError
from sandbox.fs import normalize_path

_ABSOLUTE = "absolute paths are not allowed; give a path relative to your folder"


def check_notebook_path(path: str) -> str:
    """Normalise and check a client-given notebook path; raises PathRefused."""
    norm = check_file_path(path)
    if not norm.endswith(".ipynb"):
        raise PathRefused(path, "a notebook path must end in .ipynb")
    return norm


def check_file_path(path: str) -> str:
    """Normalise and check a client-given path of a file (any name: the notebook rules without
    the ending); raises PathRefused."""
    if not isinstance(path, str) or not path.strip():
        raise PathRefused(str(path), "empty path")
    if path.startswith(("/", "\\")):
        raise PathRefused(path, _ABSOLUTE)
    norm = _normalise(path, path.replace("\\", "/"))
    if not norm:
        raise PathRefused(path, "empty path")
    return norm


def check_dir_path(path: str) -> str:
    """Normalise and check a client-given folder path ("" is the user's folder); raises PathRefused."""
    if not isinstance(path, str):
        raise PathRefused(str(path), "path must be a string")
    if path.startswith("/"):
        raise PathRefused(path, _ABSOLUTE)
    return _normalise(path, path)


def _normalise(given: str, path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return ""
    try:
        return normalize_path("/".join(parts))
    except PathError as exc:
        raise PathRefused(given, exc.reason) from None


@contextlib.contextmanager
def refusing(path: str) -> Iterator[None]:
    """What the sandbox refuses about `path` (a link on the way, a path outside the folder, ...)
    becomes the client's `PathRefused`: the one place that maps SandboxError for notebooks."""
    try:
        yield
    except SandboxError as exc:
        raise PathRefused(path, str(exc)) from None
