"""The commands the documentation shows, read from its pages, and the registry of the tests that run
or check each one (tests/test_docs.py fails when a page shows a command the registry lacks).

A command block is a fence marked `sh` or `dockerfile` in README.md, CONTRIBUTING.md or docs/*.md.
Each command in it (continuation lines joined, the comment after it dropped, white space collapsed)
is a key of COMMANDS. Other fences name what they hold (OTHER_FENCES); an unmarked fence is an error,
so a command cannot slip in without a test.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from testkit.server import ROOT

COMMAND_FENCES = {"sh", "dockerfile"}
OTHER_FENCES = {"json", "nginx", "caddy", "text", "toml"}


def pages() -> list[str]:
    """Every page of the documentation, relative to the checkout."""
    found = ["README.md", "CONTRIBUTING.md"]
    found += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return found


def read(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


@dataclass
class Fence:
    page: str
    line: int  # of the opening fence, 1-based
    info: str
    body: str


def fences(page: str) -> list[Fence]:
    """The fenced blocks of a page, in order."""
    found: list[Fence] = []
    lines = read(page).splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*(`{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        ticks, info, start = opening.group(1), opening.group(2).strip(), i
        i += 1
        body: list[str] = []
        while i < len(lines) and not re.match(rf"^\s*{ticks}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        found.append(Fence(page, start + 1, info, "\n".join(body)))
        i += 1
    return found


def _without_comment(line: str) -> str:
    """`line` up to a `#` that starts a shell comment (at the start, or after white space, outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(fence: Fence) -> list[str]:
    """The commands of a command block, each as one line: continuations joined, comments dropped,
    white space collapsed (nothing the pages show depends on repeated spaces)."""
    found: list[str] = []
    pending = ""
    for raw in fence.body.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = " ".join(_without_comment(pending + raw).split())
        pending = ""
        if line:
            found.append(line)
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every command of every command block, in page order."""
    return [(fence.page, command) for page in pages() for fence in fences(page)
            if fence.info in COMMAND_FENCES for command in commands(fence)]


# ---- the registry -------------------------------------------------------------------------------
#
# command -> (how it is covered, the tests that do it). "Runs" means the test runs the text read from
# the page; "checks" says what is checked where the command itself cannot run here, and why.

README_SERVE = "scripts/install /opt/kernelpool && /opt/kernelpool/bin/kernelpool serve"
DOCKER_RUN = ("docker run -d --name kernelpool --restart unless-stopped --cgroupns=private --cap-drop=ALL "
              "--cap-add=SETUID --cap-add=SETGID --cap-add=CHOWN --cap-add=DAC_OVERRIDE --cap-add=FOWNER "
              "--cap-add=KILL --cap-add=SYS_ADMIN --cap-add=NET_ADMIN --sysctl net.ipv4.ip_forward=1 "
              "--security-opt apparmor=unconfined --stop-timeout 30 -p 127.0.0.1:8765:8765 -v /srv/kp/state:/data "
              "-v /srv/kp/alice:/data/users/alice -v /srv/kp/bob:/data/users/bob")
CLI = "tests/test_docs.py::test_the_cli_commands_of_a_page_against_a_real_server"
IMAGE_CLI = "tests/test_docker_image.py::test_users_and_tokens_via_docker_exec"
FRESH = "tests/test_readme.py::test_the_contributing_commands_on_the_fresh_machine"
INSPECTOR_CLI = "tests/test_docs.py::test_the_inspector_cli_command_lists_the_tools"
CLAUDE = "tests/test_docs.py::test_the_claude_code_command_connects_to_a_real_server"
VOLUME = "tests/test_docs.py::test_the_volume_commands_make_a_filesystem_of_its_own"
DERIVED = "tests/test_docker_image.py::test_derived_image_gives_kernels_its_package"
COMPOSE = "tests/test_compose.py::test_twenty_users_are_spread_over_the_replicas"

_RUNS_CLI = "runs the `kernelpool ...` part against a real server, checking what its comment says"
_RUNS_IN_IMAGE = ("runs the `kernelpool ...` part against a real server, checking what its comment says; "
                  "the image test runs it with `docker exec` in the container of the documented line")

COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    # README.md: the first two commands, as written, on a fresh Debian 12 in a container
    README_SERVE: ("runs it as written on a fresh Debian 12, twice",
                   ("tests/test_readme.py::test_the_first_command_on_a_fresh_debian",
                    "tests/test_readme.py::test_the_first_command_again_installs_nothing_and_keeps_the_data")),
    "scripts/test": ("runs it with pytest arguments on the fresh machine; CI's .ci/run runs it",
                     ("tests/test_readme.py::test_the_test_command_on_the_fresh_machine",
                      "tests/test_readme.py::test_readme_starts_with_the_two_commands")),
    # connecting a client
    'claude mcp add --transport http kernelpool http://127.0.0.1:8765/mcp --header "Authorization: Bearer $TOKEN"':
        ("checks it: the transport, URL and header it gives Claude Code reach a real server and run 1+1 in "
         "hello.ipynb with the Python SDK; Claude Code itself is not run here (it needs an account)", (CLAUDE,)),
    'claude mcp add --transport http kernelpool URL --header "Authorization: Bearer TOKEN"':
        ("checks it as the README's, with URL and TOKEN filled in", (CLAUDE,)),
    "claude mcp add --transport http kernelpool URL":
        ("checks it: by URL alone, the server's 401 leads to its OAuth metadata and sign-in page; a client "
         "that registers itself and signs in that way runs code (the Python SDK; Claude Code is not run here)",
         (CLAUDE, "tests/test_oauth.py::test_python_sdk_signs_in_by_dcr_and_runs_code")),
    "npx @modelcontextprotocol/inspector":
        ("runs it: the Inspector serves its page; connecting from that page needs a browser, not run here",
         ("tests/test_docs.py::test_the_inspector_command_serves_its_page",)),
    'npx @modelcontextprotocol/inspector --cli URL --transport http --header "Authorization: Bearer TOKEN" '
    "--method tools/list": ("runs it against a real server, with URL and TOKEN filled in", (INSPECTOR_CLI,)),
    # users and tokens (README.md), run on the host
    "kernelpool serve": (_RUNS_CLI, (CLI, "tests/test_cli.py::test_first_start_creates_a_user_and_prints_its_token_once")),
    "TOKEN=$(kernelpool users add alice)": (_RUNS_CLI, (CLI, "tests/test_cli.py::test_users_and_tokens")),
    "kernelpool tokens create alice --expires 30d": (_RUNS_CLI, (CLI,)),
    "kernelpool tokens list alice": (_RUNS_CLI, (CLI,)),
    "kernelpool tokens revoke <id>": (_RUNS_CLI + ", <id> being the token just created", (CLI,)),
    "kernelpool users set-limits alice --memory 4G --cpus 2 --pids 512": (_RUNS_CLI, (CLI,)),
    "kernelpool users remove alice [--delete-files]": (_RUNS_CLI + ", with --delete-files", (CLI,)),
    "kernelpool audit --user alice --since 1h": (_RUNS_CLI, (CLI,)),
    "kernelpool doctor": (_RUNS_CLI, (CLI, "tests/test_cli.py::test_doctor_reports_the_host")),
    # Docker (README.md and docs/deployment.md)
    "docker build -t kernelpool:0.1.0 .":
        ("runs it, with the tag of the run and `--build-arg BASE=` a stand-in base (no image registry here)",
         (IMAGE_CLI,)),
    "mkdir -p /srv/kp/state /srv/kp/alice /srv/kp/bob":
        ("makes the folders of every `-v` of the documented line, under a folder of the run", (IMAGE_CLI,)),
    DOCKER_RUN + " kernelpool:0.1.0":
        ("checks that the README's line is docs/deployment.md's without its hostname settings",
         ("tests/test_docs.py::test_readme_docker_quick_start_is_the_documented_line",)),
    DOCKER_RUN + " -e KERNELPOOL_PUBLIC_URL=https://kp.example.com "
    "-e KERNELPOOL_ALLOWED_HOSTS='[\"kp.example.com\", \"kp.example.com:*\"]' kernelpool:0.1.0":
        ("runs it, with only the container's name, host folders, host port and image swapped",
         ("tests/test_docker_image.py::test_documented_line_is_what_runs", IMAGE_CLI)),
    "TOKEN=$(docker exec kernelpool kernelpool users add alice)": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    "docker logs kernelpool": ("reads the container's log: the first start printed the token of the user it made",
                               (IMAGE_CLI,)),
    "FROM kernelpool:0.1.0": ("builds an image `FROM` the image under test and runs it on the same volumes", (DERIVED,)),
    "RUN pip install bash_kernel==0.10.0 && python -m bash_kernel.install --sys-prefix":
        ("builds the page's block as written, FROM the image under test: a bash notebook runs as the user's uid",
         (DERIVED,)),
    "ENV KERNELPOOL_KERNELSPECS=bash":
        ("builds the page's block as written: list_kernelspecs offers python3 and bash", (DERIVED,)),
    "RUN pip install numpy==2.3.5 pandas==2.3.3 matplotlib==3.10.7":
        ("checks the same `RUN pip install` with one small package (tabulate): kernels import it", (DERIVED,)),
    "truncate -s 20G /srv/kp/alice.img && mkfs.ext4 -q /srv/kp/alice.img":
        ("runs it with /srv/kp a folder of the test", (VOLUME,)),
    "mkdir -p /srv/kp/alice && mount -o loop /srv/kp/alice.img /srv/kp/alice":
        ("runs it with /srv/kp a folder of the test: a filesystem of its own, of that size", (VOLUME,)),
    # an upstream OpenID provider on the docker run line (docs/deployment.md)
    "-e KERNELPOOL_PUBLIC_URL=https://kp.example.com -e KERNELPOOL_OIDC_ISSUER=https://sso.example.com/realms/team "
    '-e KERNELPOOL_OIDC_NAME="Example SSO" -e KERNELPOOL_OIDC_CLIENT_ID=kernelpool '
    "-e KERNELPOOL_OIDC_CLIENT_SECRET_FILE=/run/secrets/kp-oidc -e KERNELPOOL_OIDC_SCOPES=openid,email,profile "
    "-e KERNELPOOL_OIDC_ALLOWED_GROUPS=/kernelpool -e KERNELPOOL_OIDC_CREATE_USERS=true":
        ("checks it: each variable is a setting read as the value shown, and the redirect URI to register is the "
         "server's callback; the provider it names does not exist here (sign-ins through a real provider with "
         "these settings: tests/test_oidc.py)",
         ("tests/test_docs.py::test_the_oidc_settings_of_the_docker_line_are_settings_kernelpool_takes",
          "tests/test_oidc.py::test_first_sign_ins_create_users_that_work")),
    # users and tokens in the container (docs/deployment.md)
    "docker exec kernelpool kernelpool users add alice": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    "TOKEN=$(docker exec kernelpool kernelpool users add bob)": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    "docker exec kernelpool kernelpool tokens create alice --expires 30d": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    "docker exec kernelpool kernelpool tokens list": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    "docker exec kernelpool kernelpool tokens revoke TOKEN_ID": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    "docker exec kernelpool kernelpool users set-limits alice --memory 4G --cpus 2": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    "docker exec kernelpool kernelpool audit --user alice --since 1d":
        (_RUNS_CLI + "; the image test reads the audit log with `docker exec` too",
         (CLI, "tests/test_docker_image.py::test_old_images_volumes_upgrade_under_the_new_image")),
    "docker exec kernelpool kernelpool doctor": (_RUNS_IN_IMAGE, (CLI, IMAGE_CLI)),
    # CONTRIBUTING.md, run on the fresh machine after the README's test command
    "scripts/check": ("runs it with pytest arguments: ruff, mypy, then tests", (FRESH,)),
    "scripts/test tests/unit -q": ("runs it as written", (FRESH,)),
    "KERNELPOOL_TEST_FROM_SOURCE=1 /opt/kernelpool-venv/bin/python -m pytest tests/unit -q":
        ("runs it as written, from the checkout", (FRESH,)),
    "/opt/kernelpool-venv/bin/python -m pytest tests/unit":
        ("runs the same pytest on tests/unit as nobody, from a copy of the checkout, within 30 s",
         ("tests/test_unit_layer.py::test_the_unit_layer_passes_unprivileged_from_the_source_tree_in_time",)),
    # docs/scale-out.md: the Compose deployment, brought up by its test (marked docker)
    "cd deploy/compose": ("runs docker-compose in deploy/compose, on its docker-compose.yml", (COMPOSE,)),
    "export KERNELPOOL_DB_PASSWORD=$(openssl rand -hex 24)":
        ("gives docker-compose a random hex KERNELPOOL_DB_PASSWORD (Python's secrets, not openssl)", (COMPOSE,)),
    "docker-compose up -d":
        ("runs it (with a project name of the test's, an added file publishing each replica on loopback, and "
         "--no-build once the HAProxy and PostgreSQL images are built) and waits until all three replicas run",
         (COMPOSE,)),
    "TOKEN=$(docker-compose exec -T kp1 kernelpool users add alice)":
        ("runs `docker-compose exec -T kp1 kernelpool users add` for 20 users: one token on stdout each, and "
         "each user placed on the least-loaded replica", (COMPOSE,)),
    "docker-compose exec -T kp1 kernelpool replicas":
        ("runs it until it lists the three replicas as running; the test's checks read the homes it placed", (COMPOSE,)),
}
