"""Turning configuration into running parts: providers, sinks and job runtimes."""

from __future__ import annotations

from pathlib import Path

import structlog

from refresher.clock import Clock
from refresher.config import (
    DebituraProviderConfig,
    DutyClaimsProviderConfig,
    FileSinkConfig,
    GooclaimProviderConfig,
    JobConfig,
    OAuth2ProviderConfig,
    SinkConfig,
)
from refresher.errors import ConfigError
from refresher.providers.base import HTTPClients, TokenProvider
from refresher.providers.debitura import DebituraProvider
from refresher.providers.dutyclaims import DutyClaimsProvider
from refresher.providers.gooclaim import GooclaimProvider
from refresher.providers.oauth2 import OAuth2Provider
from refresher.scheduler import JobRuntime
from refresher.sinks.base import TokenSink
from refresher.sinks.file import FileSink
from refresher.sinks.kubernetes import KubeClients, KubernetesSink
from refresher.targets import expand_key, expand_path

log = structlog.get_logger("refresher.jobs")


def build_provider(job: JobConfig, *, clients: HTTPClients, clock: Clock) -> TokenProvider:
    """The provider implementation for a job's ``provider.kind``."""
    config = job.provider
    if isinstance(config, OAuth2ProviderConfig):
        return OAuth2Provider(config, clients=clients, clock=clock)
    if isinstance(config, DutyClaimsProviderConfig):
        _dutyclaims_notes(job.name, config)
        return DutyClaimsProvider(config, clients=clients, clock=clock)
    if isinstance(config, DebituraProviderConfig):
        return DebituraProvider(config, clients=clients, clock=clock)
    if isinstance(config, GooclaimProviderConfig):
        return GooclaimProvider(config, clients=clients, clock=clock)
    raise ConfigError([f"jobs.{job.name}.provider.kind: unsupported kind {config.kind!r}"])


def _dutyclaims_notes(job: str, config: DutyClaimsProviderConfig) -> None:
    """What the contract wants said when a DutyClaims job starts."""
    if config.sandbox_on_production_host is not None:
        log.warning(
            "sandbox_on_production_host is deprecated and ignored: the sandbox token "
            "endpoint is on api.dutyclaims.com; remove the key",
            job=job,
        )
    if config.mode == "sandbox":
        log.info(
            "DutyClaims sandbox job: sandbox OAuth is no proof of production access "
            "(production uses managed credentials)",
            job=job,
            environment="sandbox",
            base_url=config.base_url,
        )


def tenants_of(job: JobConfig) -> list[str | None]:
    """The tenants a job mints for now; ``[None]`` for single-token providers.

    Refused ``tenants_file`` lines are left out (the daemon reports them).
    """
    if isinstance(job.provider, DebituraProviderConfig):
        return list(job.provider.tenant_lines().tenants)
    return [None]


def build_sink(
    config: SinkConfig, *, job: str, tenant: str | None, kube: KubeClients | None = None
) -> TokenSink:
    """The sink for (job, tenant); `TargetError` if the tenant cannot name a target."""
    if isinstance(config, FileSinkConfig):
        return FileSink(config, Path(expand_path(config.path, job=job, tenant=tenant)))
    if kube is None:
        raise ConfigError([f"job {job}: kubernetes sink needs a Kubernetes client"])
    key = expand_key(config.key_template(tenant), job=job, tenant=tenant)
    return KubernetesSink(config, key, clients=kube)


def build_runtimes(
    job: JobConfig,
    provider: TokenProvider,
    *,
    tenants: list[str | None] | None = None,
    kube: KubeClients | None = None,
) -> list[JobRuntime]:
    """One runtime per tenant (or one for the job), each with its own sinks."""
    runtimes = []
    for tenant in tenants_of(job) if tenants is None else tenants:
        runtimes.append(
            JobRuntime(
                job=job.name,
                tenant=tenant,
                provider=provider,
                sinks=[build_sink(s, job=job.name, tenant=tenant, kube=kube) for s in job.sinks],
                on_expiry=job.on_expiry,
            )
        )
    return runtimes
