"""Turning configuration into running parts: providers, sinks and job runtimes."""

from __future__ import annotations

from pathlib import Path

import structlog

from refresher.clock import Clock
from refresher.config import (
    BundleSinkConfig,
    FileSinkConfig,
    JobConfig,
    SinkConfig,
    TemplateSinkConfig,
)
from refresher.errors import ConfigError
from refresher.kube import KubeClients
from refresher.providers import PROVIDERS
from refresher.providers.base import HTTPClients, TokenProvider
from refresher.providers.debitura import DebituraProviderConfig
from refresher.runtime import JobRuntime
from refresher.sinks.base import TokenSink
from refresher.sinks.file import FileSink
from refresher.sinks.kubernetes import KubernetesSink
from refresher.sinks.shared import SharedOutputs
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
    config: SinkConfig,
    *,
    job: str,
    tenant: str | None,
    provider_kind: str = "",
    kube: KubeClients | None = None,
    shared: SharedOutputs | None = None,
) -> TokenSink:
    """The sink for (job, tenant); `TargetError` if the tenant cannot name a target."""
    if isinstance(config, FileSinkConfig):
        return FileSink(config, Path(expand_path(config.path, job=job, tenant=tenant)))
    if isinstance(config, BundleSinkConfig | TemplateSinkConfig):
        if shared is None:
            raise ConfigError([f"job {job}: {config.kind} sinks need the daemon's shared outputs"])
        if isinstance(config, BundleSinkConfig):
            return shared.bundle_member(config, job=job, tenant=tenant, provider_kind=provider_kind)
        return shared.template_sink(config, job=job, tenant=tenant, provider_kind=provider_kind)
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
    shared: SharedOutputs | None = None,
) -> list[JobRuntime]:
    """One runtime per tenant (or one for the job), each with its own sinks; a tenant
    whose sinks cannot all be built leaves no member in a bundle behind."""
    runtimes = []
    for tenant in tenants_of(job) if tenants is None else tenants:
        sinks: list[TokenSink] = []
        try:
            for config in job.sinks:
                sinks.append(
                    build_sink(
                        config,
                        job=job.name,
                        tenant=tenant,
                        provider_kind=provider.kind,
                        kube=kube,
                        shared=shared,
                    )
                )
        except Exception:
            if shared is not None:
                shared.leave(sinks)
            raise
        runtimes.append(
            JobRuntime(
                job=job.name,
                tenant=tenant,
                provider=provider,
                sinks=sinks,
                on_expiry=job.on_expiry,
            )
        )
    return runtimes
