"""What sinks of different jobs share, one per daemon: every bundle (one per file or
Secret key, however many members) and every template file (parsed once, watched),
and the outputs they write — files locked like a file sink's directory, Secret keys
written only while leading, like a Secret sink's."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from refresher.clock import Clock
from refresher.config import BundleSinkConfig, OutputConfig, TemplateSinkConfig
from refresher.errors import ConfigError, SinkError, TemplateError
from refresher.kube import KubeClients
from refresher.metrics import Metrics
from refresher.sinks.base import Announce, Output, TokenSink
from refresher.sinks.bundle import Bundle, BundleMember
from refresher.sinks.file import AtomicFile
from refresher.sinks.kubernetes import KubernetesSink
from refresher.sinks.lock import DirectoryLocks
from refresher.sinks.template import TemplateSink, TemplateSource
from refresher.targets import TargetError, expand_key

log = structlog.get_logger("refresher.sinks.shared")


@dataclass(eq=False)
class SharedOutputs:
    """The bundles and template files of one daemon's sinks."""

    clock: Clock
    metrics: Metrics
    #: Called after every rewrite of a bundle or re-rendered template.
    announce: Announce
    kube: KubeClients | None = None
    #: The daemon's file-sink directory locks; its outputs write under them too.
    locks: DirectoryLocks | None = None
    #: The leader check a Secret output asks before every write.
    may_write: Callable[[], bool] | None = None
    bundles: dict[str, Bundle] = field(default_factory=dict)
    templates: dict[Path, TemplateSource] = field(default_factory=dict)

    def bundle_member(
        self, config: BundleSinkConfig, *, job: str, tenant: str | None, provider_kind: str
    ) -> BundleMember:
        """(job, tenant)'s membership of the bundle `config` names (made at its first
        member); `TargetError` if another bundle there has other settings."""
        target = config.output(job=job, tenant=tenant)
        bundle = self.bundles.get(target)
        if bundle is not None and bundle.config.identity != config.identity:
            if not bundle.empty:
                raise TargetError(f"bundle {target} has other settings in another job")
            bundle = None
        if bundle is None:
            output = self._output(config, job=job, tenant=tenant, kind="bundle")
            bundle = Bundle(
                config, output, clock=self.clock, metrics=self.metrics, announce=self.announce
            )
            self.bundles[target] = bundle
        return bundle.join(job, tenant, provider_kind)

    def template_sink(
        self, config: TemplateSinkConfig, *, job: str, tenant: str | None, provider_kind: str
    ) -> TemplateSink:
        """A sink rendering `config`'s template (parsed once per file) for (job, tenant)."""
        path = config.template.absolute()
        source = self.templates.get(path)
        if source is None:
            try:
                source = self.templates[path] = TemplateSource(path, self.metrics)
            except TemplateError as exc:  # the file changed since the config was checked
                raise ConfigError([f"job {job}: template {path}: {exc}"]) from None
        sink = TemplateSink(
            config,
            source,
            self._output(config, job=job, tenant=tenant, kind="template"),
            job=job,
            tenant=tenant,
            provider_kind=provider_kind,
            announce=self.announce,
        )
        source.sinks.add(sink)
        return sink

    async def release(self, sinks: Iterable[TokenSink]) -> None:
        """The sinks of a (job, tenant) that stopped: out of their bundles and sources;
        a bundle member that takes the name it left shows in the file at once."""
        for bundle in self.leave(sinks):
            try:
                await bundle.commit()
            except SinkError as exc:  # the member's own next write retries it
                log.warning("cannot rewrite bundle", bundle=bundle.target, error=str(exc))

    def leave(self, sinks: Iterable[TokenSink]) -> list[Bundle]:
        """Like `release`, without writing: the bundles due a rewrite."""
        due = []
        for sink in sinks:
            if isinstance(sink, BundleMember):
                if sink.bundle.leave(sink.owner):
                    due.append(sink.bundle)
                if sink.bundle.empty and self.bundles.get(sink.target) is sink.bundle:
                    del self.bundles[sink.target]
            elif isinstance(sink, TemplateSink):
                sink.source.sinks.discard(sink)
                if not sink.source.sinks and self.templates.get(sink.source.path) is sink.source:
                    del self.templates[sink.source.path]
        return due

    def _output(self, config: OutputConfig, *, job: str, tenant: str | None, kind: str) -> Output:
        if config.path is not None:
            path = Path(config.output(job=job, tenant=tenant))
            file = AtomicFile(path, mode=config.mode, group=config.group, kind=kind)
            file.locks = self.locks
            return file
        if self.kube is None:
            raise ConfigError([f"job {job}: a {kind} kept in a Secret needs a Kubernetes client"])
        key = expand_key(config.key or "", job=job, tenant=tenant)
        secret = KubernetesSink(config.secret_sink(key), key, clients=self.kube)
        secret.may_write = self.may_write
        return secret


def file_of(sink: TokenSink) -> AtomicFile | None:
    """The file a sink writes, if it writes one (its directory is locked)."""
    if isinstance(sink, AtomicFile):
        return sink
    if isinstance(sink, BundleMember | TemplateSink) and isinstance(sink.output, AtomicFile):
        return sink.output
    return None
