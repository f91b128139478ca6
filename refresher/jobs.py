"""Turning configuration into running parts: providers, sinks and job runtimes."""

from __future__ import annotations

from pathlib import Path

import structlog

from refresher.clock import Clock
from refresher.config import FileSinkConfig, JobConfig, SinkConfig
from refresher.errors import ConfigError
from refresher.kube import KubeClients
from refresher.providers import PROVIDERS
from refresher.providers.base import HTTPClients, TokenProvider
from refresher.providers.debitura import DebituraProviderConfig
from refresher.runtime import JobRuntime
from refresher.sinks.base import TokenSink
from refresher.sinks.file import FileSink
from refresher.sinks.kubernetes import KubernetesSink
from refresher.targets import expand_key, expand_path

log = structlog.get_logger("refresher.jobs")


def build_provider(job: JobConfig, *, clients: HTTPClients, clock: Clock) -> TokenProvider:
    """The provider implementation for a job's ``provider.kind`` (`PROVIDERS`)."""
    provider_class = PROVIDERS.get(type(job.provider))
    if provider_class is None:
        kind = job.provider.kind
        raise ConfigError([f"jobs.{job.name}.provider.kind: unsupported kind {kind!r}"])
    provider = provider_class(job.provider, clients=clients, clock=clock)
    provider.starting(job.name)
    return provider


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
