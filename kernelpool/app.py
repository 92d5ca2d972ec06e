"""The Starlette app: /mcp (the MCP SDK's streamable HTTP), /healthz, /metrics; and its lifespan.

`create_app` builds every service once, in dependency order (`_Server.__init__`), and hands
them to the MCP layer (`kernelpool.mcp.server.build_mcp`). The lifespan opens everything in
order (store, users' folders and accounts, leftovers from a dead server, the fork server, the
MCP session manager, housekeeping) and closes it in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterable

from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from kernelpool import __version__
from kernelpool.config import Settings
from kernelpool.disk import DiskSpace
from kernelpool.errors import KernelpoolError
from kernelpool.executions.jobs import JobService
from kernelpool.executions.service import ExecutionService
from kernelpool.kernels.isolation import Isolation, blocked_for_others, data_dir_unreachable, decide
from kernelpool.kernels.networks import UserNetworkPolicy
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.kernels.specs import DEFAULT, KernelSpecs
from kernelpool.kernels.zygote.server import ForkServer
from kernelpool.mcp.auth import StoreTokenVerifier
from kernelpool.mcp.events import EventScope
from kernelpool.mcp.guards import AuthGuard, SessionGate
from kernelpool.mcp.home import HomeGate, end_sessions
from kernelpool.mcp.hooks import _event_store, _tell_stopped, _to_sessions
from kernelpool.mcp.notices import Notices
from kernelpool.mcp.server import build_mcp
from kernelpool.mcp.services import Services
from kernelpool.metrics import Metrics, gauge
from kernelpool.notebooks.changes import Changes
from kernelpool.notebooks.files import FileService
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.quota import DiskQuota
from kernelpool.notebooks.service import NotebookService
from kernelpool.notebooks.workspace import Workspace
from kernelpool.replicas.service import ReplicaService
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from kernelpool.users.grants import GrantStore
from kernelpool.users.sessions import SessionContexts
from kernelpool.users.throttle import AuthThrottle
from kernelpool.users.tokens import SCOPE, create_token
from kernelpool.web.live import LiveHub
from kernelpool.web.oauth import resource_metadata_route
from kernelpool.web.server import OAuthServer
from kernelpool.web.view import view_routes
from kernelpool.web.viewbase import ViewDeps
from sandbox import SafeRoot, prepare_dir

log = logging.getLogger(__name__)

# how long shutdown waits for its notice to reach every session's open stream (a client that does
# not read its stream holds it no longer than this)
SHUTDOWN_NOTICE_WAIT = 2.0


def base_url(settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104 (a comparison: no bind)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}"


def create_app(settings: Settings, isolation: Isolation | None = None,
               announce: Callable[[str], None] | None = None) -> Starlette:
    """Build the app; `isolation` defaults to what `isolation.decide` finds (it raises where the host cannot isolate)."""
    server = _Server(settings, isolation or decide(settings), announce or _print)
    mcp_app: ASGIApp = server.mcp_app
    if server.services.events is not None:
        mcp_app = EventScope(mcp_app, server.services.events)
    app = Starlette(
        routes=[Route("/healthz", server.healthz), Route("/metrics", server.metrics_endpoint), *server.auth_routes(),
                Mount("/", app=mcp_app)],
        middleware=[Middleware(AuthGuard, throttle=server.throttle, verifier=server.verifier)],
        lifespan=server.lifespan,
    )
    app.state.services = server.services
    app.state.before_shutdown = server.before_shutdown
    return app


class _Server:
    """Everything one server holds, built once; the app's endpoints and lifespan are its methods."""

    def __init__(self, settings: Settings, iso: Isolation, announce: Callable[[str], None]) -> None:
        self.settings, self.iso, self.announce = settings, iso, announce
        self.url = base_url(settings)
        if iso.sandboxed:  # kernels run as the users' uids and must reach their folders
            unreachable = data_dir_unreachable(settings)
            if unreachable is not None:
                raise unreachable
        # missing parents 0755 (not the umask's): users' uids pass them to reach their folders
        prepare_dir(str(settings.data_dir), None, None, mode=0o711)
        self.disk = DiskSpace(settings.data_dir, settings.disk_free_floor_bytes)
        self.files = FileWork()  # threads for users' file work, a few turns per user at a time
        # started in the lifespan; until then, and if it cannot start, kernels start the stock way
        self.fork_server = ForkServer(settings.kernel_python or sys.executable) if settings.fork_server else None
        self.services = self._services()
        metrics = self.services.metrics
        self.verifier = StoreTokenVerifier(self.services.store, on_failure=lambda reason: metrics.auth_failures.labels(reason).inc(),
                                           resource=f"{self.url}/mcp")
        self.throttle = AuthThrottle(settings.auth_failures_before_backoff, settings.auth_failure_window,
                                     settings.auth_backoff, settings.trusted_proxies)
        self.oauth = OAuthServer(settings, self.services.store, self.services.users, self.throttle, self.url)
        self.replica: ReplicaService | None = None
        if settings.replica is not None:
            self.replica = ReplicaService(settings, self.services.store, self.services.users, self.services.kernels,
                                          self._end_sessions)
        self.view = self._view()
        self.mcp, self.mcp_app = self._mcp()
        metrics.add_gauges(lambda: _live_gauges(self.services))

    def _services(self) -> Services:
        settings = self.settings
        store = Store(settings.db_path, audit_queue_max=settings.audit_queue_max, url=settings.database_url,
                      replica=settings.replica)
        metrics = Metrics()
        users = UserService(settings, store, isolated=self.iso.sandboxed)

        def root_of(user: str) -> SafeRoot:
            uid, gid = users.owner(user)
            return SafeRoot(users.folder(user), uid, gid)

        changes = Changes()
        quota = DiskQuota(root_of, settings.user_disk_quota_bytes, max_age=settings.user_disk_recount)
        notebooks = NotebookService(root_of, self.files, settings.max_notebook_bytes, disk_check=self.disk.check,
                                    quota=quota, changes=changes)
        files = FileService(root_of, self.files, notebooks, quota, settings.max_file_bytes, disk_check=self.disk.check)
        # the kernelspecs users may choose, read once (a missing or unreachable one stops the server here)
        specs = KernelSpecs.find(settings.kernelspecs, check_reachable=blocked_for_others if self.iso.sandboxed else None)

        async def spec_of(user: str, path: str) -> str:
            """The kernelspec a notebook records, for a kernel started by a call other than use_notebook."""
            try:
                nb = await notebooks.load(user, path)
            except KernelpoolError:
                return DEFAULT  # no notebook (yet), or one that cannot be read: that call says so itself
            return specs.for_notebook(nb.metadata).name

        kernels = KernelRegistry(settings, store, users, self.iso.cgroups, UserNetworkPolicy(self.iso.network),
                                 fork_server=self.fork_server, disk_check=self.disk.check, metrics=metrics,
                                 specs=specs, spec_of=spec_of)
        notices = Notices(settings.session_idle_timeout)
        sessions = SessionContexts(settings.session_idle_timeout, settings.max_sessions_per_user)
        jobs = JobService(settings, kernels, notebooks, users, metrics, changes=changes)
        changes.subscribe(_to_sessions(notices))
        kernels.listeners.append(lambda user, notebook, cause: _tell_stopped(notices, user, notebook, cause))
        return Services(
            settings=settings, store=store, users=users, notebooks=notebooks, files=files,
            workspace=Workspace(notebooks, kernels, users, sessions), kernels=kernels, jobs=jobs,
            executions=ExecutionService(settings, jobs, notebooks), sessions=sessions, metrics=metrics,
            notices=notices, events=_event_store(settings, notices),
        )

    def _mcp(self) -> tuple[MCPServer, ASGIApp]:
        settings, services = self.settings, self.services
        auth = AuthSettings.model_validate({  # from strings: the issuer as clients compare it, no slash added
            "issuer_url": self.url, "resource_server_url": f"{self.url}/mcp", "required_scopes": [SCOPE],
            "validate_token_resource": False,  # StoreTokenVerifier checks an OAuth token's resource itself
        })
        mcp = build_mcp(services, self.verifier, auth, icon_url=f"{self.url}/icon.svg" if settings.oauth else None)
        loopback = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=loopback + settings.allowed_hosts,
            allowed_origins=[f"http://{h}" for h in loopback] + settings.allowed_origins,
        )
        mcp_app = mcp.streamable_http_app(
            transport_security=security, session_idle_timeout=settings.session_idle_timeout, host=settings.host,
            event_store=services.events, retry_interval=settings.sse_retry_ms if services.events is not None else None,
            max_sessions=settings.max_sessions,
        )
        manager = mcp.session_manager
        # The SDK keeps its open sessions in this dict and offers no public view of them (mcp 2.3.0,
        # pinned in requirements.lock); tests/test_starve.py fails if a session's end is not seen here.
        services.sessions.set_live(lambda: manager._server_instances)
        manager.asgi_app = SessionGate(manager.asgi_app, services.sessions)  # type: ignore[assignment]
        if self.replica is not None:  # before the SDK (and the session count) sees a user homed elsewhere
            manager.asgi_app = HomeGate(manager.asgi_app, self.replica.name, self.replica.moving)  # type: ignore[assignment]
        return mcp, mcp_app

    async def _end_sessions(self, user: str, text: str) -> int:
        return await end_sessions(self.mcp.session_manager, self.services.sessions, self.services.notices, user, text)

    def _view(self) -> ViewDeps | None:
        """The read-only web view, where it is on (it signs people in with the OAuth server's pages)."""
        s = self.services
        if not (self.settings.oauth and self.settings.web_view):
            return None
        # among replicas, a person's pages are sent to their home replica (kernelpool.web.home)
        return ViewDeps(store=s.store, browsers=self.oauth.web.browsers, notebooks=s.notebooks,
                        jobs=s.jobs, kernels=s.kernels, sessions=s.sessions, users=s.users,
                        hub=LiveHub(s.notebooks.changes, s.notebooks, s.jobs), grants=self.oauth.web.grants,
                        replica=self.settings.replica)

    def auth_routes(self) -> list[BaseRoute]:
        """The authorization server, its pages, the web view and the protected-resource metadata at the root path."""
        root = resource_metadata_route(f"{self.url}/mcp", self.url, "/.well-known/oauth-protected-resource")
        return [root, *self.oauth.routes(), *(view_routes(self.view) if self.view is not None else [])]

    async def healthz(self, request: Request) -> Response:
        services, store = self.services, self.services.store
        space = self.disk.report()
        return JSONResponse({
            "status": "ok" if not space["low"] else "disk low", "version": __version__, "replica": self.settings.replica,
            "isolation": self.iso.describe() | {"network": {
                "mode": services.kernels.networks.mode, "namespaces": services.kernels.networks.users_with_namespace(),
                "fallback": self.iso.fallback()}},
            "kernels": len(services.kernels.all()), "warm_kernels": len(services.kernels.pooled()),
            "kernels_counted": services.kernels.count(), "disk": space,
            "audit": {"pending": store.audit_pending, "dropped": store.audit_dropped, "failing": store.audit_failing},
        })

    async def metrics_endpoint(self, request: Request) -> Response:
        # per-user names and usage: only for the holder of metrics_token (see README, Monitoring)
        token = self.settings.metrics_token
        if token is None:
            return PlainTextResponse("metrics are off: set metrics_token and scrape with "
                                     "'Authorization: Bearer <metrics_token>'\n", status_code=403)
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return PlainTextResponse("metrics need 'Authorization: Bearer <metrics_token>'\n", status_code=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="kernelpool-metrics"'})
        return Response(generate_latest(self.services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        store = self.services.store
        await store.open()
        try:
            await self._start()
            housekeeping = asyncio.get_running_loop().create_task(_housekeeping(self.services))
            try:
                async with self.mcp.session_manager.run():
                    if self.replica is not None:
                        await self.replica.start()
                    yield
            finally:
                housekeeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await housekeeping
                if self.replica is not None:
                    await self.replica.close()
                await self._stop()
                await self.oauth.close()
        finally:
            await store.close()

    async def _start(self) -> None:
        services, users = self.services, self.services.users
        if self.settings.replica is None and not await services.store.list_users():  # replicas: `users add`
            row = await users.add(self.settings.first_user)
            _, token = await create_token(services.store, row.name)
            self.announce(
                f"kernelpool: created user {row.name!r}. Its token (shown once):\n\n    {token}\n\n"
                f"MCP URL: {self.url}/mcp  (header  Authorization: Bearer <token>)\n"
            )
        # what an earlier server (maybe an older version, with another layout) left behind:
        # its kernels and cgroups, then the runtime folder, before users' folders are made
        reaped = await services.kernels.reap_leftovers()
        if reaped:
            log.warning("cleaned up %d kernel(s) or cgroup(s) left behind by a previous server", reaped)
        if users.clean_runtime():
            log.info("emptied %s, left by a previous server", self.settings.run_dir)
        await services.kernels.networks.start()
        await users.load()  # folders, and passwd entries that a new container lacks
        if self.fork_server is not None:
            await _start_fork_server(self.fork_server)

    async def _stop(self) -> None:
        await self.services.jobs.close()
        await self.services.kernels.close()
        try:
            await self.services.kernels.networks.close()
        except Exception as exc:
            log.warning("removing the users' network namespaces: %s", exc)
        if self.fork_server is not None:
            await self.fork_server.close()
        await self.files.aclose()

    async def before_shutdown(self) -> None:
        """Called by `cli` when the server starts to shut down, while clients' streams are still open
        (they end when this returns)."""
        if self.view is not None:
            self.view.hub.close()  # open pages' streams end now: uvicorn waits for every open response
        events = self.services.events
        after = events.last_seq if events is not None else 0
        sent = await self.services.notices.to_everyone("warning", "the server is shutting down; running executions end with it")
        if not sent:
            return
        if events is None:  # no event ids on the wire to tell when a message reached its stream
            await asyncio.sleep(0.2)
            return
        behind = await events.standalone_written(sent, after, SHUTDOWN_NOTICE_WAIT)
        if behind:
            log.info("shutdown notice not yet on the streams of %d session(s) after %g s", behind, SHUTDOWN_NOTICE_WAIT)


async def _start_fork_server(fork_server: ForkServer) -> None:
    # without one (off, or it cannot start) kernels start the stock way: slower, not less safe
    try:
        await fork_server.start()
    except Exception as exc:
        log.error("fork server did not start, kernels will start without it: %s", exc)


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
            await services.users.load()  # users that the CLI added or removed while we run
            await services.kernels.forget_removed(services.users.current(), services.users.removing)
            await GrantStore(services.store).prune()
        except Exception:
            log.exception("housekeeping failed")


def _live_gauges(services: Services) -> Iterable[GaugeMetricFamily]:
    """What /metrics reads from the services at each scrape (`Metrics.add_gauges`)."""
    yield gauge("kernelpool_sessions", "MCP sessions with a context", len(services.sessions))
    yield gauge("kernelpool_audit_pending", "audit rows waiting to be written", services.store.audit_pending)
    yield gauge("kernelpool_audit_dropped", "audit rows dropped because the queue was full", services.store.audit_dropped)
    yield gauge("kernelpool_result_bytes", "finished background results kept in memory", services.jobs.result_bytes())
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
        yield gauge("kernelpool_resume_events", "events kept for stream resumption", services.events.count())
    memory = GaugeMetricFamily("kernelpool_user_memory_bytes", "memory of a user's kernels", labels=["user"])
    cpu = GaugeMetricFamily("kernelpool_user_cpu_seconds", "CPU time of a user's kernels", labels=["user"])
    for user, (mem, secs) in services.kernels.usage().items():
        if mem is not None:
            memory.add_metric([user], mem)
        if secs is not None:
            cpu.add_metric([user], secs)
    yield memory
    yield cpu
