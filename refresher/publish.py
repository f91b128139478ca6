"""Putting a minted token where consumers read it, and saying so — and, on start,
reading back what the sinks hold so a restart re-mints only what is due.

Every sink is written (each write is atomic on its own); if one fails, the token is
kept in memory and only the failed sinks are retried, with backoff, without
re-minting. Once every sink holds it: the metrics, one log line, the next refresh
planned, and the written hooks (notifications) — a failing hook is a notification
problem, never a failed refresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from refresher.errors import SinkError
from refresher.policy import backoff_delay, refresh_time
from refresher.runtime import JobRuntime
from refresher.sinks.base import ExpiryAware, TokenSink
from refresher.status import title
from refresher.token import Token, rfc3339

if TYPE_CHECKING:
    from refresher.scheduler import Scheduler

#: Called after every successful write; returns the work to run in the background,
#: or None when there is nothing to do (no task is spawned then: most refreshes).
WrittenHook = Callable[[JobRuntime, Token], Coroutine[Any, Any, None] | None]


def same_publication(old: Token, new: Token) -> bool:
    """`new` would publish exactly what `old` did (a managed credential re-checked)."""
    return (
        old.value == new.value
        and old.token_type == new.token_type
        and old.expires_at == new.expires_at
        and old.scope == new.scope
        and old.extra == new.extra
    )


class Publisher:
    """Writes tokens to a job's sinks for its `Scheduler`."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.written_hooks: list[WrittenHook] = []
        #: Sink writes under way (most wait for a worker thread, not the clock).
        self.writes_in_flight = 0

    async def recover(self, runtime: JobRuntime) -> bool:
        """Adopt the token the job's sinks already hold, if every sink agrees and it
        is not due yet. Returns True when adopted (no mint needed now); a sink that
        cannot be read back is a reason to mint, never to stop."""
        try:
            tokens = [await sink.read_back() for sink in runtime.sinks]
        except Exception as exc:
            self.scheduler.internal_error("read_back", exc, runtime, retry=False)
            return False
        first = tokens[0] if tokens else None
        if first is None or any(t is None or t.value != first.value for t in tokens):
            return False
        scheduler = self.scheduler
        now = scheduler.clock.now()
        due = refresh_time(first, scheduler.policy, scheduler.rng)
        if not first.is_valid(now) or due <= now:
            return False
        runtime.token = first
        runtime.state = "valid"
        runtime.next_refresh_at = due
        scheduler.redactor.add_token(first.value, runtime.key)
        scheduler.track_expiry(runtime, first)
        return True

    async def publish(
        self, runtime: JobRuntime, token: Token, sinks: list[TokenSink], *, changed: bool = True
    ) -> None:
        """Write `token` to `sinks` (all of the job's, or the ones that failed last)."""
        scheduler = self.scheduler
        clock, metrics = scheduler.clock, scheduler.metrics
        series = scheduler.series(runtime)
        failed: list[TokenSink] = []
        errors: list[SinkError] = []
        for sink in sinks:
            started = clock.now()
            self.writes_in_flight += 1
            try:
                await sink.write(token)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, SinkError)
                    else SinkError(f"unexpected {type(exc).__name__}: {exc}", sink=sink.kind)
                )
                failed.append(sink)
                errors.append(error)
                metrics.sink_failures.labels(*series.labels, sink.kind).inc()
            finally:
                self.writes_in_flight -= 1
                metrics.sink_write_duration_of(series, sink.kind).observe(
                    max(clock.now() - started, 0)
                )
        runtime.unwritten = failed
        if failed:
            self._failed(runtime, token, errors)
            return
        self._published(runtime, token, changed=changed)
        if changed:
            await self._announce(runtime, token)

    def _failed(self, runtime: JobRuntime, token: Token, errors: list[SinkError]) -> None:
        scheduler = self.scheduler
        labels = scheduler.series(runtime).labels
        scheduler.metrics.refresh_total.labels(*labels, "failure").inc()
        scheduler.metrics.refresh_failures.labels(*labels, "sink").inc()
        runtime.failures += 1
        runtime.failure_reason = "sink"
        runtime.failure_message = "; ".join(str(e) for e in errors)
        runtime.failure_status = None
        runtime.failure_title = title(scheduler.redactor.scrub, runtime.failure_message)
        delay = backoff_delay(runtime.failures, scheduler.policy.backoff, scheduler.rng)
        runtime.backoff = delay
        runtime.bound_log.error(
            "sink write failed",
            error=runtime.failure_message,
            fingerprint=token.fingerprint(),
            retry_in=round(delay, 3),
        )
        scheduler.reschedule(runtime, scheduler.clock.now() + delay)

    def _published(self, runtime: JobRuntime, token: Token, *, changed: bool) -> None:
        scheduler = self.scheduler
        scheduler.series(runtime).refreshed.inc()
        scheduler.track_expiry(runtime, token)
        runtime.state = "valid"
        runtime.failures = 0
        runtime.backoff = 0.0
        runtime.failure_reason = runtime.failure_message = runtime.failure_title = None
        runtime.failure_status = None
        runtime.last_success_at = scheduler.clock.now()
        due = refresh_time(token, scheduler.policy, scheduler.rng)
        scheduler.reschedule(runtime, due)
        runtime.bound_log.info(
            "token refreshed" if changed else "token re-checked: unchanged",
            fingerprint=token.fingerprint(),
            expires_at=rfc3339(token.expires_at),
            next_refresh_at=rfc3339(due) if math.isfinite(due) else None,
        )

    async def _announce(self, runtime: JobRuntime, token: Token) -> None:
        for hook in self.written_hooks:
            try:
                work = hook(runtime, token)
            except Exception as exc:
                self.scheduler.internal_error("notify", exc, runtime, retry=False)
                continue
            if work is not None:
                await self.spawn(work, runtime)

    async def spawn(
        self, work: Coroutine[Any, Any, None], runtime: JobRuntime | None = None
    ) -> None:
        """Run hook work in the background (inline for `refresher once`, which has no
        background); its failure is a notification problem, reported, never raised."""
        group = self.scheduler.task_group
        if group is not None:
            group.start_soon(self._run_hook, work, runtime)
        else:
            await self._run_hook(work, runtime)

    async def _run_hook(self, work: Coroutine[Any, Any, None], runtime: JobRuntime | None) -> None:
        try:
            await work
        except Exception as exc:
            self.scheduler.internal_error("notify", exc, runtime, retry=False)

    async def expired(self, runtime: JobRuntime) -> None:
        """A token ran out unreplaced: withdraw it if the job says ``on_expiry: remove``,
        else tell the sinks that show validity (a bundle's ``expired`` rule)."""
        for sink in runtime.sinks:
            try:
                if runtime.on_expiry == "remove":
                    await sink.remove()
                elif isinstance(sink, ExpiryAware):
                    await sink.expired()
            except SinkError as error:
                runtime.bound_log.error(
                    "cannot update a sink of an expired token", error=str(error)
                )
