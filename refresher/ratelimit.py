"""Client-side request budgets, one per (provider endpoint, client identity).

Partners count requests in a sliding window ("60 per minute per client_id"), so a
token bucket that allows a full burst and then refills can exceed the limit inside
one window. `SlidingWindowLimiter` grants a request only if fewer than `limit`
grants happened in the last `period` (+ a small safety margin for request transit),
which is exactly the partner's rule. A 429 pauses the whole key until its
``Retry-After`` has passed, so every job sharing the client id backs off together.

When more jobs wait than the budget lets through, the one whose token runs out
first goes first: waiters are served by `priority` (the current token's expiry;
``-inf`` for a job with no token), then in arrival order.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import anyio

from refresher.clock import Clock


@dataclass(eq=False)
class Grant:
    """One request counted in the window, stamped with when it was (re)issued."""

    at: float


@dataclass(order=True)
class _Waiter:
    """Ordered by (priority, arrival)."""

    priority: float
    seq: int
    wake: anyio.Event = field(default_factory=anyio.Event, compare=False)
    grant: Grant | None = field(default=None, compare=False)


class SlidingWindowLimiter:
    """At most `limit` grants in any window of `period` seconds; earliest priority
    first among waiters, FIFO among equals."""

    def __init__(self, limit: int, period: float, clock: Clock, *, margin: float = 0.25) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.period = period
        self.margin = margin
        self.clock = clock
        self._grants: deque[Grant] = deque()
        self._blocked_until = 0.0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    def _expire(self, now: float) -> None:
        horizon = now - self.period - self.margin
        while self._grants and self._grants[0].at <= horizon:
            self._grants.popleft()

    def available_at(self) -> float:
        """The earliest moment a new request could be granted."""
        now = self.clock.now()
        self._expire(now)
        moment = max(now, self._blocked_until)
        if len(self._grants) >= self.limit:
            moment = max(moment, self._grants[-self.limit].at + self.period + self.margin)
        return moment

    async def acquire(self, priority: float = -math.inf) -> Grant:
        """Take one grant, waiting until the window allows it and no waiter with a
        lower `priority` value (an earlier expiry) is ahead."""
        waiter = _Waiter(priority, next(self._seq))
        heapq.heappush(self._waiters, waiter)
        try:
            while waiter.grant is None:
                if self._waiters[0] is not waiter:
                    waiter.wake = anyio.Event()
                    await waiter.wake.wait()
                    continue
                moment = self.available_at()
                if moment > self.clock.now():
                    # Only the head sleeps on the clock; a more urgent waiter that
                    # arrives meanwhile becomes the head and sleeps to the same moment.
                    await self.clock.sleep_until(moment)
                    continue
                self._hand_out()
            return waiter.grant
        finally:
            if waiter.grant is None:  # cancelled while waiting
                self._waiters = [w for w in self._waiters if w is not waiter]
                heapq.heapify(self._waiters)
                if self._waiters:
                    self._waiters[0].wake.set()

    def _hand_out(self) -> None:
        """Grant waiters in priority order while the window has room, in one step
        (not one event-loop pass per waiter), and wake the next head, if any."""
        now = self.clock.now()
        while self._waiters and self.available_at() <= now:
            waiter = heapq.heappop(self._waiters)
            waiter.grant = Grant(now)
            self._grants.append(waiter.grant)
            waiter.wake.set()
        if self._waiters:
            self._waiters[0].wake.set()

    def restamp(self, grant: Grant) -> bool:
        """Count `grant` from now (the request is about to be sent after waiting for
        a concurrency slot). False if it already left the window: take a new one."""
        now = self.clock.now()
        if grant.at == now:  # no wait in between: the usual case
            return True
        self._expire(now)
        for index, held in enumerate(self._grants):
            if held is grant:
                del self._grants[index]
                grant.at = now
                self._grants.append(grant)
                return True
        return False

    def block_until(self, moment: float) -> None:
        """The provider said 429: grant nothing before `moment`."""
        self._blocked_until = max(self._blocked_until, moment)


class WindowBudget:
    """At most `limit` events per `period` seconds per key, answered at once.

    Unlike `SlidingWindowLimiter` nobody waits here: `take` either counts the event
    or says how long until one would be allowed (consumer-forced refreshes are
    refused with ``Retry-After`` rather than queued). Keys with no event in the last
    `period` are forgotten, so memory follows the active keys only.
    """

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = period
        self._events: dict[str, deque[float]] = {}

    def wait(self, key: str, now: float) -> float:
        """Seconds until an event for `key` would be allowed (0 when it is now)."""
        events = self._events.get(key)
        if events is None:
            return 0.0
        while events and events[0] <= now - self.period:
            events.popleft()
        if not events:
            del self._events[key]
            return 0.0
        if len(events) < self.limit:
            return 0.0
        return events[0] + self.period - now

    def take(self, key: str, now: float) -> None:
        """Count one event for `key` (call after `wait` returned 0)."""
        self._events.setdefault(key, deque()).append(now)
