"""A real browser for the OAuth tests: Debian's Chromium, driven by Playwright.

Playwright cannot download its own browsers here, so it launches /usr/bin/chromium. The flags
keep a headless Chromium from trying the network (closed here), which otherwise floods refused
connections; Playwright gives each browser a fresh profile folder of its own. As root Chromium
needs --no-sandbox. Used by tests/test_oauth*.py, tests/test_web_view.py and by tests/oauth_browser.py (the browser
command that mcp-remote runs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

CHROMIUM = os.environ.get("KERNELPOOL_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK) and shutil.which("chromium") is None:
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


async def launch(playwright: Any) -> Any:
    """A headless Chromium (async Playwright)."""
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Playwright and a headless Chromium for the time of the block (a module's fixture)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        b = await launch(playwright)
        try:
            yield b
        finally:
            await b.close()


async def sign_in_with_token(page: Any, url: str, user: str, token: str) -> None:
    """On a kernelpool sign-in page (at `url`, or already open when `url` is empty): give the
    user name and token."""
    if url:
        await page.goto(url)
    await page.get_by_label("User name", exact=True).fill(user)
    await page.get_by_label("Token", exact=True).fill(token)
    await page.get_by_role("button", name="Sign in", exact=True).click()


async def consent(page: Any, decision: str = "Allow") -> None:
    """On the consent page: press Allow or Deny (by their accessible names)."""
    await page.get_by_role("button", name=decision, exact=True).click()


async def capture_redirect(page: Any, prefix: str) -> Any:
    """Answer the browser's requests to `prefix` (a client's loopback redirect URI) with a small
    page, and return a future of the first such URL's query parameters."""
    import asyncio

    got: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def handle(route: Any) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(route.request.url).query))
        if not got.done():
            got.set_result(query)
        await route.fulfill(status=200, content_type="text/plain", body="done; you may close this window")

    await page.route(f"{prefix}*", handle)
    return got
