"""What other kernels than the server's Python get: code that enters a notebook's folder in their
language, and an environment whose kernelspec cannot say who or where the user is."""

from __future__ import annotations

from kernelpool.kernels.environment import other_kernel_env
from kernelpool.kernels.registry import chdir_code


def test_chdir_code_quotes_the_folder_for_each_language() -> None:
    folder = "a b/it's \"q\" $(x) `y`\\é"
    assert chdir_code("python", folder) == f"import os as _o; _o.chdir({folder!r}); del _o"
    assert chdir_code("R", folder) == 'setwd("a b/it\'s \\"q\\" $(x) `y`\\\\\\u00e9")'
    assert chdir_code("bash", folder) == "cd -- 'a b/it'\"'\"'s \"q\" $(x) `y`\\é'"
    assert chdir_code("julia", folder) is None


def test_a_kernelspecs_env_cannot_say_who_or_where_the_user_is() -> None:
    env = other_kernel_env("/usr/bin/R", {"R_HOME": "/usr/lib/R", "PATH": "/opt/r/bin", "HOME": "/root"},
                           "kp-alice", "/data/users/alice", "/run/alice")
    assert env["R_HOME"] == "/usr/lib/R" and env["PATH"] == "/opt/r/bin"
    assert (env["HOME"], env["USER"], env["TMPDIR"]) == ("/data/users/alice", "kp-alice", "/run/alice")
