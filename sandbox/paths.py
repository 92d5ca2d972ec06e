"""The path rules: which relative paths a client may give for a file in a user's folder.

Defined once for the whole server: `SafeRoot` (sandbox.fs) applies them to every path it walks,
and kernelpool's notebook service normalises every client-given path with `normalize_path`.
"""

from __future__ import annotations

import unicodedata

from sandbox.errors import InvalidPath, PathOutsideRoot

MAX_DEPTH = 32  # components in one path
MAX_NAME_BYTES = 255  # bytes of one component in UTF-8: what Linux file systems allow
# control characters, invisible format characters (bidi overrides, zero-width joiners, ...),
# line and paragraph separators, lone surrogates: a name with any of them can look like another
_REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character",
                       "Zl": "a line separator", "Zp": "a paragraph separator", "Cs": "a lone surrogate"}


def split_path(relpath: str, *, allow_root: bool = False) -> list[str]:
    """The components of a normalised relative path ("" is the root itself where `allow_root`).
    Called by `SafeRoot` for every path it is given."""
    if not isinstance(relpath, str):
        raise InvalidPath(repr(relpath), "path must be a string")
    if relpath == "" and allow_root:
        return []
    parts = _parts(relpath)
    # callers hand us normalised paths (`normalize_path`); a name in another form is another file
    if not unicodedata.is_normalized("NFC", relpath):
        raise InvalidPath(relpath, "not in Unicode normal form NFC")
    return parts


def _parts(relpath: str) -> list[str]:
    """The components of `relpath`, each checked against the path rules."""
    if "\0" in relpath:
        raise InvalidPath(relpath, "path contains a NUL byte")
    if relpath == "":
        raise InvalidPath(relpath, "empty path")
    if relpath.startswith("/"):
        raise PathOutsideRoot(relpath, "absolute paths are not allowed; give a path relative to the user's folder")
    parts = relpath.split("/")
    if len(parts) > MAX_DEPTH:
        raise InvalidPath(relpath, f"more than {MAX_DEPTH} levels of folders")
    for part in parts:
        if part == "..":
            raise PathOutsideRoot(relpath, "'..' is not allowed")
        if part == "":
            raise InvalidPath(relpath, "empty path component ('//', or a leading or trailing '/')")
        if part == ".":
            raise InvalidPath(relpath, "'.' components are not allowed")
        for ch in part:
            kind = _REFUSED_CATEGORIES.get(unicodedata.category(ch))
            if kind is not None:
                name = unicodedata.name(ch, "")
                raise InvalidPath(relpath, f"contains {kind} (U+{ord(ch):04X}{' ' + name if name else ''})")
        if part != part.strip():
            raise InvalidPath(relpath, f"the name {part!r} begins or ends with a space")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidPath(relpath, f"a name is longer than {MAX_NAME_BYTES} bytes")
    return parts


def normalize_path(relpath: str) -> str:
    """A client-given relative path in Unicode NFC, checked against the path rules.

    NFC, so that "café" typed on two systems (composed or not) names one file. Refused, with
    InvalidPath or PathOutsideRoot saying why: NUL, absolute, '..', empty or '.' components,
    control and invisible format characters (category Cc, Cf: bidi overrides, zero-width
    characters), line/paragraph separators (Zl, Zp), a component that begins or ends with
    white space, more than MAX_DEPTH components, a component over MAX_NAME_BYTES bytes.
    Called by kernelpool's notebook service for every path a client gives.
    """
    if not isinstance(relpath, str):
        raise InvalidPath(repr(relpath), "path must be a string")
    normal = unicodedata.normalize("NFC", relpath)
    _parts(normal)
    return normal
