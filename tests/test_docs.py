"""The documentation stays true to the code and to itself: the configuration table of
docs/configuration.md is what scripts/config-table prints from kernelpool.config.Settings; the
README's `docker run` is the one CI runs; the modules docs/architecture.md names exist; relative
links lead somewhere; the README fits a first screen and 200 lines; and every command a page shows is
run, or checked, by a test named in tests/doc_commands.py. The commands that no other test file runs
are run here: the `kernelpool` commands against a real server, the MCP Inspector's against a real
server, the per-user volume commands as root, and what Claude Code's command hands the client. The
Docker image tags the docs use are the version kernelpool reports.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from kernelpool.config import Settings
from testkit.client import mcp_client, text
from testkit.server import ROOT, KernelpoolServer, free_port
from tests import node_env
from tests.conftest import SANDBOX_SKIP
from tests.doc_commands import (
    CLI,
    COMMAND_FENCES,
    COMMANDS,
    OTHER_FENCES,
    documented_commands,
    fences,
    pages,
    read,
)

README_MAX_LINES = 200
FIRST_SCREEN = 40  # lines


def test_config_table_is_generated_from_settings() -> None:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "config-table")],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    doc = read("docs/configuration.md")
    start = "<!-- config-table:start (scripts/config-table --write) -->\n"
    documented = doc.split(start, 1)[1].split("<!-- config-table:end -->", 1)[0]
    assert documented == out, "docs/configuration.md is stale: run scripts/config-table --write"
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
    doc = read("docs/deployment.md")
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
    doc = read("docs/architecture.md")
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


# ---- the README: a first screen, and short --------------------------------------------------------

def test_readme_fits_a_first_screen_and_200_lines() -> None:
    """A newcomer's first screen says what kernelpool is, how to run it and how to connect; the
    long form lives in docs/."""
    lines = read("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move the long form to docs/"
    first = "\n".join(lines[:FIRST_SCREEN])
    assert re.search(r"^kernelpool is ", first, re.M), "what kernelpool is, in the first paragraph"
    assert "scripts/install /opt/kernelpool && /opt/kernelpool/bin/kernelpool serve" in first
    assert "http://127.0.0.1:8765/mcp" in first and "Authorization: Bearer" in first


# ---- links ----------------------------------------------------------------------------------------

def _prose(markdown: str) -> str:
    """A page without its fenced blocks and inline code, where links are not links."""
    kept, inside = [], ""
    for line in markdown.splitlines():
        fence = re.match(r"^\s*(`{3,})", line)
        if fence and (not inside or fence.group(1) == inside):
            inside = "" if inside else fence.group(1)
            continue
        if not inside:
            kept.append(line)
    return re.sub(r"`[^`\n]*`", "", "\n".join(kept))


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a page's headings (lower case, punctuation dropped, spaces to
    hyphens; a repeated heading gets -1, -2, ...)."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose_headings(markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def _prose_headings(markdown: str) -> str:
    """The page without its fenced blocks (a `#` comment in a shell block is no heading); inline
    code stays, since GitHub keeps its text in the anchor."""
    kept, inside = [], ""
    for line in markdown.splitlines():
        fence = re.match(r"^\s*(`{3,})", line)
        if fence and (not inside or fence.group(1) == inside):
            inside = "" if inside else fence.group(1)
            continue
        if not inside:
            kept.append(line.replace("`", ""))
    return "\n".join(kept)


def test_relative_links_point_at_what_exists() -> None:
    checked, broken = 0, []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(read(page))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
            checked += 1
            if not os.path.exists(resolved):
                broken.append(f"{page}: {target} (no {os.path.relpath(resolved, ROOT)})")
            elif anchor and resolved.endswith(".md"):
                with open(resolved) as f:
                    if anchor not in _anchors(f.read()):
                        broken.append(f"{page}: {target} (no heading #{anchor} in {os.path.relpath(resolved, ROOT)})")
    assert checked >= 20, "the pages link to each other"
    assert not broken, "\n".join(broken)


# ---- every command is covered ---------------------------------------------------------------------

def test_every_fence_says_what_it_holds() -> None:
    """A command block is marked `sh` or `dockerfile`; anything else names its language, so a
    command cannot appear in an unmarked block that the registry never sees."""
    unmarked = [f"{f.page}:{f.line} ```{f.info}" for page in pages() for f in fences(page)
                if f.info not in COMMAND_FENCES | OTHER_FENCES]
    assert not unmarked, "fences that are neither command blocks nor a known language:\n" + "\n".join(unmarked)


def test_every_documented_command_is_covered_by_a_test() -> None:
    found = documented_commands()
    assert len(found) >= 30, found
    missing = [f"{page}: {command}" for page, command in found if command not in COMMANDS]
    assert not missing, (
        "commands the docs show that no test covers; add a test that runs (or checks) each, and its entry "
        "to COMMANDS in tests/doc_commands.py:\n" + "\n".join(missing))
    shown = {command for _, command in found}
    stale = [command for command in COMMANDS if command not in shown]
    assert not stale, "tests/doc_commands.py lists commands no page shows any more:\n" + "\n".join(stale)


def _test_functions(path: str) -> set[str]:
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def test_the_registry_names_tests_that_exist() -> None:
    named = {test for _, tests in COMMANDS.values() for test in tests}
    missing = []
    for test in sorted(named):
        path, _, name = test.partition("::")
        if not os.path.exists(os.path.join(ROOT, path)) or name not in _test_functions(path):
            missing.append(test)
    assert not missing, f"tests/doc_commands.py names tests that do not exist: {missing}"
    assert all(how for how, _ in COMMANDS.values())


# ---- the `kernelpool` commands of a page, against a real server -----------------------------------

def _cli_commands(page: str) -> list[tuple[str, list[str]]]:
    """(command, its arguments after `kernelpool`) for each `kernelpool` command of a page: a
    `TOKEN=$(...)` around it and a `docker exec kernelpool` before it taken off."""
    found = []
    for shown_on, command in documented_commands():
        inner = re.fullmatch(r"TOKEN=\$\((.*)\)", command)
        text_ = (inner.group(1) if inner else command).removeprefix("docker exec kernelpool ")
        if shown_on == page and text_.startswith("kernelpool "):
            found.append((command, shlex.split(text_)[1:]))
    return found


async def _answers(kp: KernelpoolServer, token: str) -> bool:
    """True if `token` gets a tool answered over MCP (which also writes an audit row)."""
    try:
        async with mcp_client(kp.url, token, mode="auto") as c:
            return not (await c.call_tool("list_notebooks", {})).is_error
    except Exception:
        return False


def _refused(kp: KernelpoolServer, token: str, within: float = 2.0) -> bool:
    """True once `token` is answered 401 (the server forgets a token within half a second)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + within
    while httpx2.post(kp.url, json=body, headers=headers).status_code != 401:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _users(kp: KernelpoolServer) -> dict[str, dict[str, str]]:
    """`users list`: name -> its limits."""
    found = {}
    for line in kp.cli("users", "list").stdout.splitlines():
        name, _uid, *limits = line.split("\t")
        found[name] = dict(item.split("=", 1) for field in limits for item in field.split())
    return found


