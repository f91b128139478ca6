"""Every budget a provider request spends, behind one ``async with
budgets.slot(provider, urgency)``: the provider's own concurrency limit, its rate
limit (shared by every job with the same credential; the most urgent waiter goes
first), and the daemon's global concurrency. Plus the budgets of consumer-forced
refreshes, which are refused rather than queued.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from refresher.clock import Clock
from refresher.config import RefreshConfig
from refresher.errors import TooSoonError
from refresher.providers.base import TokenProvider
from refresher.ratelimit import SlidingWindowLimiter, WindowBudget
from refresher.runtime import JobRuntime
from refresher.token import Token


def urgency(token: Token | None) -> float:
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


class Budgets:
    """The request budgets of one daemon."""

    def __init__(self, policy: RefreshConfig, clock: Clock) -> None:
        self.policy = policy
        self.clock = clock
        self._capacity = anyio.CapacityLimiter(policy.concurrency)
        self._limiters: dict[str, SlidingWindowLimiter] = {}
        self._provider_slots: dict[int, anyio.CapacityLimiter] = {}
        self._forced_per_credential = WindowBudget(policy.forced.per_credential_per_minute)
        self._forced_total = WindowBudget(policy.forced.per_minute)

    @asynccontextmanager
    async def slot(self, provider: TokenProvider, priority: float) -> AsyncIterator[None]:
        """Hold one request's share of every budget while the request runs.

        Rate budget is taken before a global concurrency slot, so a throttled
        provider never starves the others; a grant that waited for its slot is
        re-stamped (or renewed) so the window counts when the request really left.
        """
        slots = self._slots(provider)
        if slots is not None:
            await _acquire(slots)
        try:
            limiter = self.limiter(provider)
            grant = await limiter.acquire(priority) if limiter is not None else None
            await _acquire(self._capacity)
            try:
                if limiter is not None and grant is not None and not limiter.restamp(grant):
                    await limiter.acquire(priority)
                yield
            finally:
                self._capacity.release()
        finally:
            if slots is not None:
                slots.release()

    def limiter(self, provider: TokenProvider) -> SlidingWindowLimiter | None:
        budget = provider.rate_limit
        if budget is None:
            return None
        limiter = self._limiters.get(budget.key)
        if limiter is None:
            limiter = SlidingWindowLimiter(budget.requests, budget.period, self.clock)
            self._limiters[budget.key] = limiter
        return limiter

    def throttled(self, provider: TokenProvider, until: float) -> None:
        """The provider said 429: its rate budget grants nothing before `until`."""
        limiter = self.limiter(provider)
        if limiter is not None:
            limiter.block_until(until)

    def _slots(self, provider: TokenProvider) -> anyio.CapacityLimiter | None:
        if provider.max_concurrency is None:
            return None
        slots = self._provider_slots.get(id(provider))
        if slots is None:
            slots = self._provider_slots[id(provider)] = anyio.CapacityLimiter(
                provider.max_concurrency
            )
        return slots

    def spend_forced(self, runtime: JobRuntime, *, per_job: bool) -> None:
        """Count a forced refresh against its budgets — the job's minimum interval
        (unless not `per_job`), its credential's and the daemon's — or raise
        `TooSoonError` naming the budget that is spent."""
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
