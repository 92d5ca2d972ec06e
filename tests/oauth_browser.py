#!/usr/bin/env python3
"""The browser of an MCP client under test: `oauth_browser.py URL` opens an authorization URL in
headless Chromium, signs in with a kernelpool token (KP_TEST_USER, KP_TEST_TOKEN), presses Allow,
and waits until the browser has reached the client's redirect URI (the client's own callback
server answers it). mcp-remote runs it as its browser (through xdg-open's $BROWSER), and
tests/node/oauth-client.mjs runs it from the TypeScript SDK's redirectToAuthorization.
Writes what it saw to stderr; exits 1 if the flow did not reach the redirect URI."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from playwright.sync_api import sync_playwright

from testkit.browser import CHROMIUM, CHROMIUM_ARGS


def main(url: str) -> int:
    base = url.split("/authorize")[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            if "/signin" in page.url:
                page.get_by_label("User name", exact=True).fill(os.environ["KP_TEST_USER"])
                page.get_by_label("Token", exact=True).fill(os.environ["KP_TEST_TOKEN"])
                page.get_by_role("button", name="Sign in", exact=True).click()
            page.get_by_role("button", name="Allow", exact=True).click()
            page.wait_for_url(lambda u: not u.startswith(base), timeout=30_000)
            page.wait_for_load_state()
            print(f"oauth_browser: reached {page.url.split('?')[0]}", file=sys.stderr)
            return 0
        except Exception as exc:
            print(f"oauth_browser: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
