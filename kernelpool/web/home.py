"""The web view among replicas: a person's pages come from their home replica.

A person's notebooks, kernels and live updates exist only on their home replica, but a browser
carries no token for HAProxy to route by: it reaches the `any` backend, which keeps it on one
replica with HAProxy's sticky cookie (`kp_replica`, named after the replica). When a signed-in
person opens a view page on another replica, that replica sends the browser home:
- it sets `kp_replica` to the home's name (HAProxy's `cookie ... preserve` keeps the server's
  value), so HAProxy sends the browser's next requests to the home replica;
- it hands the sign-in over, since sign-ins are kept in each replica's memory: a one-time ticket
  in the shared store (a sign-in link valid `HANDOFF_SECONDS`), whose secret is split between the
  redirect URL and a cookie limited to the hand-off path, so a URL seen in a log or a Referer
  signs nobody in;
- the home replica takes the ticket (`/view/handoff/<ticket>`), signs the browser in and goes on
  to the page asked for.
A ticket redeemed on a replica that is not the person's home (HAProxy could not reach it and sent
the browser elsewhere) ends in a page saying so, not in another redirect: no loop.
Callers: `kernelpool.web.viewbase.ViewBase.person`, `kernelpool.web.view` (the route).
"""

from __future__ import annotations

import secrets
import urllib.parse

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kernelpool.store import Store
from kernelpool.users.grants import GrantStore
from kernelpool.web.browser import Browsers
from kernelpool.web.pages import HEADERS, message
from kernelpool.web.signin import view_target

REPLICA_COOKIE = "kp_replica"  # HAProxy's: `cookie kp_replica insert indirect nocache httponly preserve`
HANDOFF_COOKIE = "kp_handoff"
HANDOFF_PATH = "/view/handoff"
HANDOFF_SECONDS = 30.0


async def send_home(grants: GrantStore, browsers: Browsers, request: Request, user: str, home: str) -> Response:
    """The redirect that moves this browser, signed in as `user`, to its home replica `home`."""
    here = view_target(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    ticket, half = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    await grants.create_link(user, HANDOFF_SECONDS, secret=f"{ticket}.{half}")
    response = RedirectResponse(f"{HANDOFF_PATH}/{ticket}?next={urllib.parse.quote(here, safe='/')}", status_code=303,
                                headers=HEADERS)
    response.set_cookie(REPLICA_COOKIE, home, httponly=True, samesite="lax", secure=browsers.secure, path="/")
    response.set_cookie(HANDOFF_COOKIE, half, max_age=int(HANDOFF_SECONDS), httponly=True, samesite="lax",
                        secure=browsers.secure, path=HANDOFF_PATH)
    return response


async def take_handoff(store: Store, grants: GrantStore, browsers: Browsers, replica: str | None,
                       request: Request) -> Response:
    """`/view/handoff/<ticket>`: sign this browser in with the ticket, on the person's home replica."""
    browser, cookie = browsers.get(request)
    half = request.cookies.get(HANDOFF_COOKIE, "")
    user = await grants.link_user(f"{request.path_params['ticket']}.{half}", take=True) if half else None
    row = await store.get_user(user) if user is not None else None
    if user is None or row is None:
        await grants.audit(None, "signin", "refused", "hand-off to the home replica: unknown, used or expired")
        response = message("Sign-in not handed over",
                           "This hand-over of your sign-in is unknown, used or expired. Open the view again.", 401)
    elif row.home is not None and row.home != replica:
        await grants.audit(user, "signin", "refused", f"hand-off: reached replica {replica}, not the home {row.home}")
        response = message("Your home replica is not reachable",
                           f"Your notebooks are served by replica {row.home}, which the proxy could not reach just now "
                           f"(this is {replica}). Try again in a moment.", 503)
    else:
        browsers.sign_in(browser, user, row.uid)
        await grants.audit(user, "signin", "ok", f"hand-off to the home replica {replica}")
        response = RedirectResponse(view_target(request.query_params.get("next")), status_code=303, headers=HEADERS)
    response.delete_cookie(HANDOFF_COOKIE, path=HANDOFF_PATH)
    browsers.set_cookie(response, cookie)
    return response
