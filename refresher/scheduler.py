"""When to refresh, and what to do when a refresh fails.

One `Scheduler` holds every (job, tenant) as a `JobRuntime` and a single timer heap,
so 10,000 tenants cost one sleeping task, not 10,000. A refresh is: through the
credential's gate (`refresher.credentials`), within the request budgets
(`refresher.budgets`), mint, then publish (`refresher.publish`); its timing rules are
in `refresher.policy`. A failure never replaces or removes a still-valid token.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from refresher.budgets import Budgets, urgency
from refresher.clock import Clock, sleep_or_wake
from refresher.config import RefreshConfig
from refresher.credentials import Gates
from refresher.errors import (
    BadResponseError,
    ProviderError,
    RateLimitedError,
    UnauthorizedError,
)
from refresher.feedback import Feedback
from refresher.logging import Redactor
from refresher.metrics import JobSeries, JobSnapshot, Metrics
from refresher.policy import early_slack, refresh_time, retry_delay
from refresher.publish import Publisher, same_publication
from refresher.runtime import JobKey, JobRuntime
from refresher.status import snapshots, title
from refresher.supervision import Supervisor
from refresher.token import Token

log = structlog.get_logger("refresher.scheduler")


class Scheduler:
    """Runs every job's refresh on time, within the concurrency and rate budgets."""

    def __init__(
        self,
        policy: RefreshConfig,
        *,
        clock: Clock,
        metrics: Metrics,
        redactor: Redactor,
        rng: random.Random | None = None,
        is_active: Callable[[], bool] | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.metrics = metrics
        self.redactor = redactor
        self.rng = rng or random.Random()
        self.is_active = is_active or (lambda: True)
        self.jobs: dict[JobKey, JobRuntime] = {}
        self.budgets = Budgets(policy, clock)
        self.gates = Gates(self)
        self.publisher = Publisher(self)
        self.feedback = Feedback(self)
        self.supervisor = Supervisor(self)
        #: A bug at a job's boundary: logged, counted, retried (`Supervisor`).
        self.internal_error = self.supervisor.internal_error
        self._heap: list[tuple[float, int, JobKey, int]] = []
        #: (expires_at, seq, job, token value): when a token runs out unreplaced.
        self._expiries: list[tuple[float, int, JobKey, str]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self.task_group: TaskGroup | None = None
        self.first_round = anyio.Event()
        self._round_keys: list[JobKey] = []
        self._round_cursor = 0
        self.requests_in_flight = 0
        self.peak_requests_in_flight = 0

    # ------------------------------------------------------------------ job set

    def add(self, runtime: JobRuntime) -> None:
        """Register a job; it is refreshed at once unless `recover()` adopted a token."""
        tenant = {"tenant": runtime.tenant} if runtime.tenant else {}
        runtime.bound_log = log.bind(job=runtime.job, **tenant)
        self.jobs[runtime.key] = runtime
        if not self.first_round.is_set():
            self._round_keys.append(runtime.key)
        for secret in runtime.provider.secrets():
            self.redactor.add_secret(secret)
        self.reschedule(runtime, runtime.next_refresh_at)

    def remove(self, key: JobKey) -> JobRuntime | None:
        """Stop refreshing a job (its sinks are left as they are)."""
        runtime = self.jobs.pop(key, None)
        if runtime is not None:
            runtime.generation += 1
            self.gates.forget(key)
            self.redactor.forget(key)
        return runtime

    async def recover(self, runtime: JobRuntime) -> bool:
        """Adopt the token the job's sinks already hold (see `Publisher.recover`)."""
        return await self.publisher.recover(runtime)

    def reschedule(self, runtime: JobRuntime, moment: float | None) -> None:
        """Plan a job's next refresh at `moment` (now if None; +inf: not on the timer)."""
        moment = self.clock.now() if moment is None else moment
        runtime.generation += 1
        runtime.next_refresh_at = moment
        if math.isfinite(moment):
            heapq.heappush(self._heap, (moment, next(self._seq), runtime.key, runtime.generation))
            if self._heap[0][2] == runtime.key:
                self._wake.set()

    def reschedule_now(self, key: JobKey) -> None:
        """Make a job due immediately (tenant re-added)."""
        runtime = self.jobs.get(key)
        if runtime is not None:
            self.reschedule(runtime, None)

    def credential_changed(self, keys: Iterable[JobKey]) -> None:
        """A credential file changed: its jobs mint now, an invalid link gets another
        chance, and the credential's gate (if closed) opens for everyone."""
        for key in keys:
            runtime = self.jobs.get(key)
            if runtime is None:
                continue
            if runtime.state == "invalid_link":
                runtime.state = "pending"
                runtime.answered_rejection = None
            self.gates.open(runtime.provider.credential, reason="credential changed")
            self.reschedule(runtime, None)

    # ------------------------------------------------------------------ the timer

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Dispatch due jobs and expiries until cancelled."""
        async with anyio.create_task_group() as tg:
            self.task_group = tg
            task_status.started()
            self._check_first_round()
            while True:
                now = self.clock.now()
                if self.is_active():
                    for due in self._due(now):
                        tg.start_soon(self.refresh, due)
                while self._expiries and self._expiries[0][0] <= now:
                    _, _, key, value = heapq.heappop(self._expiries)
                    runtime = self.jobs.get(key)
                    if runtime is not None and runtime.token and runtime.token.value == value:
                        tg.start_soon(self._expired, runtime)
                await self._sleep()

    def _due(self, now: float) -> list[JobRuntime]:
        """Pop the jobs due now, and those planned a little later that may leave early
        with them (`early_slack`): one wake-up sends a batch, not one refresh each.
        Never early for a rate-limited provider: its limiter serves the earliest expiry
        first among those waiting, and none may jump ahead of one not yet due."""
        heap, due = self._heap, []
        while heap:
            moment, _, key, generation = heap[0]
            runtime = self.jobs.get(key)
            if runtime is None or runtime.generation != generation:
                heapq.heappop(heap)  # superseded by a later reschedule
                continue
            if moment > now and (
                runtime.failures
                or runtime.unwritten
                or runtime.parked_at is not None
                or runtime.provider.rate_limit is not None
                or moment - early_slack(runtime.token, now, self.policy) > now
            ):
                break
            heapq.heappop(heap)
            due.append(runtime)
        return due

    def track_expiry(self, runtime: JobRuntime, token: Token) -> None:
        """Remember when `token` runs out, to say so if it is not replaced by then."""
        if token.expires_at is not None and runtime.expiry_tracked != token.value:
            runtime.expiry_tracked = token.value
            heapq.heappush(
                self._expiries, (token.expires_at, next(self._seq), runtime.key, token.value)
            )

    async def _expired(self, runtime: JobRuntime) -> None:
        """A token ran out with no replacement: say so, and tell its sinks."""
        try:
            runtime.bound_log.error(
                "token expired without a replacement",
                fingerprint=runtime.token.fingerprint() if runtime.token else None,
                last_error=runtime.failure_reason,
                on_expiry=runtime.on_expiry,
            )
            await self.publisher.expired(runtime)
        except Exception as exc:
            self.internal_error("expiry", exc, runtime, retry=False)

    async def _sleep(self) -> None:
        self._wake = anyio.Event()
        deadline = min(
            self._heap[0][0] if self._heap else math.inf,
            self._expiries[0][0] if self._expiries else math.inf,
        )
        await sleep_or_wake(self.clock, self._wake, deadline)

    def wake(self) -> None:
        """Re-evaluate the timer heap now (e.g. leadership was acquired)."""
        self._wake.set()

    def _check_first_round(self) -> None:
        """Every job has settled once: it holds a token (minted or adopted) or failed.
        Settling is one-way, so a cursor walks the jobs once in all."""
        if self.first_round.is_set():
            return
        keys = self._round_keys
        while self._round_cursor < len(keys):
            runtime = self.jobs.get(keys[self._round_cursor])
            if runtime is not None and runtime.token is None and not runtime.failures:
                return
            self._round_cursor += 1
        self.first_round.set()

    # ------------------------------------------------------------------ one refresh

    async def refresh(self, runtime: JobRuntime, *, force: bool = False) -> None:
        """Refresh one job now (single-flight: joins a refresh already running).

        This is the job's boundary: whatever goes wrong inside is this job's
        failure, retried with backoff, never the daemon's end.
        """
        if runtime.refreshing is not None:
            await runtime.refreshing.wait()
            return
        runtime.refreshing = anyio.Event()
        try:
            await self._refresh(runtime, force=force)
        except Exception as exc:
            self.internal_error("refresh", exc, runtime)
        finally:
            runtime.refreshing.set()
            runtime.refreshing = None
            self._check_first_round()

    async def _refresh(self, runtime: JobRuntime, *, force: bool) -> None:
        current = runtime.token
        now = self.clock.now()
        if (
            not force
            and runtime.unwritten
            and current is not None
            and current.is_valid(now)
            and refresh_time(current, self.policy, self.rng) > now
        ):
            await self.publisher.publish(runtime, current, runtime.unwritten)
            return
        if runtime.state == "invalid_link" and not force:
            # No more mints until its config, tenant entry or credential changes, or
            # an operator forces one.
            self.reschedule(runtime, math.inf)
            return
        if not await self.gates.through(runtime, force=force):
            return
        gate = self.gates[runtime.provider.credential]
        testing = gate.last_success_at is None
        if testing:
            gate.first_try = anyio.Event()
        try:
            async with self.budgets.slot(runtime.provider, urgency(current)):
                if gate.closed and not force and gate.probe != runtime.key:
                    self.gates.park(runtime, gate)  # the credential failed while we waited
                    return
                await self._mint(runtime)
        finally:
            if testing and gate.first_try is not None:
                gate.first_try.set()
                gate.first_try = None

    def series(self, runtime: JobRuntime) -> JobSeries:
        """The job's metric children, resolved once."""
        series = runtime.series
        if series is None:
            series = runtime.series = self.metrics.series(
                runtime.job, runtime.provider_kind, runtime.tenant
            )
        return series

    async def _mint(self, runtime: JobRuntime) -> None:
        series = self.series(runtime)
        started = self.clock.now()
        self.requests_in_flight += 1
        self.peak_requests_in_flight = max(self.peak_requests_in_flight, self.requests_in_flight)
        try:
            token = await runtime.provider.fetch(runtime.tenant)
            if not token.is_valid(self.clock.now()):
                raise BadResponseError("provider returned a token that has already expired")
        except ProviderError as error:
            series.refresh_duration.observe(max(self.clock.now() - started, 0))
            self._failed(runtime, error)
            return
        finally:
            self.requests_in_flight -= 1
        series.refresh_duration.observe(max(self.clock.now() - started, 0))
        self.redactor.add_token(token.value, runtime.key)
        if token.missing_scopes:
            runtime.bound_log.warning(
                "grant lacks requested scopes",
                missing=list(token.missing_scopes),
                granted=token.scope,
            )
        if token.warning:
            runtime.bound_log.warning("token obtained with a warning", warning=token.warning)
        current, runtime.token = runtime.token, token
        if runtime.state == "invalid_link":
            runtime.state = "pending"
            runtime.answered_rejection = None
        self.gates[runtime.provider.credential].minted(runtime.key, self.clock.now())
        runtime.parked_at = None
        self.gates.open(runtime.provider.credential, reason="a token was minted")
        if current is not None and not runtime.unwritten and same_publication(current, token):
            # A re-check confirmed what the sinks hold: nothing to write or announce.
            await self.publisher.publish(runtime, token, [], changed=False)
            return
        await self.publisher.publish(runtime, token, list(runtime.sinks))

    def _failed(self, runtime: JobRuntime, error: ProviderError) -> None:
        now = self.clock.now()
        labels = self.series(runtime).labels
        runtime.failures += 1
        runtime.failure_reason = error.reason
        runtime.failure_message = str(error)
        runtime.failure_status = error.status
        problem_title = error.problem.title if error.problem else None
        runtime.failure_title = title(self.redactor.scrub, problem_title or error.summary)
        self.metrics.refresh_total.labels(*labels, "failure").inc()
        self.metrics.refresh_failures.labels(*labels, error.reason).inc()
        delay, capped = retry_delay(
            error,
            failures=runtime.failures,
            token=runtime.token,
            now=now,
            policy=self.policy,
            rng=self.rng,
        )
        if isinstance(error, RateLimitedError):
            self.metrics.rate_limited.labels(*labels).inc()
            if error.retry_after is not None:
                self.metrics.retry_after.labels(*labels).observe(error.retry_after)
            self.budgets.throttled(runtime.provider, now + delay)
        held = runtime.token
        if isinstance(error, UnauthorizedError) and held and held.expires_at is None:
            # The partner refuses the very credential the sinks publish: with no
            # expiry to run out, it stops being valid now.
            runtime.token = dataclasses.replace(held, expires_at=now, recheck_at=None)
        gate = self.gates[runtime.provider.credential]
        # A 429, or a 401 that is not one tenant's own, is the whole credential's.
        shared = isinstance(error, RateLimitedError) or (
            isinstance(error, UnauthorizedError)
            and not (
                runtime.tenant is not None
                and gate.own_401(runtime.key, now, self.policy.backoff.max)
            )
        )
        runtime.backoff = delay
        loud = error.reason in ("unauthorized", "forbidden", "config", "scope_missing")
        (runtime.bound_log.error if loud else runtime.bound_log.warning)(
            "refresh failed",
            reason=error.reason,
            error=str(error),
            status=error.status,
            problem_title=problem_title,
            problem_detail=error.problem.detail if error.problem else None,
            retry_in=round(delay, 3),
            retry_after_capped=capped or None,
            consecutive_failures=runtime.failures,
            token_still_valid=bool(runtime.token and runtime.token.is_valid(now)),
            credential_paused=shared or None,
        )
        if shared:
            self.gates.close(runtime, error.reason, delay)
        else:
            self.reschedule(runtime, now + delay)

    # ------------------------------------------------------------------ views

    def snapshots(self) -> Iterable[JobSnapshot]:
        return snapshots(self.jobs.values(), self.clock.now())

    def statuses(self) -> list[dict[str, Any]]:
        now = self.clock.now()
        return [r.status(now) for r in list(self.jobs.values())]

    def ready(self) -> bool:
        """Every job holds a valid token that its sinks have."""
        now = self.clock.now()
        return bool(self.jobs) and all(r.valid(now) for r in self.jobs.values())
