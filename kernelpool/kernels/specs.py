"""The kernels users may have: the server's own Python, and the kernelspecs the operator allows.

`python3` is always offered: kernelpool's own spec (`launch.KernelpoolSpecManager`: the server's
interpreter, forked from the fork server). The `kernelspecs` setting names more, found where
Jupyter installs them (`jupyter_client.kernelspec.KernelSpecManager`: the server environment's
share/jupyter/kernels, /usr/local/share/jupyter/kernels, /usr/share/jupyter/kernels, JUPYTER_PATH),
read once at start-up: a missing one, one whose program cannot be found on the kernels' PATH,
or (sandboxed) one that other uids cannot run, stops the server with the fix. Every spec starts
through the sandbox provisioner (`launch.KernelpoolSpecManager.get_kernel_spec` sets it, whatever
the spec on disk says); only `python3` uses the fork server.

A notebook records its kernel in `metadata.kernelspec.name`, as Jupyter does; `for_notebook`
maps that name to an allowed spec, or refuses with the list of allowed ones.
Callers: `kernels.launch`, `kernels.registry`, `notebooks.workspace`, the `list_kernelspecs` tool.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from kernelpool.errors import KernelNotAllowed, SandboxUnavailable

DEFAULT = "python3"  # the server's own Python: what notebooks without a kernelspec get
KERNEL_PATH = "/usr/local/bin:/usr/bin:/bin"  # where a spec's program is looked up (environment._SYSTEM_PATH)
# variables a kernelspec's `env` may not set: the sandbox's view of the user (folder, runtime
# files, who they are) is kernelpool's to say
PROTECTED_ENV = frozenset({"HOME", "USER", "LOGNAME", "TMPDIR", "JUPYTER_RUNTIME_DIR"})


@dataclass(frozen=True)
class Spec:
    """One allowed kernel kind, as users see it and as it starts."""

    name: str  # as notebooks record it
    display_name: str
    language: str
    argv: list[str] = field(default_factory=list)  # argv[0] absolute (empty for python3: built by launch)
    env: dict[str, str] = field(default_factory=dict)
    resource_dir: str = ""

    @property
    def own(self) -> bool:
        """The server's own Python (fork server, per-user pip, pip extension)."""
        return self.name == DEFAULT

    def metadata(self) -> dict[str, Any]:
        """What a new notebook records, as Jupyter writes it."""
        return {"kernelspec": {"name": self.name, "display_name": self.display_name, "language": self.language},
                "language_info": {"name": self.language.lower()}}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "display_name": self.display_name, "language": self.language,
                "default": self.own}


PYTHON = Spec(DEFAULT, "Python 3 (ipykernel)", "python")


class KernelSpecs:
    """The allowed specs, read at start-up; `specs` is keyed by name, python3 first."""

    def __init__(self, specs: Iterable[Spec]) -> None:
        self.specs: dict[str, Spec] = {PYTHON.name: PYTHON}
        for spec in specs:
            self.specs.setdefault(spec.name, spec)

    @classmethod
    def find(cls, names: Iterable[str], manager: KernelSpecManager | None = None,
             check_reachable: Any = None) -> KernelSpecs:
        """The specs named in the `kernelspecs` setting, from where Jupyter installs them.
        `check_reachable(path)` says why other uids cannot run a program (None: they can)."""
        manager = manager or KernelSpecManager()
        found = []
        for name in names:
            if name == DEFAULT:
                continue
            try:
                spec = manager.get_kernel_spec(name)
            except NoSuchKernel:
                installed = ", ".join(sorted(manager.find_kernel_specs())) or "none"
                raise SandboxUnavailable(
                    f"kernelspecs: {name!r} is not installed where Jupyter looks for kernels (installed: {installed}); "
                    f"install it (e.g. `jupyter kernelspec install` or the kernel's package) or remove it from "
                    "kernelspecs") from None
            found.append(_checked(name, spec, check_reachable))
        return cls(found)

    def get(self, name: str) -> Spec:
        spec = self.specs.get(name)
        if spec is None:
            raise KernelNotAllowed(name, self.offered())
        return spec

    def offered(self) -> str:
        return ", ".join(f"{s.name} ({s.display_name})" for s in self.specs.values())

    def for_notebook(self, metadata: Mapping[str, Any]) -> Spec:
        """The spec a notebook's metadata records (none recorded: python3)."""
        recorded = metadata.get("kernelspec") if isinstance(metadata, Mapping) else None
        name = recorded.get("name") if isinstance(recorded, Mapping) else None
        return self.get(name) if isinstance(name, str) and name else PYTHON


def _checked(name: str, spec: KernelSpec, check_reachable: Any) -> Spec:
    argv = list(spec.argv)
    if not argv or not any("{connection_file}" in a for a in argv):
        raise SandboxUnavailable(f"kernelspec {name!r}: its argv must name {{connection_file}}: {argv}")
    if spec.interrupt_mode != "signal":
        raise SandboxUnavailable(f"kernelspec {name!r} asks for interrupt_mode {spec.interrupt_mode!r}; kernelpool "
                                 "interrupts kernels with SIGINT only")
    env = {k: str(v) for k, v in (spec.env or {}).items()}
    program = shutil.which(argv[0], path=env.get("PATH", KERNEL_PATH)) if not os.path.isabs(argv[0]) else argv[0]
    if program is None or not os.access(program, os.X_OK):
        raise SandboxUnavailable(f"kernelspec {name!r}: its program {argv[0]!r} is not found on the kernels' PATH "
                                 f"({env.get('PATH', KERNEL_PATH)}): give an absolute path in its kernel.json")
    blocked = check_reachable(program) if check_reachable is not None else None
    if blocked:
        raise SandboxUnavailable(f"kernelspec {name!r}: users' uids cannot run its program {program} ({blocked}); "
                                 "install it where other uids can reach it")
    refused = sorted(PROTECTED_ENV.intersection(env))
    if refused:
        raise SandboxUnavailable(f"kernelspec {name!r} sets {', '.join(refused)} in its env: kernelpool sets those "
                                 "for each user; remove them from its kernel.json")
    return Spec(name, spec.display_name or name, spec.language or name, [program, *argv[1:]], env,
                spec.resource_dir or "")
