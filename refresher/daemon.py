"""The daemon: wires config → providers, sinks, scheduler, HTTP server, file
watches, signals and systemd notifications.

Events it reacts to besides its timer: a rotated credential file (re-mint the jobs
that use it), a changed ``tenants_file`` (`JobSet`), SIGHUP (reload the config;
unchanged jobs keep their tokens and schedules), leadership changes (`Leadership`)
and SIGTERM/SIGINT (stop scheduling, finish in-flight writes, exit 0).
"""

from __future__ import annotations

import gc
import random
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskGroup

from refresher.clock import Clock, SystemClock
from refresher.config import Settings, load_settings
from refresher.errors import ConfigError
from refresher.jobset import JobSet
from refresher.kube import KubeClients
from refresher.leader import LeaderElector
from refresher.leadership import Leadership
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.notify import Notifications
from refresher.providers.base import HTTPClients
from refresher.runtime import JobRuntime
from refresher.scheduler import Scheduler
from refresher.sdnotify import SystemdNotifier, keep_informed
from refresher.server import Listener, listen
from refresher.sinks.lock import DirectoryLocks
from refresher.watch import FileWatcher

log = structlog.get_logger("refresher")

#: SIGTERM: how long in-flight refreshes may take to finish before we exit anyway.
SHUTDOWN_GRACE = 10.0
#: Tell systemd READY=1 after the first round settles, or after this long at most.
READY_AT_LATEST = 60.0


