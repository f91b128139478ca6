"""The running job set: jobs added, rebuilt and removed at start and on reload,
tenants that come and go with a ``tenants_file``, and the files whose change means a
credential rotated.

Every file and Secret key a running (job, tenant) writes is *claimed* (one writer
each): a tenant whose targets are unsafe or taken is refused and reported — log line
and ``refresher_tenants_rejected`` — while the job's other tenants run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from refresher.clock import Clock
from refresher.config import JobConfig
from refresher.errors import ConfigError, LeadershipLostError, SinkError, SinkOwnedError
from refresher.jobs import build_provider, build_runtimes
from refresher.kube import KubeClients
from refresher.metrics import Metrics
from refresher.notify import Notifications
from refresher.providers.base import HTTPClients, TokenProvider
from refresher.providers.debitura import DebituraProviderConfig
from refresher.runtime import JobKey, JobRuntime
from refresher.scheduler import Scheduler
from refresher.sinks.base import Rewrite
from refresher.sinks.file import FileSink
from refresher.sinks.kubernetes import KubernetesSink
from refresher.sinks.lock import DirectoryLocks
from refresher.sinks.shared import SharedOutputs, file_of
from refresher.targets import TargetClaims, TargetError, describe_owner
from refresher.watch import Callback, FileWatcher

log = structlog.get_logger("refresher")


@dataclass(frozen=True)
class BuiltJob:
    """A job's provider and runtimes, built but not started; `rejected` says which
    tenants could not be built and why."""

    job: JobConfig
    provider: TokenProvider
    runtimes: list[JobRuntime]
    rejected: list[str]


class JobSet:
    """The jobs one daemon runs, kept in step with its configuration."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        clients: HTTPClients,
        kube: KubeClients,
        clock: Clock,
        metrics: Metrics,
        sink_locks: DirectoryLocks,
        notifications: Notifications,
        is_leader: Callable[[], bool] | None,
    ) -> None:
        self.scheduler = scheduler
        self.clients = clients
        self.kube = kube
        self.clock = clock
        self.metrics = metrics
        self.sink_locks = sink_locks
        self.notifications = notifications
        self.is_leader = is_leader
        self.configs: dict[str, JobConfig] = {}
        self.providers: dict[str, TokenProvider] = {}
        #: Every file and Secret key a running (job, tenant) writes: one writer each.
        self.claims = TargetClaims()
        #: Refused tenants per job, at its last (re)load.
        self.rejected: dict[str, int] = {}
        #: Bundles and template files, shared by the sinks of every job.
        self.shared = SharedOutputs(
            clock=clock,
            metrics=metrics,
            announce=self._announce,
            kube=kube,
            locks=sink_locks,
            may_write=is_leader,
        )

    async def add(self, job: JobConfig) -> list[JobRuntime]:
        """Build a job, adopt valid tokens from its sinks, start it. `ConfigError`
        when the job cannot run at all."""
        built = self.build(job)
        await self.start(built)
        return built.runtimes

    def build(self, job: JobConfig) -> BuiltJob:
        """The job's provider and one runtime per usable tenant (not started)."""
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

    async def start(self, built: BuiltJob, *, adopt: bool = True) -> None:
        """Register a built job's runtimes (adopting what their sinks hold)."""
        job = built.job
        await self._start_runtimes(built.runtimes, adopt=adopt)
        self.report_rejected(job, built.rejected)
        self.configs[job.name] = job
        self.providers[job.name] = built.provider
        self.notifications.configure(job.name, job.notify)

    async def remove(self, name: str, *, delete: bool | None = None) -> None:
        """Stop a job; its sink files stay unless it says ``on_remove: delete``."""
        job = self.configs.pop(name, None)
        self.providers.pop(name, None)
        if job is None:
            return
        delete = job.on_remove == "delete" if delete is None else delete
        for key in [k for k in self.scheduler.jobs if k[0] == name]:
            runtime = self.scheduler.remove(key)
            if runtime is not None and delete:
                await withdraw(runtime)
            if runtime is not None:
                await self.shared.release(runtime.sinks)
        self.claims.release_job(name)
        self.rejected.pop(name, None)
        with contextlib.suppress(KeyError):  # only jobs with tenants have the series
            self.metrics.tenants_rejected.remove(name, job.provider.kind)

    async def apply(self, jobs: list[JobConfig]) -> dict[str, int]:
        """Change the running set to `jobs` (a reload): unchanged jobs keep their
        tokens and schedules, changed ones are rebuilt (adopting what their sinks
        hold), new ones start, removed ones stop. A job that cannot start is reported
        (`refresher_config_reload_failures_total`) and left out. Counts by outcome."""
        old, new = dict(self.configs), {j.name: j for j in jobs}
        kept = [n for n in new if old.get(n) == new[n]]
        for name, config in old.items():
            if name not in new or config != new[name]:
                await self.remove(name, delete=None if name not in new else False)
        for name, job in new.items():
            if name in kept:
                continue
            try:
                await self.add(job)
            except ConfigError as exc:
                self.metrics.config_reload_failures.inc()
                log.error("reload: job cannot start, left out", job=job.name, errors=exc.errors)
            except Exception as exc:
                self.scheduler.internal_error("reload", exc)
        return {
            "kept": len(kept),
            "added": len([n for n in new if n not in old]),
            "removed": len([n for n in old if n not in new]),
            "changed": len([n for n in new if n in old and n not in kept]),
        }

    def own_or_refuse(self, runtimes: Iterable[JobRuntime]) -> None:
        """Lock the runtimes' sink directories; raise `SinkOwnedError` (holding none)
        if another process holds any."""
        refusals = self.sink_locks.acquire(directories(runtimes))
        if refusals:
            self.sink_locks.release_all()
            raise SinkOwnedError(refusals)

    def report_rejected(self, job: JobConfig, rejected: list[str]) -> None:
        """Say (log and metric) which tenants of a job were refused, and why."""
        self.rejected[job.name] = len(rejected)
        self.metrics.tenants_rejected.labels(job.name, job.provider.kind).set(len(rejected))
        for reason in rejected[:100]:
            log.warning(
                "tenant refused: its other tenants keep working", job=job.name, reason=reason
            )
        if len(rejected) > 100:
            log.warning("more tenants refused", job=job.name, count=len(rejected) - 100)

    def watch(self, watcher: FileWatcher) -> None:
        """Point `watcher` at every job's credential, key and tenants files, and at
        every template file."""
        for job in self.configs.values():
            self._watch(job, watcher)
        for source in self.shared.templates.values():
            watcher.watch(source.path, source.changed)

    async def _announce(self, rewrite: Rewrite) -> None:
        """A bundle or template output was rewritten: its jobs' notifiers, once each."""
        work = self.notifications.rewritten(rewrite)
        if work is not None:
            await self.scheduler.publisher.spawn(work)

    def _watch(self, job: JobConfig, watcher: FileWatcher) -> None:
        provider = self.providers[job.name]
        for path in provider.secret_files():
            watcher.watch(path, self._on_rotation(job.name, provider))
        for path in getattr(provider, "watched_files", list)():
            watcher.watch(path, self._on_key_change(job.name, provider))
        if isinstance(job.provider, DebituraProviderConfig) and job.provider.tenants_file:

            async def tenants_changed(path: Path) -> None:
                if self.configs.get(job.name) is job:
                    await self.sync_tenants(job)

            watcher.watch(job.provider.tenants_file, tenants_changed)

    def _keys(self, job: str, *, failing: bool = False) -> list[JobKey]:
        jobs = self.scheduler.jobs.items()
        return [k for k, r in jobs if k[0] == job and (r.failures or not failing)]

    def _on_rotation(self, job: str, provider: TokenProvider) -> Callback:
        """A credential file changed: the job's tokens re-mint at once."""

        async def rotated(path: Path) -> None:
            if self.providers.get(job) is provider:
                for secret in provider.secrets():
                    self.scheduler.redactor.add_secret(secret)
                log.info("credential rotated: re-minting", job=job, path=str(path))
                self.scheduler.credential_changed(self._keys(job))

        return rotated

    def _on_key_change(self, job: str, provider: TokenProvider) -> Callback:
        """A verification key changed: failed refreshes are retried at once."""

        async def key_changed(path: Path) -> None:
            if self.providers.get(job) is provider:
                log.info("watched file changed: retrying failed refreshes", job=job)
                for key in self._keys(job, failing=True):
                    self.scheduler.reschedule_now(key)

        return key_changed

    async def sync_tenants(self, job: JobConfig) -> None:
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
        current = {k[1] for k in self.scheduler.jobs if k[0] == job.name}
        removed = current - set(lines.tenants)
        for tenant in removed:
            gone = self.scheduler.remove((job.name, tenant))
            self.claims.release((job.name, tenant))
            if gone is not None:
                await withdraw(gone)
                await self.shared.release(gone.sinks)
        rejected = list(lines.rejected)
        added: list[str | None] = [t for t in lines.tenants if t not in current]
        started = self._build_tenants(job, self.providers[job.name], added, rejected)
        await self._start_runtimes(started)
        self.report_rejected(job, rejected)
        log.info(
            "tenants changed",
            job=job.name,
            added=len(started),
            removed=len(removed),
            refused=len(rejected),
        )

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
                runtimes = build_runtimes(
                    job, provider, tenants=[tenant], kube=self.kube, shared=self.shared
                )
            except (TargetError, ConfigError) as exc:
                self.claims.release(owner)
                rejected.append(f"{describe_owner(owner)}: {exc}")
                continue
            for runtime in runtimes:
                for sink in runtime.sinks:
                    if isinstance(sink, FileSink):
                        sink.locks = self.sink_locks  # writes only where we hold the lock
            built.extend(runtimes)
        return built

    async def _start_runtimes(self, runtimes: list[JobRuntime], *, adopt: bool = True) -> None:
        for runtime in runtimes:
            for sink in runtime.sinks:
                if isinstance(sink, KubernetesSink) and self.is_leader is not None:
                    # Asked right before each request: a replica that stopped leading
                    # (even paused mid-write) sends nothing more.
                    sink.may_write = self.is_leader
            if adopt:
                await self.scheduler.recover(runtime)
            self.scheduler.add(runtime)


async def withdraw(runtime: JobRuntime) -> None:
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


def directories(runtimes: Iterable[JobRuntime]) -> set[str]:
    """The directories the runtimes' file sinks, bundles and templates write into."""
    return {
        file.directory
        for runtime in runtimes
        for sink in runtime.sinks
        if (file := file_of(sink)) is not None
    }