@pytest.mark.parametrize("page", ["README.md", "docs/deployment.md"])
async def test_the_cli_commands_of_a_page_against_a_real_server(fresh_server: KernelpoolServer, server_args: list[str],
                                                                page: str) -> None:
    """Each `kernelpool` command of the page, in the page's order, on one server and data folder:
    what its comment says holds. docs/deployment.md's run in a container (`docker exec`), where the
    server is running already; here the server runs on the host."""
    kp = fresh_server
    found = _cli_commands(page)
    covered = {command for command, (_, tests) in COMMANDS.items() if CLI in tests}
    assert {command for command, _ in found} == covered & {c for p, c in documented_commands() if p == page}
    if found[0][1] != ["serve"]:
        kp.start(*server_args)  # the image starts the server; the commands then run beside it
    created: list[str] = []  # tokens made by `tokens create`, newest last
    for command, argv in found:
        await _check_command(kp, server_args, command, argv, created)


async def _check_command(kp: KernelpoolServer, server_args: list[str], command: str, argv: list[str],
                         created: list[str]) -> None:
    what, rest = argv[:2], argv[2:]
    if argv == ["serve"]:  # first start: creates user 'default', prints its token once
        kp.start(*server_args)
        printed = re.search(r"created user 'default'.*?\n\s+(kp_\S+)\n", kp.log(), re.S)
        assert printed, kp.log()
        assert kp.log().count(printed.group(1)) == 1 and await _answers(kp, printed.group(1)), command
        kp.tokens["default"] = printed.group(1)
    elif what == ["users", "add"]:  # the token is the only line on stdout
        out = kp.cli(*argv)
        assert re.fullmatch(r"kp_\S+\n", out.stdout), (command, out.stdout)
        kp.tokens[rest[0]] = out.stdout.strip()
        assert await _answers(kp, kp.tokens[rest[0]]), command
    elif what == ["tokens", "create"]:
        token = kp.cli(*argv).stdout.strip()
        assert re.fullmatch(r"kp_[0-9a-f]{8}_\S+", token) and await _answers(kp, token), command
        created.append(token)
        row = next(line for line in kp.cli("tokens", "list", rest[0]).stdout.splitlines()
                   if line.startswith(token.split("_")[1] + "\t"))
        if "--expires" in rest:
            days = int(rest[rest.index("--expires") + 1].removesuffix("d"))
            expires = dt.datetime.fromisoformat(row.split("expires=")[1])
            assert abs(expires - dt.datetime.now(dt.UTC) - dt.timedelta(days=days)) < dt.timedelta(minutes=5), row
    elif what == ["tokens", "list"]:  # ids and states, never the secrets
        out = kp.cli(*argv).stdout
        rows = [line.split("\t") for line in out.splitlines()]
        assert rows and all(row[2] in ("active", "revoked", "expired") for row in rows), out
        assert all(row[1] == rest[0] for row in rows) if rest else {row[1] for row in rows} >= set(kp.tokens)
        ids = {row[0] for row in rows}
        assert {t.split("_")[1] for t in created} <= ids, out
        assert not [t for t in [*kp.tokens.values(), *created] if t in out], "a secret was listed"
    elif what == ["tokens", "revoke"]:
        assert rest in (["<id>"], ["TOKEN_ID"]), command  # the id of the token just created
        token = created[-1]
        kp.cli("tokens", "revoke", token.split("_")[1])
        assert _refused(kp, token), "the revoked token still works"
    elif what == ["users", "set-limits"]:  # per kernel; --user-* for all her kernels
        from kernelpool.cli import LIMIT_OPTIONS

        kp.cli(*argv)
        given = dict(zip(rest[1::2], rest[2::2], strict=True))
        limits = _users(kp)[rest[0]]
        for option, value in given.items():
            assert limits[LIMIT_OPTIONS[option]] == value or float(limits[LIMIT_OPTIONS[option]]) == float(value), limits
        helped = kp.cli("users", "set-limits", "--help").stdout
        assert all(f"--user-{x}" in helped for x in ("memory", "cpus", "pids")), helped
    elif what == ["users", "remove"]:
        assert rest[1:] in ([], ["[--delete-files]"]), command
        name = rest[0]
        kp.cli("users", "remove", name, *(["--delete-files"] if rest[1:] else []))
        assert name not in _users(kp) and _refused(kp, kp.tokens.pop(name))
        assert not rest[1:] or not os.path.exists(os.path.join(kp.data_dir, "users", name)), "the folder stayed"
    elif argv[0] == "audit":  # every tool call: who, tool, notebook, outcome, duration
        deadline = time.monotonic() + 10
        while not (rows := [line.split("\t") for line in kp.cli(*argv).stdout.splitlines()]):
            assert time.monotonic() < deadline, f"{command}: no rows"
            time.sleep(0.1)
        user = argv[argv.index("--user") + 1] if "--user" in argv else None
        for when, who, tool, notebook, outcome, took, *_ in rows:
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", when) and user in (None, who), rows
            assert tool and notebook and outcome and took.endswith("ms"), rows
        assert any(row[2] == "list_notebooks" and row[4] == "ok" for row in rows), rows
    elif argv == ["doctor"]:  # what isolation this host can give, what is in force, the data folder
        out = kp.cli("doctor", check=False)
        assert out.returncode == 0 or SANDBOX_SKIP, out
        assert re.search(rf"^data folder:\s+{re.escape(kp.data_dir)}: .* free", out.stdout, re.M), out.stdout
        assert re.search(r"^in force:\s+\S", out.stdout, re.M) and "switch uids:" in out.stdout, out.stdout
    else:
        pytest.fail(f"no check for the documented command {command!r}: add one here")


