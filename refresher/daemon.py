"""The daemon: wires config → providers, sinks, scheduler, HTTP server, file
watches, signals and systemd notifications.

Events it reacts to besides its timer: a rotated credential file (re-mint the jobs
that use it), a changed ``tenants_file`` (mint added tenants, withdraw removed ones),
SIGHUP (reload the config; unchanged jobs keep their tokens and schedules), and
SIGTERM/SIGINT (stop scheduling, finish in-flight writes, exit 0).
"""

from __future__ import annotations

import gc
import random
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import structlog
from anyio.abc import TaskGroup

from refresher.clock import Clock, SystemClock
from refresher.config import DebituraProviderConfig, JobConfig, Settings, load_settings
from refresher.errors import ConfigError, SinkError
from refresher.jobs import build_provider, build_runtimes
from refresher.leader import LeaderElector
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.notify import Notifier, TokenWritten, build_notifier
from refresher.providers.base import HTTPClients, TokenProvider
from refresher.scheduler import JobRuntime, Scheduler
from refresher.sdnotify import SystemdNotifier
from refresher.server import admin_token_reader, bind, create_app, is_loopback, make_server
from refresher.sinks.kubernetes import KubeClients
from refresher.token import Token, rfc3339
from refresher.watch import FileWatcher

log = structlog.get_logger("refresher")

#: SIGTERM: how long in-flight refreshes may take to finish before we exit anyway.
SHUTDOWN_GRACE = 10.0
#: Tell systemd READY=1 after the first round settles, or after this long at most.
READY_AT_LATEST = 60.0


