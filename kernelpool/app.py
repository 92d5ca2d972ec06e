"""The Starlette app: /mcp (the MCP SDK's streamable HTTP), /healthz, /metrics; and its lifespan.

The lifespan opens everything in order (store, users' folders and accounts, leftovers from a
dead server, the MCP session manager, housekeeping) and closes it in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Callable, Iterable

from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernelpool import __version__
from kernelpool.config import Settings
from kernelpool.disk import DiskSpace
from kernelpool.errors import LimitReached
from kernelpool.executions.jobs import JobService
from kernelpool.executions.service import ExecutionService
from kernelpool.kernels.isolation import Isolation, decide
from kernelpool.kernels.networks import UserNetworkPolicy
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.kernels.zygote.server import ForkServer
from kernelpool.mcp.auth import SCOPE, StoreTokenVerifier
from kernelpool.mcp.events import EventScope, SessionEventStore
from kernelpool.mcp.notices import Notices
from kernelpool.mcp.resources import notebook_uri
from kernelpool.mcp.server import build_mcp
from kernelpool.metrics import Metrics
from kernelpool.notebooks.service import NotebookService
from kernelpool.notebooks.workspace import Workspace
from kernelpool.services import Services
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from kernelpool.users.sessions import SessionContexts
from kernelpool.users.throttle import AuthThrottle
from kernelpool.users.tokens import create_token
from sandbox import SafeRoot
from sandbox.limits import parse_memory

log = logging.getLogger(__name__)

def base_url(settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}"


def create_app(settings: Settings, isolation: Isolation | None = None,
               announce: Callable[[str], None] | None = None) -> Starlette:
    """Build the app; `isolation` defaults to what `isolation.decide` finds (it raises where the host cannot isolate)."""
    iso = isolation or decide(settings)
    store = Store(settings.db_path, audit_queue_max=settings.audit_queue_max)
    metrics = Metrics()
    users = UserService(settings, store, isolated=iso.sandboxed)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    disk = DiskSpace(settings.data_dir, settings.disk_free_floor_bytes)

    def root_of(user: str) -> SafeRoot:
        uid, gid = users.owner(user)
        return SafeRoot(users.folder(user), uid, gid)

    notebooks = NotebookService(root_of, disk_check=disk.check)
    # started in the lifespan; until then, and if it cannot start, kernels start the stock way
    fork_server = ForkServer(settings.kernel_python or sys.executable) if settings.fork_server else None
    kernels = KernelRegistry(settings, store, users, iso.cgroups, UserNetworkPolicy(iso.network),
                             fork_server=fork_server, disk_check=disk.check, metrics=metrics)
    notices = Notices(settings.session_idle_timeout)
    events = _event_store(settings, notices)
    sessions = SessionContexts(settings.session_idle_timeout, settings.max_sessions_per_user)
    jobs = JobService(settings, kernels, notebooks, users, metrics)
    services = Services(
        settings=settings, store=store, users=users, notebooks=notebooks,
        workspace=Workspace(notebooks, kernels, users, sessions), kernels=kernels, jobs=jobs,
        executions=ExecutionService(settings, jobs, notebooks), sessions=sessions, metrics=metrics,
        notices=notices, events=events,
    )
    notebooks.listeners.append(lambda user, path: notices.resource_updated(user, notebook_uri(path)))
    verifier = StoreTokenVerifier(store, on_failure=lambda reason: metrics.auth_failures.labels(reason).inc())
    throttle = AuthThrottle(settings.auth_failures_before_backoff, settings.auth_failure_window,
                            settings.auth_backoff, settings.trusted_proxies)
    url = base_url(settings)
    auth = AuthSettings(
        issuer_url=AnyHttpUrl(url), resource_server_url=AnyHttpUrl(f"{url}/mcp"), required_scopes=[SCOPE],
        validate_token_resource=False,  # our tokens are minted for this server only
    )
    mcp = build_mcp(services, verifier, auth)
    loopback = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=loopback + settings.allowed_hosts,
        allowed_origins=[f"http://{h}" for h in loopback] + settings.allowed_origins,
    )
    mcp_app = mcp.streamable_http_app(
        transport_security=security, session_idle_timeout=settings.session_idle_timeout, host=settings.host,
        event_store=events, retry_interval=settings.sse_retry_ms if events is not None else None,
        max_sessions=settings.max_sessions,
    )
    manager = mcp.session_manager
    # The SDK keeps its open sessions in this dict and offers no public view of them (mcp 2.3.0,
    # pinned in requirements.lock); tests/test_starve.py fails if a session's end is not seen here.
    services.sessions.set_live(lambda: manager._server_instances)
    manager.asgi_app = _SessionGate(manager.asgi_app, services.sessions)  # type: ignore[assignment]
    metrics.add_gauges(lambda: _live_gauges(services))

    async def healthz(request: Request) -> Response:
        space = disk.report()
        return JSONResponse({
            "status": "ok" if not space["low"] else "disk low", "version": __version__,
            "isolation": iso.describe() | {"network": {
                "mode": services.kernels.networks.mode, "namespaces": services.kernels.networks.users_with_namespace()}},
            "kernels": len(services.kernels.all()), "warm_kernels": len(services.kernels.pooled()),
            "kernels_counted": services.kernels.count(), "disk": space,
            "audit": {"pending": store.audit_pending, "dropped": store.audit_dropped, "failing": store.audit_failing},
        })

    async def metrics_endpoint(request: Request) -> Response:
        # per-user names and usage: only for the holder of metrics_token (see README, Monitoring)
        if settings.metrics_token is None:
            return PlainTextResponse("metrics are off: set metrics_token and scrape with "
                                     "'Authorization: Bearer <metrics_token>'\n", status_code=403)
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.metrics_token}".encode()):
            return PlainTextResponse("metrics need 'Authorization: Bearer <metrics_token>'\n", status_code=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="kernelpool-metrics"'})
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        try:
            rows = await store.list_users()
            if not rows:
                row = await users.add(settings.first_user)
                _, token = await create_token(store, row.name)
                (announce or _print)(
                    f"kernelpool: created user {row.name!r}. Its token (shown once):\n\n    {token}\n\n"
                    f"MCP URL: {url}/mcp  (header  Authorization: Bearer <token>)\n"
                )
                rows = [row]
            # what an earlier server (maybe an older version, with another layout) left behind:
            # its kernels and cgroups, then the runtime folder, before users' folders are made
            reaped = await services.kernels.reap_leftovers()
            if reaped:
                log.warning("cleaned up %d kernel(s) or cgroup(s) left behind by a previous server", reaped)
            if users.clean_runtime():
                log.info("emptied %s, left by a previous server", settings.run_dir)
            await services.kernels.networks.start()
            await users.load()  # folders, and passwd entries that a new container lacks
            if fork_server is not None:
                await _start_fork_server(fork_server)
            housekeeping = asyncio.get_running_loop().create_task(_housekeeping(services))
            try:
                async with mcp.session_manager.run():
                    yield
            finally:
                housekeeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await housekeeping
                await services.jobs.close()
                await services.kernels.close()
                try:
                    await services.kernels.networks.close()
                except Exception as exc:
                    log.warning("removing the users' network namespaces: %s", exc)
                if fork_server is not None:
                    await fork_server.close()
        finally:
            await store.close()

    app = Starlette(
        routes=[Route("/healthz", healthz), Route("/metrics", metrics_endpoint), Mount("/", app=EventScope(mcp_app, events) if events is not None else mcp_app)],
        middleware=[Middleware(_AuthGuard, throttle=throttle, verifier=verifier)],
        lifespan=lifespan,
    )
    app.state.services = services

    async def before_shutdown() -> None:
        """Called by `cli` when the server starts to shut down, while clients' streams are still open."""
        sent = await notices.to_everyone("warning", "the server is shutting down; running executions end with it")
        if sent:
            await asyncio.sleep(0.2)  # let the messages reach the streams before they close

    app.state.before_shutdown = before_shutdown
    return app


