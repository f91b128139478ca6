"""The daemon: wires config → providers, sinks, scheduler, HTTP server, signals."""

from __future__ import annotations

import math
import random
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from refresher.clock import Clock, SystemClock
from refresher.config import Settings
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.providers.base import HTTPClients
from refresher.scheduler import JobRuntime, Scheduler
from refresher.server import admin_token_reader, bind, create_app, is_loopback, make_server

log = structlog.get_logger("refresher")

#: SIGTERM: how long in-flight refreshes may take to finish before we exit anyway.
SHUTDOWN_GRACE = 10.0


class Daemon:
    """One refresher process: every configured job, its server and its signals.

    Use `running()` in tests (an async context manager that returns once the server
    listens) and `serve_forever()` from the CLI.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        redactor: Redactor | None = None,
        rng: random.Random | None = None,
        serve_http: bool = True,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.redactor = redactor or Redactor()
        self.metrics = Metrics(tenant_labels=settings.metrics.tenant_labels)
        self.clients = HTTPClients()
        self.scheduler = Scheduler(
            settings.refresh,
            clock=self.clock,
            metrics=self.metrics,
            redactor=self.redactor,
            rng=rng,
        )
        self.metrics.watch(self.scheduler.snapshots)
        self.serve_http = serve_http
        self.port: int | None = None
        self._server: Any = None
        self._server_done = anyio.Event()
        self.stopped = anyio.Event()

    # ------------------------------------------------------------ assembly

    def build_runtimes(self) -> list[JobRuntime]:
        from refresher.jobs import build_provider, build_runtimes

        runtimes = []
        for job in self.settings.jobs:
            provider = build_provider(job, clients=self.clients, clock=self.clock)
            runtimes.extend(build_runtimes(job, provider))
        return runtimes

    async def load_jobs(self) -> None:
        """Build every job, adopt valid tokens already in the sinks, register."""
        recovered = 0
        runtimes = self.build_runtimes()
        for runtime in runtimes:
            if await self.scheduler.recover(runtime):
                recovered += 1
            self.scheduler.add(runtime)
        log.info("jobs loaded", jobs=len(runtimes), recovered_from_sinks=recovered)

    # ------------------------------------------------------------ running

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Daemon]:
        """Start everything in the background; stop (gracefully) on exit."""
        await self.load_jobs()
        async with anyio.create_task_group() as tg:
            await tg.start(self.scheduler.run)
            if self.serve_http:
                await self._start_server(tg)
            try:
                yield self
            finally:
                await self.shutdown(tg)

    async def _start_server(self, tg: TaskGroup) -> None:
        server_cfg = self.settings.server
        sock = bind(server_cfg.host, server_cfg.port)
        self.port = sock.getsockname()[1]
        admin = None
        if not is_loopback(server_cfg.host):
            # Off loopback, forced refreshes need the admin bearer secret (none set: always 401).
            admin = admin_token_reader(server_cfg.admin_token_file)
        app = create_app(self.scheduler, self.metrics, admin_token=admin)
        self._server = make_server(app)
        server = self._server

        done = self._server_done = anyio.Event()

        async def serve() -> None:
            try:
                await server.serve(sockets=[sock])
            finally:
                sock.close()
                done.set()

        tg.start_soon(serve)
        while not server.started:
            await anyio.sleep(0.005)
        log.info("listening", address=f"{server_cfg.host}:{self.port}")

    async def shutdown(self, tg: TaskGroup) -> None:
        """Stop dispatching, let in-flight refreshes and writes finish, then stop."""
        self.scheduler.is_active = lambda: False
        with anyio.move_on_after(SHUTDOWN_GRACE):
            while any(r.inflight is not None for r in list(self.scheduler.jobs.values())):
                await anyio.sleep(0.01)
        if self._server is not None:
            self._server.should_exit = True
            with anyio.move_on_after(5):
                await self._server_done.wait()
        tg.cancel_scope.cancel()
        await self.clients.aclose()
        self.stopped.set()

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; return normally (exit 0) after a graceful stop."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with self.running():
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP received: reload not supported by this build, ignoring")
                        continue
                    log.info("stopping", signal=signal.Signals(signum).name)
                    break

    async def refresh_all_once(self) -> bool:
        """`refresher once`: refresh every job now, write sinks; True if all succeeded."""
        runtimes = self.build_runtimes()
        for runtime in runtimes:
            self.scheduler.add(runtime)
        async with anyio.create_task_group() as tg:
            for runtime in runtimes:
                tg.start_soon(self.scheduler.refresh, runtime)
        await self.clients.aclose()
        now = self.clock.now()
        return all(r.valid(now) and r.failures == 0 for r in runtimes)


def seconds_until(moment: float | None, now: float) -> float | None:
    if moment is None or not math.isfinite(moment):
        return None
    return moment - now
