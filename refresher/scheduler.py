"""When to refresh, and what to do when a refresh fails.

One `Scheduler` holds every (job, tenant) as a `JobRuntime` and a single timer heap,
so 10,000 tenants cost one sleeping task, not 10,000. Rules (DESIGN.md §4):

* refresh at ``obtained_at + refresh_at × lifetime``, never later than
  ``expires_at − min_remaining`` (capped to the part of a short lifetime after
  ``refresh_at``), spread by ± ``jitter``;
* transport errors, timeouts, 5xx and malformed bodies: exponential backoff with
  full jitter (``initial`` … ``max``), planned to land before expiry while possible;
* 429: wait exactly ``Retry-After`` (capped at ``max_retry_after``), never sooner,
  and pause every job sharing the same client budget;
* 401/403: a credential or capability problem: no tight loop, backoff starts at max;
* a failure never replaces or removes a still-valid token; a minted token whose sink
  write failed is kept in memory and the write is retried without re-minting.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from refresher.clock import Clock, SystemClock
from refresher.config import RefreshConfig
from refresher.credentials import Gate, Gates
from refresher.errors import (
    BadResponseError,
    NotActiveError,
    ProviderError,
    RateLimitedError,
    SinkError,
    TooSoonError,
    UnauthorizedError,
)
from refresher.logging import Redactor
from refresher.metrics import JobSeries, JobSnapshot, Metrics
from refresher.policy import backoff_delay, refresh_time, retry_delay
from refresher.providers.base import TokenProvider
from refresher.ratelimit import SlidingWindowLimiter, WindowBudget
from refresher.sinks.base import TokenSink
from refresher.token import Token, rfc3339

log = structlog.get_logger("refresher.scheduler")

JobKey = tuple[str, str | None]
#: Called after every successful write; returns the work to run in the background,
#: or None when there is nothing to do (no task is spawned then: most refreshes).
WrittenHook = Callable[["JobRuntime", Token], Coroutine[Any, Any, None] | None]
#: The longest provider-given title `/v1/tokens` shows.
MAX_TITLE_LENGTH = 120


@dataclass(frozen=True)
class Rejection:
    """The outcome of a consumer's rejection report (`Scheduler.report_rejected`)."""

    runtime: JobRuntime
    #: A token other than the rejected one is current now (minted for this report).
    minted: bool
    invalid_link: bool


@dataclass(eq=False)
class JobRuntime:
    """The live state of one (job, tenant)."""

    job: str
    tenant: str | None
    provider: TokenProvider
    sinks: Sequence[TokenSink]
    on_expiry: str = "keep"
    token: Token | None = None
    state: str = "pending"
    next_refresh_at: float | None = None
    failures: int = 0
    last_error: str | None = None
    #: The full message, for logs and tests; never shown by the API.
    last_error_message: str | None = None
    last_error_status: int | None = None
    #: A short, redacted title the API may show (the provider's problem title, or ours).
    last_error_title: str | None = None
    last_success_at: float | None = None
    backoff: float = 0.0
    unwritten: list[TokenSink] = field(default_factory=list)
    generation: int = 0
    inflight: anyio.Event | None = None
    last_forced_at: float | None = None
    #: Fingerprint of the token minted because a consumer reported its predecessor
    #: rejected: a rejection of *this* one means the link itself is invalid.
    answered_rejection: str | None = None
    #: The credential gate this job waits at (see `refresher.credentials`), if any.
    parked_at: str | None = None
    bound_log: Any = None
    series: JobSeries | None = field(default=None, repr=False)
    expiry_tracked: str | None = field(default=None, repr=False)

    @property
    def key(self) -> JobKey:
        return (self.job, self.tenant)

    @property
    def provider_kind(self) -> str:
        return self.provider.kind

    def valid(self, now: float) -> bool:
        return (
            self.token is not None
            and not self.unwritten
            and self.state != "invalid_link"
            and self.token.is_valid(now)
        )

    def status(self, now: float) -> dict[str, Any]:
        """What `/v1/tokens` shows: never the token value."""
        token = self.token
        return {
            "job": self.job,
            "tenant": self.tenant,
            "provider": self.provider_kind,
            "state": self.display_state(now),
            "valid": self.valid(now),
            "expires_at": rfc3339(token.expires_at) if token else None,
            "expires_in": round(token.expires_at - now, 1)
            if token and token.expires_at is not None
            else None,
            "fingerprint": token.fingerprint() if token else None,
            "next_refresh_at": rfc3339(self.next_refresh_at)
            if self.next_refresh_at is not None and math.isfinite(self.next_refresh_at)
            else None,
            "last_success_at": rfc3339(self.last_success_at),
            "last_error": self.last_error,
            "last_error_status": self.last_error_status,
            "last_error_title": self.last_error_title,
            "consecutive_failures": self.failures,
            "sinks": [s.target for s in self.sinks],
            "environment": getattr(self.provider, "environment", None),
            "scope_missing": list(token.missing_scopes) if token else [],
            "warning": token.warning if token else None,
        }

    def display_state(self, now: float) -> str:
        if self.state == "invalid_link":
            return "invalid_link"
        if self.token is not None and self.token.is_valid(now):
            if self.unwritten:
                return "sink_failing"
            if self.parked_at is not None and not self.failures:
                return "paused"
            return "valid" if self.failures == 0 else "retrying"
        if self.parked_at is not None and not self.failures:
            return "paused"
        if self.token is not None:
            return "expired"
        return "failing" if self.failures else "pending"