class Daemon:
    """One refresher process: every configured job, its server and its events.

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
        config_path: Path | None = None,
        notifier: SystemdNotifier | None = None,
        is_leader: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.redactor = redactor or Redactor()
        self.metrics = Metrics(tenant_labels=settings.metrics.tenant_labels)
        self.clients = HTTPClients()
        self.kube = KubeClients()
        self.elector: LeaderElector | None = None
        self._leading = False
        if is_leader is None and settings.leader_election.enabled:
            self.elector = LeaderElector(
                settings.leader_election,
                clients=self.kube,
                clock=self.clock,
                on_change=self._leadership_changed,
            )
            is_leader = self.elector.is_leader
        self.is_leader = is_leader
        self.scheduler = Scheduler(
            settings.refresh,
            clock=self.clock,
            metrics=self.metrics,
            redactor=self.redactor,
            rng=rng,
            is_active=self._may_refresh if is_leader is not None else None,
        )
        self.metrics.watch(self.scheduler.snapshots, is_leader=is_leader)
        self.notifier = notifier or SystemdNotifier.from_env()
        self.serve_http = serve_http
        self.port: int | None = None
        self.job_configs: dict[str, JobConfig] = {}
        self.providers: dict[str, TokenProvider] = {}
        self.watcher = FileWatcher()
        self._server: Any = None
        self._server_done = anyio.Event()
        self._tg: TaskGroup | None = None
        self._watch_scope: anyio.CancelScope | None = None
        self.reloads = 0
        #: Errors of the last reload if it was rejected (shown in systemd's STATUS=), else 0.
        self.reload_rejected = 0
        self.notifiers: dict[str, list[Notifier]] = {}
        self._notify_client: httpx2.AsyncClient | None = None
        self.scheduler.written_hooks.append(self._notifications)

    # ------------------------------------------------------------ leadership

    def _may_refresh(self) -> bool:
        """Only the Lease holder refreshes, and only once it has re-read the sinks."""
        return (
            self.is_leader is not None
            and self.is_leader()
            and (self.elector is None or self._leading)
        )

    def _leadership_changed(self, leading: bool) -> None:
        log.info("leadership changed", leader=leading)
        if not leading:
            self._leading = False
            return
        if self._tg is not None:
            self._tg.start_soon(self._take_over)

    async def _take_over(self) -> None:
        """New leader: adopt what the previous leader wrote, then refresh only what is due."""
        adopted = 0
        for runtime in list(self.scheduler.jobs.values()):
            if runtime.inflight is None and await self.scheduler.recover(runtime):
                adopted += 1
                self.scheduler.reschedule(runtime, runtime.next_refresh_at)
        self._leading = True
        self.scheduler.wake()
        log.info("leading", adopted_from_sinks=adopted, jobs=len(self.scheduler.jobs))

    # ------------------------------------------------------------ job set

    async def add_job(self, job: JobConfig) -> list[JobRuntime]:
        """Build a job's provider and runtimes, adopt valid tokens from its sinks, start it."""
        provider = build_provider(job, clients=self.clients, clock=self.clock)
        runtimes = build_runtimes(job, provider, kube=self.kube)
        for runtime in runtimes:
            await self.scheduler.recover(runtime)
            self.scheduler.add(runtime)
        self.job_configs[job.name] = job
        self.providers[job.name] = provider
        if job.notify:
            if self._notify_client is None:
                self._notify_client = httpx2.AsyncClient(follow_redirects=False)
            client = self._notify_client
            self.notifiers[job.name] = [build_notifier(n, client=client) for n in job.notify]
        else:
            self.notifiers.pop(job.name, None)
        return runtimes

    def _notifications(self, runtime: JobRuntime, token: Token) -> Coroutine[Any, Any, None] | None:
        """The job's notifications for a written token, if it has notifiers."""
        notifiers = self.notifiers.get(runtime.job)
        return self._notify(runtime, token, notifiers) if notifiers else None

    async def _notify(self, runtime: JobRuntime, token: Token, notifiers: list[Notifier]) -> None:
        """Run the job's notifiers concurrently; failures are logged and counted."""
        event = TokenWritten(
            job=runtime.job,
            tenant=runtime.tenant,
            expires_at=rfc3339(token.expires_at),
            fingerprint=token.fingerprint(),
            sink_paths=tuple(s.target for s in runtime.sinks),
        )
        labels = self.metrics.label_values(runtime.job, runtime.provider_kind, runtime.tenant)

        async def deliver(notifier: Notifier) -> None:
            try:
                await notifier.notify(event)
            except Exception as exc:  # a notifier must never take the daemon down
                self.metrics.notify_failures.labels(*labels, notifier.kind).inc()
                log.error(
                    "notification failed",
                    job=runtime.job,
                    tenant=runtime.tenant,
                    notifier=notifier.kind,
                    error=str(exc),
                )

        async with anyio.create_task_group() as tg:
            for notifier in notifiers:
                tg.start_soon(deliver, notifier)

    async def remove_job(self, name: str, *, delete: bool | None = None) -> None:
        """Stop a job; its sink files stay unless it says ``on_remove: delete``."""
        job = self.job_configs.pop(name, None)
        self.providers.pop(name, None)
        if job is None:
            return
        delete = job.on_remove == "delete" if delete is None else delete
        for key in [k for k in self.scheduler.jobs if k[0] == name]:
            runtime = self.scheduler.remove(key)
            if runtime is not None and delete:
                await _withdraw(runtime)

    def _watch_job(self, job: JobConfig) -> None:
        provider = self.providers[job.name]

        async def rotated(path: Path) -> None:
            current = self.providers.get(job.name)
            if current is not provider:
                return
            for secret in provider.secrets():
                self.redactor.add_secret(secret)
            keys = [k for k in self.scheduler.jobs if k[0] == job.name]
            log.info(
                "credential rotated: re-minting", job=job.name, path=str(path), tokens=len(keys)
            )
            for key in keys:
                self.scheduler.reschedule_now(key)

        for path in provider.secret_files():
            self.watcher.watch(path, rotated)
        if isinstance(job.provider, DebituraProviderConfig) and job.provider.tenants_file:

            async def tenants_changed(path: Path) -> None:
                if self.job_configs.get(job.name) is not job:
                    return
                await self._sync_tenants(job)

            self.watcher.watch(job.provider.tenants_file, tenants_changed)

    async def _sync_tenants(self, job: JobConfig) -> None:
        assert isinstance(job.provider, DebituraProviderConfig)
        try:
            wanted = set(job.provider.tenant_list())
        except OSError as exc:
            log.error("cannot read tenants_file", job=job.name, error=str(exc))
            return
        current = {k[1] for k in self.scheduler.jobs if k[0] == job.name}
        added, removed = wanted - current, current - wanted
        provider = self.providers[job.name]
        for runtime in build_runtimes(job, provider, tenants=sorted(added), kube=self.kube):
            await self.scheduler.recover(runtime)
            self.scheduler.add(runtime)
        for tenant in removed:
            gone = self.scheduler.remove((job.name, tenant))
            if gone is not None:
                await _withdraw(gone)
        log.info("tenants changed", job=job.name, added=len(added), removed=len(removed))

    async def load_jobs(self) -> None:
        """Build every job, adopt valid tokens already in the sinks, register."""
        for job in self.settings.jobs:
            await self.add_job(job)
        recovered = sum(1 for r in self.scheduler.jobs.values() if r.token is not None)
        log.info("jobs loaded", jobs=len(self.scheduler.jobs), recovered_from_sinks=recovered)

    async def reload(self) -> bool:
        """SIGHUP: apply a new config without dropping valid tokens.

        Unchanged jobs keep their tokens and schedules; changed jobs are rebuilt
        (their sinks' valid tokens are adopted, so nothing is re-minted needlessly);
        new jobs start; removed jobs stop. An invalid config changes nothing.
        """
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise ConfigError(["no config file to reload from"])
            new = load_settings(self.config_path)
        except ConfigError as exc:
            self.metrics.config_reload_failures.inc()
            log.error("reload rejected: keeping the running config", errors=exc.errors)
            self.reload_rejected = len(exc.errors)
            self.notifier.ready(self.status_line())
            return False
        self.reload_rejected = 0
        old_jobs = dict(self.job_configs)
        new_jobs = {j.name: j for j in new.jobs}
        kept = [n for n in new_jobs if old_jobs.get(n) == new_jobs[n]]
        for name, old in old_jobs.items():
            if name not in new_jobs:
                await self.remove_job(name)
            elif old != new_jobs[name]:
                await self.remove_job(name, delete=False)
        for name, job in new_jobs.items():
            if name not in kept:
                await self.add_job(job)
        if new.server != self.settings.server:
            log.warning("server settings changed: they apply at the next restart")
        self.scheduler.policy = new.refresh
        self.settings = new
        self.reloads += 1
        self._restart_watcher()
        log.info(
            "config reloaded",
            kept=len(kept),
            added=len([n for n in new_jobs if n not in old_jobs]),
            removed=len([n for n in old_jobs if n not in new_jobs]),
            changed=len([n for n in new_jobs if n in old_jobs and n not in kept]),
        )
        self.notifier.ready(self.status_line())
        return True

    # ------------------------------------------------------------ running

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
        """Start everything in the background; stop (gracefully) on exit."""
        await self.load_jobs()
        # Everything built so far (config, 10,000s of job runtimes, sinks, loggers)
        # lives as long as the daemon: move it out of the collector's sight, so a
        # full collection scans only what changed since (a 200 ms pause at 10k jobs).
        gc.collect()
        gc.freeze()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.scheduler.run)
                if self.elector is not None:
                    await tg.start(self.elector.run)
                self._restart_watcher()
                if self.serve_http:
                    await self._start_server(tg)
                tg.start_soon(self._systemd)
                try:
                    yield self
                finally:
                    await self.shutdown(tg)
        finally:
            # Only once every task has ended: a task resumed by its I/O right after
            # the cancel would otherwise send on a closed client.
            with anyio.CancelScope(shield=True):
                await self.kube.aclose()
                await self.clients.aclose()
                if self._notify_client is not None:
                    await self._notify_client.aclose()

    def _restart_watcher(self) -> None:
        if self._tg is None:
            return
        if self._watch_scope is not None:
            self.watcher.stop()
            self._watch_scope.cancel()
        self.watcher = FileWatcher()
        for job in self.job_configs.values():
            self._watch_job(job)
        watcher = self.watcher

        async def run() -> None:
            with anyio.CancelScope() as scope:
                self._watch_scope = scope
                await watcher.run()

        self._tg.start_soon(run)

    async def _systemd(self) -> None:
        """READY=1 once the first round settled, STATUS= and WATCHDOG=1 from the loop."""
        if not self.notifier.enabled:
            return
        with anyio.move_on_after(READY_AT_LATEST):
            await self.scheduler.first_round.wait()
        self.notifier.ready(self.status_line())
        interval = self.notifier.watchdog_interval() or 10.0
        while True:
            await anyio.sleep(interval)
            self.notifier.watchdog()
            self.notifier.status(self.status_line())

    async def _start_server(self, tg: TaskGroup) -> None:
        server_cfg = self.settings.server
        sock = bind(server_cfg.host, server_cfg.port)
        self.port = sock.getsockname()[1]
        admin = None
        if not is_loopback(server_cfg.host):
            # Off loopback, forced refreshes need the admin bearer secret (none set: always 401).
            admin = admin_token_reader(server_cfg.admin_token_file)
        app = create_app(self.scheduler, self.metrics, admin_token=admin, is_leader=self.is_leader)
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
        self.notifier.stopping()
        self.scheduler.is_active = lambda: False
        self.watcher.stop()
        with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
            while any(r.inflight is not None for r in list(self.scheduler.jobs.values())):
                await anyio.sleep(0.01)
        if self._server is not None:
            self._server.should_exit = True
            with anyio.move_on_after(5, shield=True):
                await self._server_done.wait()
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
                    if signum == signal.SIGHUP:
                        await self.reload()
                        continue
                    log.info("stopping", signal=signal.Signals(signum).name)
                    break

    async def refresh_all_once(self, *, write: bool = True) -> bool:
        """`refresher once`: refresh every job now and write its sinks (`check
        --online`: fetch only); True if every job succeeded."""
        runtimes: list[JobRuntime] = []
        for job in self.settings.jobs:
            provider = build_provider(job, clients=self.clients, clock=self.clock)
            runtimes.extend(build_runtimes(job, provider, kube=self.kube))
        for runtime in runtimes:
            if not write:
                runtime.sinks = []
            self.scheduler.add(runtime)
        async with anyio.create_task_group() as tg:
            for runtime in runtimes:
                tg.start_soon(self.scheduler.refresh, runtime)
        await self.clients.aclose()
        await self.kube.aclose()
        now = self.clock.now()
        return all(r.valid(now) and r.failures == 0 for r in runtimes)


async def _withdraw(runtime: JobRuntime) -> None:
    """Remove a job's token from its sinks (tenant removed, job deleted)."""
    for sink in runtime.sinks:
        try:
            await sink.remove()
        except SinkError as exc:
            log.error(
                "cannot withdraw token", job=runtime.job, tenant=runtime.tenant, error=str(exc)
            )
