"""Rendering the server's pages: Jinja2 templates (autoescaped) in `templates/`, and the headers
every page carries. No JavaScript is needed to use any page. Callers: the web routes."""

from __future__ import annotations

import os
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, Response

HERE = os.path.dirname(os.path.abspath(__file__))
_env = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")), autoescape=select_autoescape(default=True))

# pages show who is signed in and carry form tokens: never cached, never framed (a consent
# page in someone else's frame could be clicked through), no referrer (the query names requests)
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'",
}


def page(template: str, status_code: int = 200, headers: dict[str, str] | None = None, **context: Any) -> Response:
    body = _env.get_template(template).render(**context)
    return HTMLResponse(body, status_code=status_code, headers=HEADERS | (headers or {}))


def message(title: str, text: str, status_code: int, headers: dict[str, str] | None = None) -> Response:
    """A page that says one thing: an error, or that something is done."""
    return page("message.html", status_code, headers, title=title, text=text)
