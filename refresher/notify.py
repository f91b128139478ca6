"""Notifiers: tell consumers a new token was written.

* ``signal`` — send a signal to a pid or a ``pid_file`` (re-read each time, retried
  briefly when missing because consumers restart);
* ``command`` — run argv (no shell) with ``REFRESHER_JOB``, ``REFRESHER_TENANT``,
  ``REFRESHER_SINK_PATH``, ``REFRESHER_EXPIRES_AT`` in the environment (never the
  token), killed at its timeout; a non-zero exit is logged and counted;
* ``webhook`` — POST ``{job, tenant, expires_at, fingerprint}`` JSON, optionally
  signed ``sha256=<hmac>`` with a key from a file, retried with backoff.

The scheduler runs notifiers in their own tasks: a slow or failing notifier never
blocks the refresh loop or other jobs.

A job's notifiers fire once per new token written to its file, Secret and template
sinks, and once per rewrite of a bundle its tokens changed, or of a template output
re-rendered because its template changed (`rewritten`): a bundle of 100 tenants
rewritten once is one notification, not 100, and a notifier configured the same way
in several jobs of one bundle fires once. For a bundle the event's ``fingerprint`` is
the content's, and ``expires_at`` the earliest expiry in it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal as _signal
import subprocess
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx2
import structlog

from refresher.config import (
    CommandNotifierConfig,
    NotifierConfig,
    SignalNotifierConfig,
    WebhookNotifierConfig,
)
from refresher.errors import NotifyError
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.runtime import JobRuntime
from refresher.sinks.base import Rewrite
from refresher.token import Token, rfc3339

log = structlog.get_logger("refresher.notify")


@dataclass(frozen=True)
class TokenWritten:
    """What a notifier may tell: never the token itself."""

    job: str
    tenant: str | None
    expires_at: str | None
    fingerprint: str
    sink_paths: tuple[str, ...]

    def payload(self) -> dict[str, object]:
        return {
            "job": self.job,
            "tenant": self.tenant,
            "expires_at": self.expires_at,
            "fingerprint": self.fingerprint,
        }


class Notifier(Protocol):
    """Delivers one `TokenWritten` event; raises `NotifyError` on failure."""

    kind: str

    async def notify(self, event: TokenWritten) -> None: ...


class SignalNotifier:
    kind = "signal"

    def __init__(
        self, config: SignalNotifierConfig, *, missing_retries: int = 10, retry_delay: float = 0.2
    ) -> None:
        self.config = config
        self.signum = getattr(_signal, f"SIG{config.signal}")
        self.missing_retries = missing_retries
        self.retry_delay = retry_delay

    async def _pid(self) -> int:
        if self.config.pid is not None:
            return self.config.pid
        assert self.config.pid_file is not None
        for attempt in range(self.missing_retries + 1):
            try:
                text = self.config.pid_file.read_text().strip()
                return int(text)
            except FileNotFoundError:
                if attempt == self.missing_retries:
                    raise NotifyError(f"pid_file {self.config.pid_file} does not exist") from None
                await anyio.sleep(self.retry_delay)
            except ValueError:
                raise NotifyError(f"pid_file {self.config.pid_file} does not hold a pid") from None
        raise NotifyError("unreachable")  # pragma: no cover

    async def notify(self, event: TokenWritten) -> None:
        pid = await self._pid()
        try:
            os.kill(pid, self.signum)
        except ProcessLookupError:
            raise NotifyError(f"no process {pid}") from None
        except PermissionError:
            raise NotifyError(f"not allowed to signal process {pid}") from None


class CommandNotifier:
    kind = "command"

    def __init__(self, config: CommandNotifierConfig) -> None:
        self.config = config

    def environment(self, event: TokenWritten) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHER_")}
        env.update(self.config.env)
        env.update(
            REFRESHER_JOB=event.job,
            REFRESHER_TENANT=event.tenant or "",
            REFRESHER_SINK_PATH=event.sink_paths[0] if event.sink_paths else "",
            REFRESHER_EXPIRES_AT=event.expires_at or "",
            REFRESHER_FINGERPRINT=event.fingerprint,
        )
        return env

    async def notify(self, event: TokenWritten) -> None:
        try:
            process = await anyio.open_process(
                self.config.argv,
                env=self.environment(event),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # Not captured: a consumer's script may echo what it read.
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise NotifyError(f"cannot run {self.config.argv[0]}: {exc.strerror or exc}") from None
        async with process:
            with anyio.move_on_after(self.config.timeout) as scope:
                await process.wait()
            if scope.cancelled_caught:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
                raise NotifyError(
                    f"{self.config.argv[0]} timed out after {self.config.timeout:g}s and was killed"
                )
            stderr = b""
            if process.stderr is not None:
                with anyio.move_on_after(1):
                    stderr = await process.stderr.receive(2048)
        if process.returncode != 0:
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:] if stderr else []
            raise NotifyError(
                f"{self.config.argv[0]} exited {process.returncode}"
                + (f": {tail[0][:200]}" if tail else "")
            )


class WebhookNotifier:
    kind = "webhook"

    def __init__(self, config: WebhookNotifierConfig, client: httpx2.AsyncClient) -> None:
        self.config = config
        self.client = client

    def signature(self, body: bytes) -> str | None:
        if self.config.secret_file is None:
            return None
        key = self.config.secret_file.read_bytes().strip()
        return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()

    async def notify(self, event: TokenWritten) -> None:
        body = json.dumps(event.payload(), sort_keys=True).encode()
        headers = {"Content-Type": "application/json"}
        signature = self.signature(body)
        if signature:
            headers[self.config.signature_header] = signature
        last = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                await anyio.sleep(self.config.retry_backoff * 2 ** (attempt - 1))
            try:
                response = await self.client.post(
                    self.config.url, content=body, headers=headers, timeout=self.config.timeout
                )
            except httpx2.HTTPError as exc:
                last = type(exc).__name__
                continue
            if response.status_code < 300:
                return
            last = f"HTTP {response.status_code}"
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                break
        raise NotifyError(f"webhook {self.config.url.split('?')[0]} failed: {last}")


def build_notifier(config: NotifierConfig, *, client: httpx2.AsyncClient) -> Notifier:
    if isinstance(config, SignalNotifierConfig):
        return SignalNotifier(config)
    if isinstance(config, CommandNotifierConfig):
        return CommandNotifier(config)
    return WebhookNotifier(config, client)


class Notifications:
    """Every job's notifiers, and the written hook that runs them (`Publisher`):
    concurrently, in the background, each failure logged and counted."""

    def __init__(self, metrics: Metrics, redactor: Redactor) -> None:
        self.metrics = metrics
        self.redactor = redactor
        self._notifiers: dict[str, list[tuple[NotifierConfig, Notifier]]] = {}
        self._client: httpx2.AsyncClient | None = None

    def configure(self, job: str, configs: Sequence[NotifierConfig]) -> None:
        """(Re)build `job`'s notifiers; none when `configs` is empty."""
        if not configs:
            self._notifiers.pop(job, None)
            return
        if self._client is None:
            self._client = httpx2.AsyncClient(follow_redirects=False)
        self._notifiers[job] = [(c, build_notifier(c, client=self._client)) for c in configs]

    def __call__(self, runtime: JobRuntime, token: Token) -> Coroutine[Any, Any, None] | None:
        """The job's notifications for a written token, if it has notifiers (and the
        token went somewhere but bundles, which announce their own rewrites)."""
        notifiers = self._notifiers.get(runtime.job)
        if not notifiers or all(sink.kind == "bundle" for sink in runtime.sinks):
            return None
        scrub = self.redactor.scrub
        event = TokenWritten(
            job=runtime.job,
            tenant=scrub(runtime.tenant) if runtime.tenant is not None else None,
            expires_at=rfc3339(token.expires_at),
            fingerprint=token.fingerprint(),
            sink_paths=tuple(scrub(s.target) for s in runtime.sinks),
        )
        labels = self.metrics.label_values(runtime.job, runtime.provider_kind, runtime.tenant)
        return self._deliver([(event, n, labels) for _, n in notifiers])

    def rewritten(self, rewrite: Rewrite) -> Coroutine[Any, Any, None] | None:
        """The notifications for a rewritten bundle or template output: each notifier
        of the jobs whose tokens changed in it, once (identical ones in two jobs too)."""
        chosen: dict[str, tuple[TokenWritten, Notifier, tuple[str, ...]]] = {}
        for job, provider_kind in rewrite.jobs:
            event = TokenWritten(
                job=job,
                tenant=None,
                expires_at=rewrite.expires_at,
                fingerprint=rewrite.fingerprint,
                sink_paths=(self.redactor.scrub(rewrite.target),),
            )
            labels = self.metrics.label_values(job, provider_kind, None)
            for config, notifier in self._notifiers.get(job, []):
                chosen.setdefault(config.model_dump_json(), (event, notifier, labels))
        return self._deliver(list(chosen.values())) if chosen else None

    async def _deliver(
        self, deliveries: list[tuple[TokenWritten, Notifier, tuple[str, ...]]]
    ) -> None:
        async def deliver(event: TokenWritten, notifier: Notifier, labels: tuple[str, ...]) -> None:
            try:
                await notifier.notify(event)
            except Exception as exc:  # a notifier must never take the daemon down
                self.metrics.notify_failures.labels(*labels, notifier.kind).inc()
                log.error(
                    "notification failed",
                    job=event.job,
                    tenant=event.tenant,
                    notifier=notifier.kind,
                    error=str(exc),
                )

        async with anyio.create_task_group() as tg:
            for event, notifier, labels in deliveries:
                tg.start_soon(deliver, event, notifier, labels)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