class Daemon:
    """One refresher process: every configured job, its server and its events.

    Use `running()` in tests (an async context manager that returns once the server
    listens) and `serve_forever()` from the CLI. Both raise `SinkOwnedError` at start
    when another process holds a file-sink directory's lock (unless leader election
    is enabled: then the locks are taken on becoming leader).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        redactor: Redactor | None = None,
        rng: random.Random | None = None,
        serve_http: bool = True,
        config_path: Path | None = None,
        systemd: SystemdNotifier | None = None,
        is_leader: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.redactor = redactor or Redactor()
        self.metrics = Metrics(tenant_labels=settings.metrics.tenant_labels)
        self.clients = HTTPClients()
        self.kube = KubeClients(clock=self.clock)
        self.sink_locks = DirectoryLocks()
        self.elector: LeaderElector | None = None
        self.scheduler = Scheduler(
            settings.refresh,
            clock=self.clock,
            metrics=self.metrics,
            redactor=self.redactor,
            rng=rng,
        )
        self.leadership = Leadership(self.scheduler, self.sink_locks, self.clock)
        if is_leader is None and settings.leader_election.enabled:
            self.elector = self.leadership.elector = LeaderElector(
                settings.leader_election,
                clients=self.kube,
                clock=self.clock,
                on_change=self.leadership.changed,
                rng=rng,
            )
            is_leader = self.elector.is_leader
        if is_leader is not None:
            leader = is_leader
            self.scheduler.is_active = lambda: self.leadership.may_refresh(leader)
        self.is_leader = is_leader
        self.metrics.register_state(self.scheduler.snapshots, is_leader=is_leader)
        self.systemd = systemd or SystemdNotifier.from_env()
        self.notifications = Notifications(self.metrics, self.redactor)
        self.scheduler.publisher.written_hooks.append(self.notifications)
        self.jobs = JobSet(
            self.scheduler,
            clients=self.clients,
            kube=self.kube,
            clock=self.clock,
            metrics=self.metrics,
            sink_locks=self.sink_locks,
            notifications=self.notifications,
            is_leader=is_leader,
        )
        self.serve_http = serve_http
        self.port: int | None = None
        self.watcher = self._new_watcher()
        self._watch_scope: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None
        self.reloads = 0
        #: Errors of the last reload if it was rejected (shown in systemd's STATUS=), else 0.
        self.reload_rejected = 0

    async def load_jobs(self) -> None:
        """Build every job, lock its sink directories (unless a leader election decides
        when), adopt valid tokens already in the sinks, register."""
        built = [self.jobs.build(job) for job in self.settings.jobs]
        if self.elector is None:
            self.jobs.own_or_refuse([r for b in built for r in b.runtimes])
        for job in built:
            await self.jobs.start(job)
        recovered = sum(1 for r in self.scheduler.jobs.values() if r.token is not None)
        log.info("jobs loaded", jobs=len(self.scheduler.jobs), recovered_from_sinks=recovered)

    async def reload(self) -> bool:
        """SIGHUP: apply a new config without dropping valid tokens (`JobSet.apply`);
        an invalid config changes nothing."""
        self.systemd.reloading()
        try:
            if self.config_path is None:
                raise ConfigError(["no config file to reload from"])
            new = load_settings(self.config_path)
        except ConfigError as exc:
            self.metrics.config_reload_failures.inc()
            log.error("reload rejected: keeping the running config", errors=exc.errors)
            self.reload_rejected = len(exc.errors)
            self.systemd.ready(self.status_line())
            return False
        self.reload_rejected = 0
        counts = await self.jobs.apply(new.jobs)
        if new.server != self.settings.server:
            log.warning("server settings changed: they apply at the next restart")
        self.scheduler.policy = new.refresh
        self.settings = new
        self.reloads += 1
        self._restart_watcher()
        log.info("config reloaded", **counts)
        self.systemd.ready(self.status_line())
        return True

    def status_line(self) -> str:
        now = self.clock.now()
        jobs = list(self.scheduler.jobs.values())
        tokens = f"{sum(r.valid(now) for r in jobs)}/{len(jobs)} tokens valid"
        if self.reload_rejected:
            # Until the next good reload: `systemctl status` must not look like a success.
            return (
                f"reload rejected: {self.reload_rejected} error(s); "
                f"running the previous config; {tokens}"
            )
        return tokens

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Daemon]:
        """Start everything in the background; stop (gracefully) on exit.

        Raises `ListenError` before anything else if the listen address is taken:
        a second daemon on a busy port stops before it mints or writes.
        """
        listener = None
        if self.serve_http:
            listener = listen(
                self.settings,
                self.scheduler,
                self.metrics,
                is_leader=self.is_leader,
                elector=self.elector,
            )
        try:
            await self.load_jobs()
            # What is built now lives as long as the daemon: out of the collector's sight.
            gc.collect()
            gc.freeze()
            async with anyio.create_task_group() as tg:
                self._tg = self.leadership.task_group = tg
                await tg.start(self.scheduler.run)
                if self.elector is not None:
                    await tg.start(self.elector.run)
                self._restart_watcher()
                if listener is not None:
                    await tg.start(listener.serve)
                    self.port = listener.port
                tg.start_soon(self._keep_systemd_informed)
                try:
                    yield self
                finally:
                    await self.shutdown(tg, listener)
        finally:
            if listener is not None:
                listener.sock.close()
            # Only once every task has ended: a task resumed by its I/O right after
            # the cancel would otherwise send on a closed client.
            with anyio.CancelScope(shield=True):
                await self.kube.aclose()
                await self.clients.aclose()
                await self.notifications.aclose()
            self.sink_locks.release_all()

    def _restart_watcher(self) -> None:
        if self._tg is None:
            return
        if self._watch_scope is not None:
            self.watcher.stop()
            self._watch_scope.cancel()
        self.watcher = watcher = self._new_watcher()
        self.jobs.watch(watcher)

        async def run() -> None:
            with anyio.CancelScope() as scope:
                self._watch_scope = scope
                await watcher.run()

        self._tg.start_soon(run)

    async def _keep_systemd_informed(self) -> None:
        await keep_informed(
            self.systemd,
            self.scheduler.first_round,
            self.status_line,
            ready_at_latest=READY_AT_LATEST,
        )

    def _new_watcher(self) -> FileWatcher:
        return FileWatcher(on_error=lambda exc: self.scheduler.internal_error("watch", exc))

    async def shutdown(self, tg: TaskGroup, listener: Listener | None = None) -> None:
        """Stop dispatching, let in-flight refreshes and writes finish, then stop."""
        self.systemd.stopping()
        self.scheduler.is_active = lambda: False
        self.watcher.stop()
        with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
            while any(r.refreshing is not None for r in list(self.scheduler.jobs.values())):
                await anyio.sleep(0.01)
        if listener is not None:
            with anyio.move_on_after(5, shield=True):
                await listener.aclose()
        with anyio.CancelScope(shield=True):
            if self.elector is not None:
                # Hand over at once instead of making the next leader wait out the lease.
                with anyio.move_on_after(5):
                    await self.elector.release()
        tg.cancel_scope.cancel()

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; return normally (exit 0) after a graceful stop."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with self.running():
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        log.info("stopping", signal=signal.Signals(signum).name)
                        break
                    try:
                        await self.reload()
                    except Exception as exc:
                        self.metrics.config_reload_failures.inc()
                        self.scheduler.internal_error("reload", exc)

    async def refresh_all_once(self, *, write: bool = True) -> bool:
        """`refresher once`: refresh every job now and write its sinks (`check
        --online`: fetch only); True if every job succeeded."""
        runtimes: list[JobRuntime] = []
        for job in self.settings.jobs:
            built = self.jobs.build(job)
            self.jobs.report_rejected(job, built.rejected)
            runtimes.extend(built.runtimes)
        for runtime in runtimes:
            if not write:
                runtime.sinks = []
            self.scheduler.add(runtime)
        try:
            self.jobs.own_or_refuse(runtimes)
            async with anyio.create_task_group() as tg:
                for runtime in runtimes:
                    tg.start_soon(self.scheduler.refresh, runtime)
        finally:
            self.sink_locks.release_all()
            await self.clients.aclose()
            await self.kube.aclose()
        now = self.clock.now()
        refused = sum(self.jobs.rejected.values())
        return not refused and all(r.valid(now) and r.failures == 0 for r in runtimes)