def _event_store(settings: Settings, notices: Notices) -> SessionEventStore | None:
    if settings.resume_events_per_session == 0:
        return None

    what = "bytes kept for stream resumption"

    def usage(user: str, used: int, limit: int) -> None:
        if notices.crossed(user, what, used, limit, settings.near_limit_ratio):
            asyncio.get_running_loop().create_task(notices.near(user, what, used, limit))

    return SessionEventStore(
        max_events=settings.resume_events_per_session, max_bytes=parse_memory(settings.resume_bytes_per_session),
        max_user_bytes=parse_memory(settings.resume_bytes_per_user), max_age=settings.resume_max_age,
        session_lifetime=settings.session_idle_timeout, on_user_usage=usage,
    )


async def _start_fork_server(fork_server: ForkServer) -> None:
    # without one (off, or it cannot start) kernels start the stock way: slower, not less safe
    try:
        await fork_server.start()
    except Exception as exc:
        log.error("fork server did not start, kernels will start without it: %s", exc)


class _SessionGate:
    """Around the SDK's session manager (inside its auth): a request that would open an MCP session
    is counted against its user's `max_sessions_per_user` first, and the id it gets is recorded as
    issued to that user (`SessionContexts`)."""

    def __init__(self, app: ASGIApp, sessions: SessionContexts) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = getattr(getattr(scope.get("user"), "access_token", None), "client_id", None)
        if user is None or not _opens_session(scope):
            await self.app(scope, receive, send)
            return
        try:
            self.sessions.reserve(user)
        except LimitReached as exc:
            body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": str(exc)}}
            await JSONResponse(body, status_code=429)(scope, receive, send)
            return
        recorded = False

        async def watch(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                sid = None
                if message["status"] < 400:
                    sid = next((v.decode("latin-1") for k, v in message.get("headers", []) if k.lower() == b"mcp-session-id"), None)
                self.sessions.opened(user, sid)  # before the client can see the id and use it
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not recorded:
                self.sessions.opened(user, None)


def _opens_session(scope: Scope) -> bool:
    # as the SDK decides it: a POST without a session id, in a handshake protocol (or none named)
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    headers = dict(scope["headers"])
    if b"mcp-session-id" in headers:
        return False
    version = headers.get(b"mcp-protocol-version")
    return version is None or version.decode("latin-1") in HANDSHAKE_PROTOCOL_VERSIONS


class _AuthGuard:
    """Failed authentication per client address (`AuthThrottle`): counts the 401s the app answers,
    and answers 429 with Retry-After to an address in back-off, unless its request's token is valid."""

    def __init__(self, app: ASGIApp, throttle: AuthThrottle, verifier: StoreTokenVerifier) -> None:
        self.app = app
        self.throttle = throttle
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        address = self.throttle.client_address(scope)
        wait = self.throttle.retry_after(address)
        if wait > 0 and not await self._valid_token(scope):
            self.throttle.refused(address)
            body = {"error": "too many failed authentications from your address",
                    "retry_after": math.ceil(wait)}
            await Response(json.dumps(body), status_code=429, media_type="application/json",
                           headers={"Retry-After": str(math.ceil(wait))})(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.throttle.failed(address, "invalid or missing token")
            await send(message)

        await self.app(scope, receive, watch)

    async def _valid_token(self, scope: Scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if scope["path"] == "/metrics":
            return False  # the metrics token is checked by its endpoint; a user token is no use there
        return await self.verifier.verify_token(token.strip()) is not None


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _housekeeping(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.housekeeping_interval)
        try:
            services.sessions.expire()
            services.notices.expire()
            if services.events is not None:
                services.events.expire()
            services.jobs.prune()
            await services.kernels.cull_idle()
            await services.kernels.networks.refresh()
            await services.users.load()  # users that the CLI added while we run
        except Exception:
            log.exception("housekeeping failed")


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def _live_gauges(services: Services) -> Iterable[GaugeMetricFamily]:
    yield _gauge("kernelpool_sessions", "MCP sessions with a context", len(services.sessions))
    yield _gauge("kernelpool_audit_pending", "audit rows waiting to be written", services.store.audit_pending)
    yield _gauge("kernelpool_audit_dropped", "audit rows dropped because the queue was full", services.store.audit_dropped)
    yield _gauge("kernelpool_result_bytes", "finished background results kept in memory", services.jobs.result_bytes())
    kernels = GaugeMetricFamily("kernelpool_kernels", "kernels by user and state", labels=["user", "state"])
    counts: dict[tuple[str, str], int] = {}
    for k in services.kernels.all():
        counts[(k.user, k.state.value)] = counts.get((k.user, k.state.value), 0) + 1
    for k in services.kernels.pooled():
        counts[(k.user, "warm")] = counts.get((k.user, "warm"), 0) + 1
    for (user, state), n in counts.items():
        kernels.add_metric([user, state], n)
    yield kernels
    if services.events is not None:
        yield _gauge("kernelpool_resume_events", "events kept for stream resumption", services.events.count())
    memory = GaugeMetricFamily("kernelpool_user_memory_bytes", "memory of a user's kernels", labels=["user"])
    cpu = GaugeMetricFamily("kernelpool_user_cpu_seconds", "CPU time of a user's kernels", labels=["user"])
    for user, (mem, secs) in services.kernels.usage().items():
        if mem is not None:
            memory.add_metric([user], mem)
        if secs is not None:
            cpu.add_metric([user], secs)
    yield memory
    yield cpu
