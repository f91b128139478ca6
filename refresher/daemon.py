"""The daemon: wires config → providers, sinks, scheduler, HTTP server, file
watches, signals and systemd notifications.

Events it reacts to besides its timer: a rotated credential file (re-mint the jobs
that use it), a changed ``tenants_file`` (mint added tenants, withdraw removed ones),
SIGHUP (reload the config; unchanged jobs keep their tokens and schedules), and
SIGTERM/SIGINT (stop scheduling, finish in-flight writes, exit 0).

One writer per file-sink directory: the daemon locks every directory its file
sinks write into (`DirectoryLocks`) before it reads or writes any of them: at start
(refusing to start if another process holds one), or, with leader election, on
becoming leader (waiting, with the jobs writing there, until a held lock frees).
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import structlog
from anyio.abc import TaskGroup, TaskStatus

from refresher.clock import Clock, SystemClock
from refresher.config import JobConfig, Settings, load_settings
from refresher.errors import ConfigError, LeadershipLostError, Refusal, SinkError, SinkOwnedError
from refresher.jobs import build_provider, build_runtimes
from refresher.kube import KubeClients
from refresher.leader import LeaderElector
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.notify import Notifier, TokenWritten, build_notifier
from refresher.providers.base import HTTPClients, TokenProvider
from refresher.providers.debitura import DebituraProviderConfig
from refresher.runtime import JobKey, JobRuntime
from refresher.scheduler import Scheduler
from refresher.sdnotify import SystemdNotifier
from refresher.server import (
    Access,
    Listener,
    bind,
    connection_cap,
    create_app,
    fd_reserve,
    is_loopback,
    nofile_needed,
    raise_nofile_limit,
    token_reader,
)
from refresher.sinks.file import FileSink
from refresher.sinks.kubernetes import KubernetesSink
from refresher.sinks.lock import DirectoryLocks
from refresher.targets import TargetClaims, TargetError, describe_owner
from refresher.token import Token, rfc3339
from refresher.watch import FileWatcher

log = structlog.get_logger("refresher")


@dataclass(frozen=True)
class BuiltJob:
    """A job's provider and runtimes, built but not started; `rejected` says which
    tenants could not be built and why."""

    job: JobConfig
    provider: TokenProvider
    runtimes: list[JobRuntime]
    rejected: list[str]


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
        notifier: SystemdNotifier | None = None,
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
        #: Jobs a leader keeps off the timer until it holds their directories' locks.
        self._parked: dict[JobKey, tuple[JobRuntime, frozenset[str]]] = {}
        #: Bumped on every leadership change: a take-over or lock wait of an older
        #: term stops.
        self._term = 0
        self.elector: LeaderElector | None = None
        self._leading = False
        if is_leader is None and settings.leader_election.enabled:
            self.elector = LeaderElector(
                settings.leader_election,
                clients=self.kube,
                clock=self.clock,
                on_change=self._leadership_changed,
                rng=rng,
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
        #: Every file and Secret key a running (job, tenant) writes: one writer each.
        self.claims = TargetClaims()
        #: Refused tenants per job, at its last (re)load.
        self.rejected: dict[str, int] = {}
        self.watcher = self._new_watcher()
        self._listener: Listener | None = None
        self._server_done = anyio.Event()
        self._tg: TaskGroup | None = None
        self._watch_scope: anyio.CancelScope | None = None
        self.reloads = 0
        #: Errors of the last reload if it was rejected (shown in systemd's STATUS=), else 0.
        self.reload_rejected = 0
        self.notifiers: dict[str, list[Notifier]] = {}
        self._notify_client: httpx2.AsyncClient | None = None
        self.scheduler.publisher.written_hooks.append(self._notifications)

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
        self._term += 1
        if not leading:
            self._leading = False
            # The next leader may be another process on this host, sharing the directories.
            self.sink_locks.release_all()
            return
        if self._tg is not None:
            self._tg.start_soon(self._take_over, self._term)

    async def _take_over(self, term: int) -> None:
        """New leader: lock the sink directories, adopt what the previous leader wrote,
        then refresh only what is due. Jobs writing into a directory another process
        holds wait, off the timer, until its lock frees."""
        if term != self._term:
            return  # no longer leading by the time this task runs
        runtimes = list(self.scheduler.jobs.values())
        refusals = self.sink_locks.acquire(_directories(runtimes))
        blocked = {r.directory for r in refusals}
        adopted = 0
        for runtime in runtimes:
            waits_for = _directories([runtime]) & blocked if blocked else set()
            if waits_for:
                self._park(runtime, waits_for, refusals)
                continue
            if await self._unpark(runtime):
                adopted += 1
        if term != self._term:
            return  # leadership changed meanwhile
        self._leading = True
        self.scheduler.wake()
        log.info("leading", adopted_from_sinks=adopted, jobs=len(self.scheduler.jobs))
        if refusals and self._tg is not None:
            assert self.elector is not None
            log.warning(
                "sink directories owned by another process: their jobs wait for the lock",
                owners=[r.describe() for r in refusals],
                jobs=len(self._parked),
                retry_every=self.elector.retry_period,
            )
            self._tg.start_soon(self._wait_for_sink_locks, term)

    def _park(self, runtime: JobRuntime, directories: set[str], refusals: list[Refusal]) -> None:
        self._parked[runtime.key] = (runtime, frozenset(directories))
        self.scheduler.reschedule(runtime, math.inf)
        runtime.last_error = "sink"
        owners = [r for r in refusals if r.directory in directories]
        runtime.last_error_message = str(SinkOwnedError(owners))

    async def _unpark(self, runtime: JobRuntime) -> bool:
        """Put a job (back) on the timer as a leader: adopt its sinks' token if still
        good (True), else refresh it now if it was parked."""
        entry = self._parked.pop(runtime.key, None)
        parked = entry is not None and entry[0] is runtime
        if parked and runtime.last_error == "sink":
            runtime.last_error = runtime.last_error_message = None
        if runtime.refreshing is None and await self.scheduler.recover(runtime):
            self.scheduler.reschedule(runtime, runtime.next_refresh_at)
            return True
        if parked:
            self.scheduler.reschedule(runtime, None)
        return False

    async def _wait_for_sink_locks(self, term: int) -> None:
        """Retry the refused locks every retry period while leading; resume the jobs
        of each directory as soon as its lock is ours."""
        assert self.elector is not None
        while self._parked:
            await self.clock.sleep_until(self.clock.now() + self.elector.retry_period)
            if term != self._term:
                return
            for key, (runtime, _) in list(self._parked.items()):
                if self.scheduler.jobs.get(key) is not runtime:
                    del self._parked[key]  # removed or replaced by a reload meanwhile
            waiting = set().union(*(dirs for _, dirs in self._parked.values()))
            self.sink_locks.acquire(waiting)
            freed = {d for d in waiting if self.sink_locks.holds(d)}
            if not freed:
                continue
            resumed = 0
            for runtime, dirs in list(self._parked.values()):
                if dirs <= freed:
                    await self._unpark(runtime)
                    resumed += 1
            log.info(
                "sink directory lock acquired: resuming its jobs",
                directories=sorted(freed),
                jobs=resumed,
            )

    # ------------------------------------------------------------ job set

    async def add_job(self, job: JobConfig) -> list[JobRuntime]:
        """Build a job's provider and runtimes, adopt valid tokens from its sinks, start it.

        A tenant whose targets are unsafe or taken is skipped and reported; the
        job's other tenants start. `ConfigError` when the job cannot run at all.
        """
        built = self._build_job(job)
        await self._start_job(built)
        return built.runtimes

    def _build_job(self, job: JobConfig) -> BuiltJob:
        provider = build_provider(job, clients=self.clients, clock=self.clock)
        if isinstance(job.provider, DebituraProviderConfig):
            lines = job.provider.tenant_lines()
            tenants: list[str | None] = list(lines.tenants)
            rejected = list(lines.rejected)
        else:
            tenants, rejected = [None], []
        runtimes = self._build_tenants(job, provider, tenants, rejected)
        if tenants == [None] and not runtimes:
            raise ConfigError([rejected[0]])
        return BuiltJob(job, provider, runtimes, rejected)

    def _guarded(self, runtimes: list[JobRuntime]) -> list[JobRuntime]:
        """Make the runtimes' file sinks write only where this process holds the lock."""
        for runtime in runtimes:
            for sink in runtime.sinks:
                if isinstance(sink, FileSink):
                    sink.locks = self.sink_locks
        return runtimes

    async def _start_job(self, built: BuiltJob, *, adopt: bool = True) -> None:
        job, provider = built.job, built.provider
        await self._start(built.runtimes, adopt=adopt)
        self._report_rejected(job, built.rejected)
        self.job_configs[job.name] = job
        self.providers[job.name] = provider
        if job.notify:
            if self._notify_client is None:
                self._notify_client = httpx2.AsyncClient(follow_redirects=False)
            client = self._notify_client
            self.notifiers[job.name] = [build_notifier(n, client=client) for n in job.notify]
        else:
            self.notifiers.pop(job.name, None)

    def _build_tenants(
        self,
        job: JobConfig,
        provider: TokenProvider,
        tenants: list[str | None],
        rejected: list[str],
    ) -> list[JobRuntime]:
        """Claim each tenant's targets and build its runtime; a tenant that cannot be
        built goes to `rejected` instead."""
        built = []
        for tenant in tenants:
            owner = (job.name, tenant)
            try:
                self.claims.claim(owner, job.targets(tenant))
                runtimes = build_runtimes(job, provider, tenants=[tenant], kube=self.kube)
            except (TargetError, ConfigError) as exc:
                self.claims.release(owner)
                rejected.append(f"{describe_owner(owner)}: {exc}")
                continue
            built.extend(self._guarded(runtimes))
        return built

    async def _start(self, runtimes: list[JobRuntime], *, adopt: bool = True) -> None:
        for runtime in runtimes:
            if self.is_leader is not None:
                for sink in runtime.sinks:
                    if isinstance(sink, KubernetesSink):
                        # Asked right before each request: a replica that stopped
                        # leading (even paused mid-write) sends nothing more.
                        sink.may_write = self.is_leader
            if adopt:
                await self.scheduler.recover(runtime)
            self.scheduler.add(runtime)

    def _report_rejected(self, job: JobConfig, rejected: list[str]) -> None:
        """Say (log and metric) which tenants of a job were refused, and why."""
        self.rejected[job.name] = len(rejected)
        self.metrics.tenants_rejected.labels(job.name, job.provider.kind).set(len(rejected))
        for reason in rejected[:100]:
            log.warning(
                "tenant refused: its other tenants keep working", job=job.name, reason=reason
            )
        if len(rejected) > 100:
            log.warning("more tenants refused", job=job.name, count=len(rejected) - 100)

    def _notifications(self, runtime: JobRuntime, token: Token) -> Coroutine[Any, Any, None] | None:
        """The job's notifications for a written token, if it has notifiers."""
        notifiers = self.notifiers.get(runtime.job)
        return self._notify(runtime, token, notifiers) if notifiers else None

    async def _notify(self, runtime: JobRuntime, token: Token, notifiers: list[Notifier]) -> None:
        """Run the job's notifiers concurrently; failures are logged and counted."""
        scrub = self.redactor.scrub
        event = TokenWritten(
            job=runtime.job,
            tenant=scrub(runtime.tenant) if runtime.tenant is not None else None,
            expires_at=rfc3339(token.expires_at),
            fingerprint=token.fingerprint(),
            sink_paths=tuple(scrub(s.target) for s in runtime.sinks),
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
        self.claims.release_job(name)
        self.rejected.pop(name, None)
        with contextlib.suppress(KeyError):  # only jobs with tenants have the series
            self.metrics.tenants_rejected.remove(name, job.provider.kind)

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
            self.scheduler.credential_changed(keys)

        for path in provider.secret_files():
            self.watcher.watch(path, rotated)

        async def key_changed(path: Path) -> None:
            if self.providers.get(job.name) is not provider:
                return
            failing = [k for k, r in self.scheduler.jobs.items() if k[0] == job.name and r.failures]
            log.info(
                "watched file changed: retrying failed refreshes",
                job=job.name,
                path=str(path),
                tokens=len(failing),
            )
            for key in failing:
                self.scheduler.reschedule_now(key)

        for path in getattr(provider, "watched_files", list)():
            self.watcher.watch(path, key_changed)
        if isinstance(job.provider, DebituraProviderConfig) and job.provider.tenants_file:

            async def tenants_changed(path: Path) -> None:
                if self.job_configs.get(job.name) is not job:
                    return
                await self._sync_tenants(job)

            self.watcher.watch(job.provider.tenants_file, tenants_changed)

    async def _sync_tenants(self, job: JobConfig) -> None:
        """The ``tenants_file`` changed: start added tenants, withdraw removed ones.
        Refused lines are skipped and reported; an unreadable file changes nothing."""
        try:
            await self._apply_tenants_file(job)
        except Exception as exc:
            self.scheduler.internal_error("tenants", exc)

    async def _apply_tenants_file(self, job: JobConfig) -> None:
        assert isinstance(job.provider, DebituraProviderConfig)
        try:
            lines = job.provider.tenant_lines()
        except OSError as exc:
            log.error(
                "cannot read tenants_file: keeping the current tenants",
                job=job.name,
                error=exc.strerror or str(exc),
            )
            return
        wanted = set(lines.tenants)
        current = {k[1] for k in self.scheduler.jobs if k[0] == job.name}
        removed = current - wanted
        for tenant in removed:
            gone = self.scheduler.remove((job.name, tenant))
            self.claims.release((job.name, tenant))
            if gone is not None:
                await _withdraw(gone)
        rejected = list(lines.rejected)
        added = [t for t in lines.tenants if t not in current]
        provider = self.providers[job.name]
        started = self._build_tenants(job, provider, list(added), rejected)
        await self._start(started)
        self._report_rejected(job, rejected)
        log.info(
            "tenants changed",
            job=job.name,
            added=len(started),
            removed=len(removed),
            refused=len(rejected),
        )

    async def load_jobs(self) -> None:
        """Build every job, lock its sink directories (unless a leader election decides
        when), adopt valid tokens already in the sinks, register."""
        built = [self._build_job(job) for job in self.settings.jobs]
        if self.elector is None:
            self._own_or_refuse([r for b in built for r in b.runtimes])
        for job in built:
            await self._start_job(job)
        recovered = sum(1 for r in self.scheduler.jobs.values() if r.token is not None)
        log.info("jobs loaded", jobs=len(self.scheduler.jobs), recovered_from_sinks=recovered)

    async def reload(self) -> bool:
        """SIGHUP: apply a new config without dropping valid tokens.

        Unchanged jobs keep their tokens and schedules; changed jobs are rebuilt
        (their sinks' valid tokens are adopted, so nothing is re-minted needlessly);
        new jobs start; removed jobs stop. An invalid config changes nothing.
        A job that cannot start under the new config is reported and left out;
        the others still change.
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
                await self._add_reloaded(job)
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

    async def _add_reloaded(self, job: JobConfig) -> None:
        try:
            await self.add_job(job)
        except ConfigError as exc:
            self.metrics.config_reload_failures.inc()
            log.error("reload: job cannot start, left out", job=job.name, errors=exc.errors)
        except Exception as exc:
            self.scheduler.internal_error("reload", exc)

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

    def _own_or_refuse(self, runtimes: Iterable[JobRuntime]) -> None:
        """Lock the runtimes' sink directories; raise `SinkOwnedError` (holding none)
        if another process holds any."""
        refusals = self.sink_locks.acquire(_directories(runtimes))
        if refusals:
            self.sink_locks.release_all()
            raise SinkOwnedError(refusals)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Daemon]:
        """Start everything in the background; stop (gracefully) on exit.

        Raises `ListenError` before anything else if the listen address is taken.
        """
        # First: a second daemon on a busy port must stop before it mints or writes.
        listener = self._listen() if self.serve_http else None
        try:
            await self.load_jobs()
            # Everything built so far (config, 10,000s of job runtimes, sinks, loggers)
            # lives as long as the daemon: move it out of the collector's sight, so a
            # full collection scans only what changed since (a 200 ms pause at 10k jobs).
            gc.collect()
            gc.freeze()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.scheduler.run)
                if self.elector is not None:
                    await tg.start(self.elector.run)
                self._restart_watcher()
                if listener is not None:
                    await self._start_server(tg, listener)
                tg.start_soon(self._systemd)
                try:
                    yield self
                finally:
                    await self.shutdown(tg)
        finally:
            if listener is not None:
                listener.sock.close()
            # Only once every task has ended: a task resumed by its I/O right after
            # the cancel would otherwise send on a closed client.
            with anyio.CancelScope(shield=True):
                await self.kube.aclose()
                await self.clients.aclose()
                if self._notify_client is not None:
                    await self._notify_client.aclose()
            self.sink_locks.release_all()

    def _restart_watcher(self) -> None:
        if self._tg is None:
            return
        if self._watch_scope is not None:
            self.watcher.stop()
            self._watch_scope.cancel()
        self.watcher = self._new_watcher()
        for job in self.job_configs.values():
            self._watch_job(job)
        watcher = self.watcher

        async def run() -> None:
            with anyio.CancelScope() as scope:
                self._watch_scope = scope
                await watcher.run()

        self._tg.start_soon(run)

    def _new_watcher(self) -> FileWatcher:
        return FileWatcher(
            on_error=lambda exc: self.scheduler.internal_error("watch", exc),
        )

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

    def _listen(self) -> Listener:
        """Bind the listen address and size the listener to the open-files limit,
        keeping a reserve of descriptors for secrets, sinks and HTTP clients."""
        server_cfg = self.settings.server
        wanted = server_cfg.max_connections
        reserve = fd_reserve(self.settings.refresh.concurrency)
        nofile = raise_nofile_limit(nofile_needed(wanted, reserve))
        cap = connection_cap(wanted, nofile, reserve)
        if cap < wanted:
            log.warning(
                "server.max_connections lowered to fit the open files limit",
                wanted=wanted,
                max_connections=cap,
                open_files_limit=nofile,
                reserved=reserve,
            )
        sock = bind(server_cfg.host, server_cfg.port)
        access = Access(
            admin=token_reader(server_cfg.admin_token_file),
            consumer=token_reader(server_cfg.consumer_token_file),
            loopback=is_loopback(server_cfg.host),
        )
        elector = self.elector
        app = create_app(
            self.scheduler,
            self.metrics,
            access=access,
            is_leader=self.is_leader,
            leader=elector.leader if elector is not None else None,
            retry_after=elector.retry_period if elector is not None else 2.0,
        )
        return Listener(sock, app, max_connections=cap, header_timeout=server_cfg.header_timeout)

    async def _start_server(self, tg: TaskGroup, listener: Listener) -> None:
        self._listener = listener
        self.port = listener.port
        done = self._server_done = anyio.Event()

        async def serve(*, task_status: TaskStatus[None]) -> None:
            try:
                await listener.serve(task_status=task_status)
            finally:
                done.set()

        await tg.start(serve)
        log.info(
            "listening",
            address=f"{self.settings.server.host}:{self.port}",
            max_connections=listener.max_connections,
            header_timeout=listener.header_timeout,
        )

    async def shutdown(self, tg: TaskGroup) -> None:
        """Stop dispatching, let in-flight refreshes and writes finish, then stop."""
        self.notifier.stopping()
        self.scheduler.is_active = lambda: False
        self.watcher.stop()
        with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
            while any(r.refreshing is not None for r in list(self.scheduler.jobs.values())):
                await anyio.sleep(0.01)
        if self._listener is not None:
            self._listener.close()
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
                        try:
                            await self.reload()
                        except Exception as exc:
                            self.metrics.config_reload_failures.inc()
                            self.scheduler.internal_error("reload", exc)
                        continue
                    log.info("stopping", signal=signal.Signals(signum).name)
                    break

    async def refresh_all_once(self, *, write: bool = True) -> bool:
        """`refresher once`: refresh every job now and write its sinks (`check
        --online`: fetch only); True if every job succeeded."""
        runtimes: list[JobRuntime] = []
        for job in self.settings.jobs:
            built = self._build_job(job)
            self._report_rejected(job, built.rejected)
            runtimes.extend(built.runtimes)
        for runtime in runtimes:
            if not write:
                runtime.sinks = []
            self.scheduler.add(runtime)
        try:
            self._own_or_refuse(runtimes)
            async with anyio.create_task_group() as tg:
                for runtime in runtimes:
                    tg.start_soon(self.scheduler.refresh, runtime)
        finally:
            self.sink_locks.release_all()
            await self.clients.aclose()
            await self.kube.aclose()
        now = self.clock.now()
        refused = sum(self.rejected.values())
        return not refused and all(r.valid(now) and r.failures == 0 for r in runtimes)


async def _withdraw(runtime: JobRuntime) -> None:
    """Remove a job's token from its sinks (tenant removed, job deleted)."""
    for sink in runtime.sinks:
        try:
            await sink.remove()
        except LeadershipLostError:
            log.info(
                "token left for the leader to withdraw", job=runtime.job, tenant=runtime.tenant
            )
        except SinkError as exc:
            log.error(
                "cannot withdraw token", job=runtime.job, tenant=runtime.tenant, error=str(exc)
            )


def _directories(runtimes: Iterable[JobRuntime]) -> set[str]:
    """The directories the runtimes' file sinks write into."""
    return {
        sink.directory
        for runtime in runtimes
        for sink in runtime.sinks
        if isinstance(sink, FileSink)
    }
