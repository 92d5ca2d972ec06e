"""The web layer's routes: sign-in, consent, sign-in links, the upstream OpenID sign-in, the
icon and the style sheet. Callers: `kernelpool.app`, which builds `Web` once."""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from kernelpool.web.pages import HERE
from kernelpool.web.signin import SignIn, Web


def web_routes(web: Web, extra: list[BaseRoute] | None = None) -> list[BaseRoute]:
    signin = SignIn(web)
    static = os.path.join(HERE, "static")
    return [
        Route("/signin", signin.signin_page, methods=["GET"]),
        Route("/signin", signin.signin_token, methods=["POST"]),
        Route("/login/{secret}", signin.link_page, methods=["GET"]),
        Route("/login/{secret}", signin.link_use, methods=["POST"]),
        Route("/consent", signin.consent_page, methods=["GET"]),
        Route("/consent", signin.consent, methods=["POST"]),
        *(extra or []),
        Mount("/static", app=StaticFiles(directory=static)),
        Route("/icon.svg", icon, methods=["GET"]),
    ]


async def icon(request: Request) -> Response:
    """The server's icon: in the pages, and named in the MCP server's `icons` for clients."""
    return FileResponse(os.path.join(HERE, "static", "icon.svg"), media_type="image/svg+xml",
                        headers={"Cache-Control": "public, max-age=86400"})
