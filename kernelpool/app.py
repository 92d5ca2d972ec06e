"""The Starlette app: /mcp (the MCP SDK's streamable HTTP), /healthz, /metrics; and its lifespan.

The lifespan opens everything in order (store, users' folders and accounts, leftovers from a
dead server, the MCP session manager, housekeeping) and closes it in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterable

from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from kernelpool import __version__
from kernelpool.auth import SCOPE, StoreTokenVerifier, create_token
from kernelpool.config import Settings
from kernelpool.isolation import Isolation, decide
from kernelpool.jobs import JobService
from kernelpool.kernels import KernelRegistry
from kernelpool.metrics import Metrics
from kernelpool.networks import UserNetworkPolicy
from kernelpool.notebooks import NotebookService
from kernelpool.services import Services
from kernelpool.sessions import SessionContexts
from kernelpool.store import Store
from kernelpool.tools import build_mcp
from kernelpool.users import UserService
from kernelpool.zygote import ForkServer
from sandbox import SafeRoot

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
    store = Store(settings.db_path)
    metrics = Metrics()
    users = UserService(settings, store, isolated=iso.sandboxed)

    def root_of(user: str) -> SafeRoot:
        uid, gid = users.owner(user)
        return SafeRoot(users.folder(user), uid, gid)

    notebooks = NotebookService(root_of)
    kernels = KernelRegistry(settings, store, users, iso.cgroups, UserNetworkPolicy(iso.network))
    services = Services(
        settings=settings, store=store, users=users, notebooks=notebooks, kernels=kernels,
        jobs=JobService(settings, kernels, notebooks, users, metrics),
        sessions=SessionContexts(settings.session_idle_timeout), metrics=metrics,
    )
    verifier = StoreTokenVerifier(store, on_failure=lambda reason: metrics.auth_failures.labels(reason).inc())
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
    )
    metrics.add_gauges(lambda: _live_gauges(services))

    async def healthz(request: Request) -> Response:
        return JSONResponse({
            "status": "ok", "version": __version__,
            "isolation": iso.describe() | {"network": {
                "mode": services.kernels.networks.mode, "namespaces": services.kernels.networks.users_with_namespace()}},
            "kernels": len(services.kernels.all()), "warm_kernels": len(services.kernels.pooled()),
        })

    async def metrics_endpoint(request: Request) -> Response:
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
            await users.load()  # folders, and passwd entries that a new container lacks
            reaped = await services.kernels.reap_leftovers()
            if reaped:
                log.warning("cleaned up %d kernel(s) left behind by a previous server", reaped)
            await services.kernels.networks.start()
            fork_server = await _start_fork_server(settings, services.kernels)
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
        routes=[Route("/healthz", healthz), Route("/metrics", metrics_endpoint), Mount("/", app=mcp_app)],
        lifespan=lifespan,
    )
    app.state.services = services
    return app


async def _start_fork_server(settings: Settings, kernels: KernelRegistry) -> ForkServer | None:
    # without one (off, or it cannot start) kernels start the stock way: slower, not less safe
    if not settings.fork_server:
        return None
    fork_server = ForkServer(settings.kernel_python or sys.executable)
    try:
        await fork_server.start()
    except Exception as exc:
        log.error("fork server did not start, kernels will start without it: %s", exc)
        return None
    kernels.fork_server = fork_server
    return fork_server


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _housekeeping(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.housekeeping_interval)
        try:
            services.sessions.expire()
            await services.kernels.cull_idle()
            await services.kernels.networks.refresh()
            await services.users.load()  # users that the CLI added while we run
        except Exception:
            log.exception("housekeeping failed")


def _live_gauges(services: Services) -> Iterable[GaugeMetricFamily]:
    sessions = GaugeMetricFamily("kernelpool_sessions", "MCP sessions with a context")
    sessions.add_metric([], len(services.sessions))
    yield sessions
    kernels = GaugeMetricFamily("kernelpool_kernels", "kernels by user and state", labels=["user", "state"])
    counts: dict[tuple[str, str], int] = {}
    for k in services.kernels.all():
        counts[(k.user, k.state.value)] = counts.get((k.user, k.state.value), 0) + 1
    for k in services.kernels.pooled():
        counts[(k.user, "warm")] = counts.get((k.user, "warm"), 0) + 1
    for (user, state), n in counts.items():
        kernels.add_metric([user, state], n)
    yield kernels
    hits = GaugeMetricFamily("kernelpool_pool_hits", "kernels handed out warm")
    hits.add_metric([], services.kernels.pool_hits)
    yield hits
    misses = GaugeMetricFamily("kernelpool_pool_misses", "kernels started on demand")
    misses.add_metric([], services.kernels.pool_misses)
    yield misses
    memory = GaugeMetricFamily("kernelpool_user_memory_bytes", "memory of a user's kernels", labels=["user"])
    cpu = GaugeMetricFamily("kernelpool_user_cpu_seconds", "CPU time of a user's kernels", labels=["user"])
    for user, (mem, secs) in services.kernels.usage().items():
        if mem is not None:
            memory.add_metric([user], mem)
        if secs is not None:
            cpu.add_metric([user], secs)
    yield memory
    yield cpu
