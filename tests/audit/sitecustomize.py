"""Test only (tests/test_path_review.py): put on PYTHONPATH of a kernelpool server or CLI, it logs
every audited file-system call of that process whose path lies under KP_TEST_AUDIT_DATA to
KP_TEST_AUDIT_LOG, one JSON line each: [event, path, dir_fd or null, flags or null]."""

from __future__ import annotations

import json
import os
import sys

_LOG = os.environ.get("KP_TEST_AUDIT_LOG")
_DATA = os.environ.get("KP_TEST_AUDIT_DATA")
_EVENTS = {"open", "os.remove", "os.rename", "os.chmod", "os.chown", "os.mkdir", "os.rmdir", "os.symlink",
           "os.link", "os.listdir", "os.scandir", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile"}

if _LOG and _DATA:
    _out = open(_LOG, "a", buffering=1)  # noqa: SIM115 (lives as long as the process: no block to close it in)
    _busy = False
    _UNDER = _DATA.rstrip("/") + "/"

    def _hook(event: str, args: tuple) -> None:
        global _busy
        if _busy or event not in _EVENTS or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return  # a descriptor (fchown, fchmod, listdir(fd)): nothing is resolved by name
        dir_fd = args[-1] if event != "open" and isinstance(args[-1], int) and args[-1] >= 0 else None
        flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else None
        if not os.path.isabs(path) and dir_fd is None and event != "open":
            path = os.path.abspath(path)
        if os.path.isabs(path) and not (path + "/").startswith(_UNDER):
            return
        _busy = True
        try:
            _out.write(json.dumps([event, path, dir_fd, flags]) + "\n")
        finally:
            _busy = False

    sys.addaudithook(_hook)
