"""The documentation stays true to the code: the configuration table of README.md is
what scripts/config-table prints from kernelpool.config.Settings, and names every setting; the
Docker image tags the docs use are the version kernelpool reports."""

from __future__ import annotations

import os
import subprocess
import sys

from kernelpool.config import Settings
from testkit.server import ROOT


def test_config_table_is_generated_from_settings() -> None:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "config-table")],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    with open(os.path.join(ROOT, "README.md")) as f:
        doc = f.read()
    start = "<!-- config-table:start (scripts/config-table --write) -->\n"
    documented = doc.split(start, 1)[1].split("<!-- config-table:end -->", 1)[0]
    assert documented == out, "README.md is stale: run scripts/config-table --write"
    for name, field in Settings.model_fields.items():
        assert f"`KERNELPOOL_{(field.alias or name).upper()}`" in out


def test_image_tags_in_the_docs_are_the_version() -> None:
    """kernelpool/__init__.py holds the version; the wheel's metadata is read from it, and every
    `kernelpool:X.Y.Z` tag in README.md and docs/ (the `docker build -t` and `docker run` lines,
    `FROM` for a derived image) names it: a release that changes it changes them."""
    import re
    from importlib.metadata import version

    import kernelpool

    assert version("kernelpool") == kernelpool.__version__, "reinstall: the installed metadata is older"
    pages = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
    tags: dict[str, set[str]] = {}
    for page in pages:
        with open(page) as f:
            for tag in re.findall(r"\bkernelpool:(\d[\w.+-]*)", f.read()):
                tags.setdefault(tag, set()).add(os.path.relpath(page, ROOT))
    assert tags, "the docs show the image tag somewhere"
    assert set(tags) == {kernelpool.__version__}, f"image tags other than {kernelpool.__version__}: {tags}"


def test_docs_name_the_image_settings() -> None:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    with open(os.path.join(ROOT, "docs", "deployment.md")) as f:
        doc = f.read()
    base = next(line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG BASE="))
    assert base in doc
    assert 'ENTRYPOINT ["tini", "-e", "143"' in dockerfile and "tini -e 143" in doc


def test_readme_docker_quick_start_is_the_documented_line() -> None:
    """The README's `docker run` is docs/deployment.md's (the one CI runs) without its hostname settings."""
    from tests.test_docker_image import documented_run_line

    docs = documented_run_line()
    readme = documented_run_line(os.path.join(ROOT, "README.md"))
    hostname = {i for i, arg in enumerate(docs) if arg == "-e" and docs[i + 1].split("=")[0] in
                ("KERNELPOOL_PUBLIC_URL", "KERNELPOOL_ALLOWED_HOSTS")}
    assert len(hostname) == 2
    assert readme == [arg for i, arg in enumerate(docs) if i not in hostname and i - 1 not in hostname]


def test_architecture_names_only_modules_that_exist() -> None:
    """docs/architecture.md walks the code module by module: every file and module it names exists,
    and it names every package of kernelpool."""
    import re

    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        doc = f.read()
    paths = set(re.findall(r"`((?:kernelpool|sandbox|tests|benchmarks|testkit)/[\w/]*(?:\.py)?)`", doc))
    dotted = set(re.findall(r"`((?:kernelpool|sandbox)(?:\.\w+)+)`", doc))
    assert len(paths) + len(dotted) >= 20, "the architecture notes name the modules they describe"
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    for name in dotted:
        parts = name.split(".")
        # a module, a package, or a name defined in one (kernelpool.mcp.server.build_mcp)
        for cut in range(len(parts), 0, -1):
            base = os.path.join(ROOT, *parts[:cut])
            if os.path.exists(base + ".py") or os.path.isdir(base):
                break
        else:
            missing.append(name)
    assert not missing, f"docs/architecture.md names what does not exist: {sorted(missing)}"
    packages = {d for d in os.listdir(os.path.join(ROOT, "kernelpool"))
                if os.path.isfile(os.path.join(ROOT, "kernelpool", d, "__init__.py"))}
    unnamed = [p for p in packages if f"kernelpool/{p}/" not in doc]
    assert not unnamed, f"docs/architecture.md does not describe {unnamed}"