# ---- connecting clients -----------------------------------------------------------------------------

def _tools_in_readme() -> set[str]:
    table = [line for line in read("README.md").split("\n## Tools\n", 1)[1].splitlines() if line.startswith("| `")]
    return {name for row in table for name in re.findall(r"`(\w+)[(`]", row.split(" | ")[0])}


async def test_the_readme_tools_table_names_every_tool(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        served = {tool.name for tool in (await c.list_tools()).tools}
    assert _tools_in_readme() == served


def _fill(args: list[str], url: str, token: str) -> list[str]:
    """A documented command's arguments with the placeholders URL and TOKEN (or $TOKEN) filled in."""
    return [url if arg == "URL" else re.sub(r"\$?TOKEN\b", token, arg) for arg in args]


async def test_the_claude_code_command_connects_to_a_real_server(kp: KernelpoolServer) -> None:
    """`claude mcp add` as the README and docs/clients.md show it. Claude Code itself is not run here
    (it needs an account); what the command hands it is: the transport (streamable HTTP), the URL
    (what `kernelpool serve` prints on its defaults) and the header. With exactly that header, a
    client in the session protocol Claude Code speaks runs `1+1` in `hello.ipynb`, and a wrong
    token is refused."""
    shown = [(page, command) for page, command in documented_commands() if command.startswith("claude ")]
    assert {page for page, _ in shown} == {"README.md", "docs/clients.md"}, shown
    settings = Settings.model_fields
    default_url = f"http://{settings['host'].default}:{settings['port'].default}/mcp"
    for page, command in shown:
        args = shlex.split(command)
        assert args[:3] == ["claude", "mcp", "add"] and args[args.index("--transport") + 1] == "http", command
        header = args[args.index("--header") + 1]
        positional = [a for i, a in enumerate(args[3:], 3) if not a.startswith("--") and args[i - 1] not in
                      ("--transport", "--header")]
        assert positional[0] == "kernelpool" and positional[1] in ("URL", default_url), command
        name, _, value = _fill([header], kp.url, kp.tokens["alice"])[0].partition(": ")
        http = httpx2.AsyncClient(headers={name: value}, timeout=httpx2.Timeout(30, read=120))
        async with http, Client(streamable_http_client(kp.url, http_client=http), mode="legacy") as c:  # type: ignore[arg-type]
            r = await c.call_tool("use_notebook", {"notebook": "hello.ipynb", "mode": "create"})
            assert not r.is_error or "already exists" in text(r), text(r)
            r = await c.call_tool("insert_execute_code_cell", {"notebook": "hello.ipynb", "cell_index": -1,
                                                               "cell_source": "1+1"})
            assert not r.is_error and text(r) == "2", (page, text(r))
        name, _, value = _fill([header], kp.url, "kp_00000000_wrong")[0].partition(": ")
        refused = httpx2.post(kp.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                              headers={name: value, "Accept": "application/json, text/event-stream"})
        assert refused.status_code == 401, page


INSPECTOR_DIR = os.path.join(ROOT, "tests", "node", "inspector")


def _inspector() -> dict[str, str]:
    """The MCP Inspector installed (npm ci from the committed lock, when missing or older than it) in
    INSPECTOR_DIR, where `npx @modelcontextprotocol/inspector` finds it; the environment to run it
    in (its own home: it keeps a catalog and secrets there)."""
    if node_env.missing():
        pytest.skip(f"the Inspector needs Node.js: {node_env.missing()}")
    stamp = os.path.join(INSPECTOR_DIR, "node_modules", ".package-lock.json")
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(os.path.join(INSPECTOR_DIR, "package-lock.json")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=INSPECTOR_DIR, check=True, timeout=600,
                       capture_output=True, text=True)
    home = tempfile.mkdtemp(prefix="kp-inspector-")
    return dict(os.environ, HOME=home, npm_config_update_notifier="false", MCP_AUTO_OPEN_ENABLED="false")


def _inspector_command(cli: bool) -> list[str]:
    shown = [shlex.split(c) for page, c in documented_commands()
             if page == "docs/clients.md" and c.startswith("npx @modelcontextprotocol/inspector")]
    found = [args for args in shown if ("--cli" in args) == cli]
    assert len(found) == 1, shown
    return found[0]


def test_the_inspector_cli_command_lists_the_tools(kp: KernelpoolServer) -> None:
    env = _inspector()
    try:
        args = _fill(_inspector_command(cli=True), kp.url, kp.tokens["bob"])
        out = subprocess.run(args, cwd=INSPECTOR_DIR, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert {tool["name"] for tool in json.loads(out.stdout)["tools"]} == _tools_in_readme()
        args = _fill(_inspector_command(cli=True), kp.url, "kp_00000000_wrong")
        out = subprocess.run(args, cwd=INSPECTOR_DIR, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode != 0 and "list_files" not in out.stdout, out.stdout
    finally:
        subprocess.run(["rm", "-rf", env["HOME"]], check=False)


def test_the_inspector_command_serves_its_page() -> None:
    """`npx @modelcontextprotocol/inspector` starts the Inspector's web page (on ports of the test's
    own); choosing the transport, URL and header there and connecting needs a browser: not run here."""
    env = _inspector() | {"CLIENT_PORT": str(free_port()), "MCP_SANDBOX_PORT": "0", "MCP_APP_ORIGIN_PORT": "0"}
    log = os.path.join(env["HOME"], "inspector.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(_inspector_command(cli=False), cwd=INSPECTOR_DIR, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (up := re.search(r"is up and running at:\s+(http://127\.0\.0\.1:\d+\S*)", open(log).read())):
            assert proc.poll() is None and time.monotonic() < deadline, open(log).read()
            time.sleep(0.5)
        assert f":{env['CLIENT_PORT']}" in up.group(1), up.group(1)
        page = httpx2.get(up.group(1), timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower(), page.text[:500]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and the servers it started: a group of our own
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        subprocess.run(["rm", "-rf", env["HOME"]], check=False)


# ---- a volume of its own size per user ----------------------------------------------------------------

def test_the_volume_commands_make_a_filesystem_of_its_own() -> None:
    """docs/deployment.md's loop-mounted volume per user, its commands run as shown with /srv/kp a
    folder of the test: alice's folder is a filesystem of its own, ext4, of 20G, so what her kernels
    write there cannot fill another's disk."""
    if os.geteuid() != 0:
        pytest.skip("mount needs root")
    shown = [c for page, c in documented_commands() if page == "docs/deployment.md" and "alice.img" in c]
    assert len(shown) == 2, shown
    top = tempfile.mkdtemp(prefix="kp-volume-", dir="/var/tmp")
    alice = os.path.join(top, "alice")
    try:
        for command in shown:
            out = subprocess.run(["bash", "-c", command.replace("/srv/kp", top)], capture_output=True, text=True,
                                 timeout=300)
            if out.returncode != 0 and "loop" in out.stderr and command.startswith("mkdir"):
                pytest.skip(f"no loop device on this host: {out.stderr.strip()}")
            assert out.returncode == 0, (command, out.stderr)
        assert os.stat(alice).st_dev != os.stat(top).st_dev, "not a filesystem of its own"
        kind = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", alice], capture_output=True, text=True)
        assert kind.stdout.strip() == "ext4", kind
        fs = os.statvfs(alice)
        assert 19 * 2**30 < fs.f_blocks * fs.f_frsize <= 20 * 2**30, fs
    finally:
        subprocess.run(["umount", alice], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", top], check=False)


# ---- benchmark commands named in the prose ------------------------------------------------------------

def test_the_benchmark_commands_in_the_docs_name_options_the_benchmarks_have() -> None:
    """The benchmarks take minutes to hours and are not run by the tests (timings belong in
    benchmarks/); every `python -m benchmarks.NAME ...` a page names is checked: the module exists and
    its --help lists each option given, and `--scenarios` names scenarios that exist."""
    from benchmarks.sessions import ALL

    named: dict[str, set[str]] = {}
    for page in pages():
        for module, options in re.findall(r"`(?:\S*python )?-m benchmarks\.(\w+)([^`]*)`", read(page)):
            named.setdefault(module, set()).update(re.findall(r"(?<!\S)--[a-z][a-z-]*", options))
            for chosen in re.findall(r"--scenarios\s+([\w,]+)", options):
                assert set(chosen.split(",")) <= set(ALL), (page, chosen)
    assert {"sessions", "profile", "soak"} <= set(named), named
    for module, options in named.items():
        out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert not [o for o in options if not re.search(rf"{o}\b", out.stdout)], (module, options, out.stdout)