def _same_publication(old: Token, new: Token) -> bool:
    """`new` would publish exactly what `old` did (a managed credential re-checked)."""
    return (
        old.value == new.value
        and old.token_type == new.token_type
        and old.expires_at == new.expires_at
        and old.scope == new.scope
        and old.extra == new.extra
    )


def _urgency(token: Token | None) -> float:
    """Rate-limit priority: the current token's expiry; no token at all comes first."""
    if token is None or token.expires_at is None:
        return -math.inf if token is None else math.inf
    return token.expires_at


async def _acquire(slots: anyio.CapacityLimiter) -> None:
    """Take a slot, yielding to the event loop only when none is free (anyio's
    `acquire` always yields: one more loop pass per refresh)."""
    try:
        slots.acquire_nowait()
    except anyio.WouldBlock:
        await slots.acquire()


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
        self._forced_per_credential = WindowBudget(policy.forced.per_credential_per_minute)
        self._forced_total = WindowBudget(policy.forced.per_minute)
        self.gates = Gates()
        self.jobs: dict[JobKey, JobRuntime] = {}
        self.written_hooks: list[WrittenHook] = []
        self._heap: list[tuple[float, int, JobKey, int]] = []
        #: (expires_at, seq, job, token value): when a token runs out unreplaced.
        self._expiries: list[tuple[float, int, JobKey, str]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._capacity = anyio.CapacityLimiter(policy.concurrency)
        self._limiters: dict[str, SlidingWindowLimiter] = {}
        self._provider_capacity: dict[int, anyio.CapacityLimiter] = {}
        self._tg: TaskGroup | None = None
        self.first_round = anyio.Event()
        self._round_keys: list[JobKey] = []
        self._round_cursor = 0
        self.inflight = 0
        self.peak_inflight = 0

    # ------------------------------------------------------------------ job set

    def add(self, runtime: JobRuntime) -> None:
        """Register a job; it is refreshed at once unless `recover()` adopted a token."""
        runtime.bound_log = (
            log.bind(job=runtime.job, tenant=runtime.tenant)
            if runtime.tenant
            else log.bind(job=runtime.job)
        )
        self.jobs[runtime.key] = runtime
        if not self.first_round.is_set():
            self._round_keys.append(runtime.key)
        for secret in runtime.provider.secrets():
            self.redactor.add_secret(secret)
        if runtime.next_refresh_at is None:
            self._schedule(runtime, self.clock.now())
        else:
            self._schedule(runtime, runtime.next_refresh_at)

    def remove(self, key: JobKey) -> JobRuntime | None:
        """Stop refreshing a job (its sinks are left as they are)."""
        runtime = self.jobs.pop(key, None)
        if runtime is not None:
            runtime.generation += 1
            gate = self.gates.find(key)
            if gate is not None:
                gate.parked.pop(key, None)
                if gate.probe == key:
                    gate.probe = None
                    self._next_probe(gate)
        return runtime

    async def recover(self, runtime: JobRuntime) -> bool:
        """Adopt the token the job's sinks already hold, if every sink agrees and it
        is not due yet. Returns True when adopted (no mint needed now); a sink that
        cannot be read back is a reason to mint, never to stop."""
        try:
            return await self._recover(runtime)
        except Exception as exc:
            self.internal_error("read_back", exc, runtime, retry=False)
            return False

    async def _recover(self, runtime: JobRuntime) -> bool:
        tokens = [await sink.read_back() for sink in runtime.sinks]
        if not tokens or any(t is None for t in tokens):
            return False
        first = tokens[0]
        assert first is not None
        if any(t is None or t.value != first.value for t in tokens):
            return False
        now = self.clock.now()
        due = refresh_time(first, self.policy, self.rng)
        if not first.is_valid(now) or due <= now:
            return False
        runtime.token = first
        runtime.state = "valid"
        runtime.next_refresh_at = due
        self.redactor.add_token(first.value)
        self._track_expiry(runtime, first)
        return True

    # ------------------------------------------------------------------ loop

    def _schedule(self, runtime: JobRuntime, moment: float) -> None:
        runtime.generation += 1
        runtime.next_refresh_at = moment
        if math.isfinite(moment):
            heapq.heappush(self._heap, (moment, next(self._seq), runtime.key, runtime.generation))
            if self._heap[0][2] == runtime.key:
                self._wake.set()

    def reschedule(self, runtime: JobRuntime, moment: float | None) -> None:
        """Plan a job's next refresh at `moment` (now if None)."""
        self._schedule(runtime, self.clock.now() if moment is None else moment)

    def reschedule_now(self, key: JobKey) -> None:
        """Make a job due immediately (tenant re-added)."""
        runtime = self.jobs.get(key)
        if runtime is not None:
            self._schedule(runtime, self.clock.now())

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
            self._open(self.gates[runtime.provider.credential], reason="credential changed")
            self._schedule(runtime, self.clock.now())

    # ------------------------------------------------------------------ credential gates

    def _park(self, runtime: JobRuntime, gate: Gate) -> None:
        """Off the timer until `gate` opens; no request, no log line of its own."""
        if gate.probe != runtime.key:
            gate.parked[runtime.key] = None
        runtime.parked_at = gate.credential
        runtime.last_error = runtime.last_error or gate.reason
        runtime.backoff = max(gate.paused_until - self.clock.now(), 0.0)
        self._schedule(runtime, math.inf)
        runtime.next_refresh_at = gate.paused_until

    def _next_probe(self, gate: Gate) -> None:
        """Plan the gate's probe: the oldest parked job tries when the pause ends."""
        while gate.probe is None and gate.parked:
            key = next(iter(gate.parked))
            del gate.parked[key]
            runtime = self.jobs.get(key)
            if runtime is not None:
                gate.probe = key
                self._schedule(runtime, gate.paused_until)

    def _close(self, gate: Gate, runtime: JobRuntime, reason: str, pause: float) -> None:
        """`runtime`'s mint says the credential is rejected or throttled: pause every
        job sharing it. When the pause ends one of them probes — the longest waiting,
        so a single tenant the partner refuses cannot keep the others paused (once
        another probe succeeds, that tenant's next 401 is its own)."""
        now = self.clock.now()
        first = not gate.closed
        gate.reason = reason
        gate.paused_until = now + pause
        sharing = [r for r in self.jobs.values() if r.provider.credential == gate.credential]
        if first:
            for other in sharing:
                if other is not runtime and other.parked_at is None and other.inflight is None:
                    self._park(other, gate)
        gate.probe = None
        gate.parked.pop(runtime.key, None)
        self._park(runtime, gate)
        self._next_probe(gate)
        if first:
            runtime.bound_log.error(
                "credential rejected: pausing every token that uses it"
                if reason == "unauthorized"
                else "credential throttled: pausing every token that uses it",
                reason=reason,
                tokens=len(sharing),
                retry_in=round(pause, 3),
            )

    def _open(self, gate: Gate, *, reason: str) -> None:
        """The credential works again: every parked job resumes at once."""
        if not gate.closed and not gate.parked and gate.probe is None:
            return
        resumed = 0
        probe = gate.probe
        keys = [*gate.parked, *([probe] if probe is not None else [])]
        gate.reason, gate.paused_until, gate.probe = None, 0.0, None
        gate.parked.clear()
        now = self.clock.now()
        for key in keys:
            runtime = self.jobs.get(key)
            if runtime is None or (runtime.parked_at != gate.credential and key != probe):
                continue
            runtime.parked_at = None
            if runtime.inflight is None:
                self._schedule(runtime, now)
            resumed += 1
        if resumed:
            log.info("credential usable again: resuming its tokens", because=reason,
                     tokens=resumed)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Dispatch due jobs until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            self._check_first_round()
            while True:
                now = self.clock.now()
                if self.is_active():
                    while self._heap and self._heap[0][0] <= now:
                        _, _, key, generation = heapq.heappop(self._heap)
                        runtime = self.jobs.get(key)
                        if runtime is None or runtime.generation != generation:
                            continue
                        tg.start_soon(self.refresh, runtime)
                while self._expiries and self._expiries[0][0] <= now:
                    _, _, key, value = heapq.heappop(self._expiries)
                    runtime = self.jobs.get(key)
                    if (
                        runtime is not None
                        and runtime.token is not None
                        and runtime.token.value == value
                    ):
                        tg.start_soon(self._guarded, "expiry", self._expired, runtime)
                await self._sleep()

    def _track_expiry(self, runtime: JobRuntime, token: Token) -> None:
        if token.expires_at is not None and runtime.expiry_tracked != token.value:
            runtime.expiry_tracked = token.value
            heapq.heappush(
                self._expiries, (token.expires_at, next(self._seq), runtime.key, token.value)
            )

    async def _guarded(
        self,
        component: str,
        work: Callable[[JobRuntime], Coroutine[Any, Any, None]],
        runtime: JobRuntime,
    ) -> None:
        try:
            await work(runtime)
        except Exception as exc:
            self.internal_error(component, exc, runtime, retry=False)

    def internal_error(
        self,
        component: str,
        exc: BaseException,
        runtime: JobRuntime | None = None,
        *,
        retry: bool = True,
    ) -> None:
        """A bug surfaced at a job's boundary: log it once with its traceback, count
        it, and (with `retry`) plan the job's next attempt with backoff. Never raises:
        this is the last line between one job's bug and the whole daemon."""
        try:
            self.metrics.internal_errors.labels(component).inc()
            logger = runtime.bound_log if runtime is not None and runtime.bound_log else log
            logger.error("internal error", component=component, exc_info=exc)
        except Exception:
            # The logging pipeline failed too: say only what cannot leak.
            print(f"refresher: internal error in {component}", file=sys.stderr)
        if runtime is None or not retry:
            return
        try:
            series = self._series(runtime)
            self.metrics.refresh_total.labels(*series.labels, "failure").inc()
            self.metrics.refresh_failures.labels(*series.labels, "internal").inc()
            runtime.failures += 1
            runtime.last_error = "internal"
            runtime.last_error_message = f"internal error: {type(exc).__name__}"
            runtime.last_error_status = None
            runtime.last_error_title = "internal error (see the daemon's log)"
            runtime.backoff = backoff_delay(runtime.failures, self.policy.backoff, self.rng)
            if self.jobs.get(runtime.key) is runtime:
                self._schedule(runtime, self.clock.now() + runtime.backoff)
        except Exception:
            print(
                f"refresher: cannot plan a retry after an internal error in {component}",
                file=sys.stderr,
            )

    async def _expired(self, runtime: JobRuntime) -> None:
        """A token ran out with no replacement: say so, and withdraw it if configured."""
        runtime.bound_log.error(
            "token expired without a replacement",
            fingerprint=runtime.token.fingerprint() if runtime.token else None,
            last_error=runtime.last_error,
            on_expiry=runtime.on_expiry,
        )
        if runtime.on_expiry != "remove":
            return
        for sink in runtime.sinks:
            try:
                await sink.remove()
            except SinkError as error:
                runtime.bound_log.error("cannot remove expired token", error=str(error))

    async def _sleep(self) -> None:
        self._wake = anyio.Event()
        deadline = min(
            self._heap[0][0] if self._heap else math.inf,
            self._expiries[0][0] if self._expiries else math.inf,
        )
        if isinstance(self.clock, SystemClock):
            # One cancel scope instead of a task group racing two tasks per wake-up
            # (~5x cheaper; at steady state this runs once per refresh).
            with anyio.move_on_after(deadline - self.clock.now()):
                await self._wake.wait()
            return
        async with anyio.create_task_group() as race:

            async def timer() -> None:
                await self.clock.sleep_until(deadline)
                race.cancel_scope.cancel()

            async def woken() -> None:
                await self._wake.wait()
                race.cancel_scope.cancel()

            if math.isfinite(deadline):
                race.start_soon(timer)
            race.start_soon(woken)

    def wake(self) -> None:
        """Re-evaluate the timer heap now (e.g. leadership was acquired)."""
        self._wake.set()

    # ------------------------------------------------------------------ one refresh

    async def force(self, job: str, tenant: str | None = None) -> JobRuntime:
        """An operator asked for a refresh: single-flight, within three budgets — one
        per (job, tenant), one per credential, one for the daemon (`TooSoonError`).
        It also clears an ``invalid_link`` verdict: the operator says try again.
        `NotActiveError` when this scheduler does not refresh (a follower, stopping)."""
        runtime = self.jobs.get((job, tenant))
        if runtime is None:
            raise KeyError((job, tenant))
        if not self.is_active():
            raise NotActiveError()
        if runtime.inflight is not None:
            await runtime.inflight.wait()
            return runtime
        self._spend_forced_budget(runtime, per_job=True)
        if runtime.state == "invalid_link":
            runtime.state = "pending"
            runtime.answered_rejection = None
        await self.refresh(runtime, force=True)
        return runtime

    async def report_rejected(self, job: str, tenant: str | None, fingerprint: str) -> Rejection:
        """A consumer's API call was rejected (401) with the token `fingerprint`.

        * not the current token: it was replaced already — nothing to mint;
        * the current token: mint a fresh one (single-flight: every report of the
          same token joins one mint); the per-job interval does not apply, the
          credential and daemon budgets do (`TooSoonError`);
        * a token minted in answer to an earlier report: the link itself is invalid
          (the partner's "second 401"): no more mints for this job and tenant until
          its config, tenant entry or credential changes or an operator forces one.
        """
        runtime = self.jobs.get((job, tenant))
        if runtime is None:
            raise KeyError((job, tenant))
        if not self.is_active():
            raise NotActiveError()
        if runtime.state == "invalid_link":
            return Rejection(runtime, minted=False, invalid_link=True)
        current = runtime.token
        if current is None or current.fingerprint() != fingerprint:
            return Rejection(runtime, minted=False, invalid_link=False)
        if runtime.answered_rejection == fingerprint:
            self._invalid_link(runtime)
            return Rejection(runtime, minted=False, invalid_link=True)
        if runtime.inflight is None:
            self._spend_forced_budget(runtime, per_job=False)
        await self.refresh(runtime, force=True)
        fresh = runtime.token
        minted = fresh is not None and fresh.fingerprint() != fingerprint
        if minted and fresh is not None:
            runtime.answered_rejection = fresh.fingerprint()
        return Rejection(runtime, minted=minted, invalid_link=False)

    def _spend_forced_budget(self, runtime: JobRuntime, *, per_job: bool) -> None:
        now = self.clock.now()
        forced = self.policy.forced
        if per_job and runtime.last_forced_at is not None:
            wait = runtime.last_forced_at + forced.min_interval - now
            if wait > 0:
                raise TooSoonError(wait, scope="job")
        credential = runtime.provider.credential
        wait = self._forced_per_credential.wait(credential, now)
        if wait > 0:
            raise TooSoonError(wait, scope="credential")
        wait = self._forced_total.wait("", now)
        if wait > 0:
            raise TooSoonError(wait, scope="daemon")
        self._forced_per_credential.take(credential, now)
        self._forced_total.take("", now)
        runtime.last_forced_at = now

    def _invalid_link(self, runtime: JobRuntime) -> None:
        """The partner rejected a token minted in answer to a rejection: park the job."""
        labels = self._series(runtime).labels
        self.metrics.refresh_total.labels(*labels, "failure").inc()
        self.metrics.refresh_failures.labels(*labels, "invalid_link").inc()
        runtime.state = "invalid_link"
        runtime.failures += 1
        runtime.last_error = "invalid_link"
        runtime.last_error_message = runtime.last_error_title = (
            "a fresh token was rejected too: the link itself is invalid"
        )
        runtime.last_error_status = 401
        self._schedule(runtime, math.inf)
        runtime.bound_log.error(
            "link invalid: the consumer's API rejected a token minted in answer to its "
            "earlier rejection; no more mints until the config, tenant or credential "
            "changes or an operator forces a refresh",
            fingerprint=runtime.token.fingerprint() if runtime.token else None,
        )

    async def refresh(self, runtime: JobRuntime, *, force: bool = False) -> None:
        """Refresh one job now (single-flight: joins a refresh already running).

        This is the job's boundary: whatever goes wrong inside is this job's
        failure, retried with backoff, never the daemon's end.
        """
        if runtime.inflight is not None:
            await runtime.inflight.wait()
            return
        runtime.inflight = anyio.Event()
        try:
            await self._refresh(runtime, force=force)
        except Exception as exc:
            self.internal_error("refresh", exc, runtime)
        finally:
            runtime.inflight.set()
            runtime.inflight = None
            self._check_first_round()

    def _check_first_round(self) -> None:
        """Every job has settled once: it holds a token (minted or adopted) or failed.

        Settling is one-way, so a cursor walks the jobs once in all: checking every
        job after every refresh cost 10,000 x 10,000 looks at a 10k-tenant start.
        """
        if self.first_round.is_set():
            return
        keys = self._round_keys
        while self._round_cursor < len(keys):
            runtime = self.jobs.get(keys[self._round_cursor])
            if runtime is not None and runtime.token is None and not runtime.failures:
                return
            self._round_cursor += 1
        self.first_round.set()

    def _limiter(self, provider: TokenProvider) -> SlidingWindowLimiter | None:
        budget = provider.rate_limit
        if budget is None:
            return None
        limiter = self._limiters.get(budget.key)
        if limiter is None:
            limiter = SlidingWindowLimiter(budget.requests, budget.period, self.clock)
            self._limiters[budget.key] = limiter
        return limiter

    def _provider_slots(self, provider: TokenProvider) -> anyio.CapacityLimiter | None:
        if provider.max_concurrency is None:
            return None
        slots = self._provider_capacity.get(id(provider))
        if slots is None:
            slots = anyio.CapacityLimiter(provider.max_concurrency)
            self._provider_capacity[id(provider)] = slots
        return slots

    async def _refresh(self, runtime: JobRuntime, *, force: bool) -> None:
        now = self.clock.now()
        current = runtime.token
        if (
            not force
            and runtime.unwritten
            and current is not None
            and current.is_valid(now)
            and refresh_time(current, self.policy, self.rng) > now
        ):
            await self._write(runtime, current, runtime.unwritten)
            return
        if runtime.state == "invalid_link" and not force:
            # No more mints until its config, tenant entry or credential changes, or
            # an operator forces one.
            self._schedule(runtime, math.inf)
            return
        gate = self.gates[runtime.provider.credential]
        if not await self._through_gate(runtime, gate, force=force):
            return
        # Until a credential has worked once, one request at a time finds out whether
        # it does: a revoked key costs one 401, not one per tenant.
        testing = gate.last_success_at is None
        if testing:
            gate.first_try = anyio.Event()
        try:
            await self._within_budgets(runtime, gate, force=force)
        finally:
            if testing and gate.first_try is not None:
                gate.first_try.set()
                gate.first_try = None

    async def _through_gate(self, runtime: JobRuntime, gate: Gate, *, force: bool) -> bool:
        """Whether `runtime` may ask now; if not, it is parked or rescheduled."""
        while True:
            if gate.closed and not force:
                if gate.probe != runtime.key:
                    self._park(runtime, gate)
                    return False
                if gate.paused_until > self.clock.now():
                    self._schedule(runtime, gate.paused_until)
                    return False
            if gate.first_try is None:
                return True
            await gate.first_try.wait()

    async def _within_budgets(self, runtime: JobRuntime, gate: Gate, *, force: bool) -> None:
        current = runtime.token
        limiter = self._limiter(runtime.provider)
        slots = self._provider_slots(runtime.provider)
        if slots is not None:
            await _acquire(slots)
        try:
            # Wait for rate budget before taking a global concurrency slot, so a
            # throttled provider never starves the others; the token that runs
            # out first gets the next request.
            grant = await limiter.acquire(_urgency(current)) if limiter is not None else None
            await _acquire(self._capacity)
            try:
                if limiter is not None and grant is not None and not limiter.restamp(grant):
                    await limiter.acquire(_urgency(current))
                if gate.closed and not force and gate.probe != runtime.key:
                    self._park(runtime, gate)  # the credential failed while we waited
                    return
                await self._mint(runtime, limiter)
            finally:
                self._capacity.release()
        finally:
            if slots is not None:
                slots.release()

    def _series(self, runtime: JobRuntime) -> JobSeries:
        series = runtime.series
        if series is None:
            series = runtime.series = self.metrics.series(
                runtime.job, runtime.provider_kind, runtime.tenant
            )
        return series

    async def _mint(self, runtime: JobRuntime, limiter: SlidingWindowLimiter | None) -> None:
        series = self._series(runtime)
        started = self.clock.now()
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            token = await runtime.provider.fetch(runtime.tenant)
            if not token.is_valid(self.clock.now()):
                raise BadResponseError("provider returned a token that has already expired")
        except ProviderError as error:
            series.refresh_duration.observe(max(self.clock.now() - started, 0))
            self._failed(runtime, error, series.labels, limiter)
            return
        finally:
            self.inflight -= 1
        series.refresh_duration.observe(max(self.clock.now() - started, 0))
        self.redactor.add_token(token.value)
        if token.missing_scopes:
            runtime.bound_log.warning(
                "grant lacks requested scopes",
                missing=list(token.missing_scopes),
                granted=token.scope,
            )
        if token.warning:
            runtime.bound_log.warning("token obtained with a warning", warning=token.warning)
        current = runtime.token
        runtime.token = token
        if runtime.state == "invalid_link":
            runtime.state = "pending"
            runtime.answered_rejection = None
        gate = self.gates[runtime.provider.credential]
        gate.minted(runtime.key, self.clock.now())
        runtime.parked_at = None
        self._open(gate, reason="a token was minted")
        if current is not None and not runtime.unwritten and _same_publication(current, token):
            # A re-check confirmed what the sinks hold: nothing to write or announce.
            await self._write(runtime, token, [], changed=False)
            return
        await self._write(runtime, token, list(runtime.sinks))

    async def _write(
        self, runtime: JobRuntime, token: Token, sinks: list[TokenSink], *, changed: bool = True
    ) -> None:
        series = self._series(runtime)
        labels = series.labels
        failed: list[TokenSink] = []
        errors: list[SinkError] = []
        for sink in sinks:
            started = self.clock.now()
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
                self.metrics.sink_failures.labels(*labels, sink.kind).inc()
            finally:
                self.metrics.sink_write_duration_of(series, sink.kind).observe(
                    max(self.clock.now() - started, 0)
                )
        runtime.unwritten = failed
        if failed:
            self.metrics.refresh_total.labels(*labels, "failure").inc()
            self.metrics.refresh_failures.labels(*labels, "sink").inc()
            runtime.failures += 1
            runtime.last_error = "sink"
            runtime.last_error_message = "; ".join(str(e) for e in errors)
            runtime.last_error_status = None
            runtime.last_error_title = self._title(runtime.last_error_message)
            delay = backoff_delay(runtime.failures, self.policy.backoff, self.rng)
            runtime.backoff = delay
            runtime.bound_log.error(
                "sink write failed",
                error=runtime.last_error_message,
                fingerprint=token.fingerprint(),
                retry_in=round(delay, 3),
            )
            self._schedule(runtime, self.clock.now() + delay)
            return
        now = self.clock.now()
        series.refreshed.inc()
        self._track_expiry(runtime, token)
        runtime.state = "valid"
        runtime.failures = 0
        runtime.backoff = 0.0
        runtime.last_error = None
        runtime.last_error_message = None
        runtime.last_error_status = None
        runtime.last_error_title = None
        runtime.last_success_at = now
        due = refresh_time(token, self.policy, self.rng)
        self._schedule(runtime, due)
        runtime.bound_log.info(
            "token refreshed" if changed else "token re-checked: unchanged",
            fingerprint=token.fingerprint(),
            expires_at=rfc3339(token.expires_at),
            next_refresh_at=rfc3339(due) if math.isfinite(due) else None,
        )
        if not changed:
            return
        for hook in self.written_hooks:
            # The token is written: a failing hook is a notification problem, not
            # a failed refresh.
            try:
                work = hook(runtime, token)
            except Exception as exc:
                self.internal_error("notify", exc, runtime, retry=False)
                continue
            if work is None:
                continue
            if self._tg is not None:
                self._tg.start_soon(self._run_hook, work, runtime)
            else:
                await self._run_hook(work, runtime)

    async def _run_hook(self, work: Coroutine[Any, Any, None], runtime: JobRuntime) -> None:
        try:
            await work
        except Exception as exc:
            self.internal_error("notify", exc, runtime, retry=False)

    def _title(self, text: str | None) -> str | None:
        """`text` redacted and cut to `MAX_TITLE_LENGTH`: what the API may show."""
        if not text:
            return None
        title = self.redactor.scrub(" ".join(text.split()))
        return title if len(title) <= MAX_TITLE_LENGTH else title[: MAX_TITLE_LENGTH - 3] + "..."

    def _failed(
        self,
        runtime: JobRuntime,
        error: ProviderError,
        labels: tuple[str, ...],
        limiter: SlidingWindowLimiter | None,
    ) -> None:
        now = self.clock.now()
        runtime.failures += 1
        runtime.last_error = error.reason
        runtime.last_error_message = str(error)
        runtime.last_error_status = error.status
        runtime.last_error_title = self._title(
            error.problem.title if error.problem and error.problem.title else error.summary
        )
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
            if limiter is not None:
                limiter.block_until(now + delay)
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
        event = (
            runtime.bound_log.error
            if error.reason in ("unauthorized", "forbidden", "config", "scope_missing")
            else runtime.bound_log.warning
        )
        event(
            "refresh failed",
            reason=error.reason,
            error=str(error),
            status=error.status,
            problem_title=error.problem.title if error.problem else None,
            problem_detail=error.problem.detail if error.problem else None,
            retry_in=round(delay, 3),
            retry_after_capped=capped or None,
            consecutive_failures=runtime.failures,
            token_still_valid=bool(runtime.token and runtime.token.is_valid(now)),
            credential_paused=shared or None,
        )
        if shared:
            self._close(gate, runtime, error.reason, delay)
        else:
            self._schedule(runtime, now + delay)

    # ------------------------------------------------------------------ views

    def snapshots(self) -> Iterable[JobSnapshot]:
        now = self.clock.now()
        for runtime in list(self.jobs.values()):
            token = runtime.token
            yield JobSnapshot(
                job=runtime.job,
                provider=runtime.provider_kind,
                tenant=runtime.tenant,
                valid=runtime.valid(now)
                or (token is not None and token.is_valid(now) and runtime.state != "invalid_link"),
                expires_at=token.expires_at if token else None,
                last_success_at=runtime.last_success_at,
                backoff_seconds=runtime.backoff,
                environment=getattr(runtime.provider, "environment", None),
                scope_missing=len(token.missing_scopes) if token else 0,
            )

    def statuses(self) -> list[dict[str, Any]]:
        now = self.clock.now()
        return [r.status(now) for r in list(self.jobs.values())]

    def ready(self) -> bool:
        """Every job holds a valid token that its sinks have."""
        now = self.clock.now()
        return bool(self.jobs) and all(r.valid(now) for r in self.jobs.values())
