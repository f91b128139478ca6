"""Template sink: one token rendered into a user's template (`refresher.templating`),
kept in a file or a Secret key like any output.

The template file is parsed when the sink is built and watched: a change is parsed
again and every output rendered from it is re-rendered and rewritten (then its
job's notifiers fire). A template that no longer parses, or a render that fails
(a metadata key the token lacks, a value that cannot be inserted), keeps the last
good output: the error is logged and counted (``refresher_template_errors_total``).
A failed render of a *new* token is a sink failure, retried like any other.

Restart: the output is read back by matching it against the template, so a job
whose template shows ``${expires_at}`` (or a JWT's ``exp``) is not re-minted.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from refresher.config import TemplateSinkConfig, load_template
from refresher.errors import SinkError, TemplateError
from refresher.metrics import Metrics
from refresher.sinks.base import Announce, Output, Rewrite
from refresher.templating import Template, token_values
from refresher.token import Token, rfc3339

log = structlog.get_logger("refresher.sinks.template")


class TemplateSource:
    """One template file, parsed, and the sinks that render it."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
        self.path = path
        self.template: Template = load_template(path)
        self.sinks: set[TemplateSink] = set()
        self.errors = metrics.template_errors.labels(str(path))

    async def changed(self, path: Path | None = None) -> None:
        """The file changed: parse it again and re-render every output, or keep them."""
        try:
            template = load_template(self.path)
        except TemplateError as exc:
            self.errors.inc()
            log.error(
                "template change refused: keeping the last good output",
                template=str(self.path),
                error=str(exc),
            )
            return
        if template == self.template:
            return
        self.template = template
        log.info("template changed: re-rendering", template=str(self.path), outputs=len(self.sinks))
        for sink in list(self.sinks):
            await sink.rerender()


class TemplateSink:
    """Renders one (job, tenant)'s token into `source`'s template, into `output`."""

    kind = "template"

    def __init__(
        self,
        config: TemplateSinkConfig,
        source: TemplateSource,
        output: Output,
        *,
        job: str,
        tenant: str | None,
        provider_kind: str,
        announce: Announce,
    ) -> None:
        self.config = config
        self.source = source
        self.output = output
        self.target = output.target
        self.job = job
        self.tenant = tenant
        self.provider_kind = provider_kind
        self.announce = announce
        #: The token the output holds (read back or written), for re-renders.
        self.token: Token | None = None

    async def write(self, token: Token) -> None:
        try:
            content = self._render(token)
        except TemplateError as exc:
            self.source.errors.inc()
            raise SinkError(f"cannot render {self.source.path}: {exc}", sink=self.kind) from None
        await self.output.put(content)
        self.token = token

    async def read_back(self) -> Token | None:
        content = await self.output.get()
        try:
            text = content.decode() if content is not None else None
        except UnicodeDecodeError:
            text = None
        known = {
            "job": self.job,
            "tenant": self.tenant or "",
            "username": self.config.username or "",
        }
        self.token = self.source.template.read_token(text, known) if text is not None else None
        return self.token

    async def remove(self) -> None:
        await self.output.remove()
        self.token = None

    async def rerender(self) -> None:
        """Render the current token with the (changed) template; on failure the output
        keeps its last good content."""
        token = self.token
        if token is None:
            return
        try:
            await self.output.put(self._render(token))
        except (TemplateError, SinkError) as exc:
            self.source.errors.inc()
            log.error(
                "template re-render failed: keeping the last good output",
                template=str(self.source.path),
                target=self.target,
                job=self.job,
                tenant=self.tenant,
                error=str(exc),
            )
            return
        await self.announce(
            Rewrite(
                target=self.target,
                jobs=((self.job, self.provider_kind),),
                fingerprint=token.fingerprint(),
                expires_at=rfc3339(token.expires_at),
            )
        )

    def _render(self, token: Token) -> bytes:
        values = token_values(
            token, job=self.job, tenant=self.tenant, username=self.config.username
        )
        return self.source.template.render(values).encode()
