"""`kernelpool serve`: the server under uvicorn. Callers: `kernelpool.cli.main`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from kernelpool.commands.common import _err, _settings

log = logging.getLogger("kernelpool")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kernelpool.app import create_app
    from kernelpool.disk import check_earlier_data_dir
    from kernelpool.logs import setup_logging
    from kernelpool.store import check_not_newer

    settings = _settings(args)
    setup_logging(settings.log_level, as_json=settings.log_json)
    # before anything is built: an earlier version's folder left aside by the new default, and a
    # data folder of a newer kernelpool, are refused untouched
    note = check_earlier_data_dir(settings)
    if note:
        log.warning("%s", note)
    check_not_newer(settings.db_path)
    app = create_app(settings)
    _tune_gc(app)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
        timeout_graceful_shutdown=10, lifespan="on", access_log=False,
    )
    server = _uvicorn_server(config)
    _err(f"kernelpool {settings.host}:{settings.port}, data in {settings.data_dir}")
    server.run()
    return 0


def _tune_gc(app: Any) -> None:
    """Keep the cyclic garbage collector from stopping the event loop for long.

    What was imported and built at start-up lives as long as the server: `gc.freeze` takes it out
    of every later collection. The first generation is collected after 50,000 allocations rather
    than 700, so the young collections that promote into the costly full ones come less often.
    Pauses are timed into /metrics (`kernelpool_gc_pause_seconds`).
    """
    import gc

    app.state.services.metrics.watch_gc()
    gc.collect()  # timed too: the one full collection of everything built so far
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _uvicorn_server(config: Any) -> Any:
    """uvicorn's server, telling MCP sessions that it shuts down while their streams are still open."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    # sse-starlette, which serves the SDK's SSE streams, would end them all on its own timer once
    # the signal arrives (it polls every 0.5 s), at times before the hook below had told anyone:
    # the streams end when the hook is done
    # the method has no annotations in sse-starlette (its module is typed otherwise): called
    # through a typed name, so that mypy checks this call like the rest
    disable_drain: Callable[[], None] = AppStatus.disable_automatic_graceful_drain
    disable_drain()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            hook = getattr(getattr(config.app, "state", None), "before_shutdown", None)
            try:
                if hook is not None:
                    await asyncio.wait_for(hook(), 5)
            except Exception as exc:
                _err(f"kernelpool: shutdown notice not sent: {exc}")
            finally:
                AppStatus.should_exit = True
            await super().shutdown(sockets)

    return Server(config)
