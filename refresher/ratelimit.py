"""Client-side request budgets, one per (provider endpoint, client identity).

Partners count requests in a sliding window ("60 per minute per client_id"), so a
token bucket that allows a full burst and then refills can exceed the limit inside
one window. `SlidingWindowLimiter` grants a request only if fewer than `limit`
grants happened in the last `period` (+ a small safety margin for request transit),
which is exactly the partner's rule. A 429 pauses the whole key until its
``Retry-After`` has passed, so every job sharing the client id backs off together.
"""

from __future__ import annotations

from collections import deque

import anyio

from refresher.clock import Clock


class SlidingWindowLimiter:
    """At most `limit` grants in any window of `period` seconds; FIFO among waiters."""

    def __init__(self, limit: int, period: float, clock: Clock, *, margin: float = 0.25) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.period = period
        self.margin = margin
        self.clock = clock
        self._grants: deque[float] = deque()
        self._blocked_until = 0.0
        self._lock = anyio.Lock()

    def _expire(self, now: float) -> None:
        horizon = now - self.period - self.margin
        while self._grants and self._grants[0] <= horizon:
            self._grants.popleft()

    def available_at(self) -> float:
        """The earliest moment a new request could be granted."""
        now = self.clock.now()
        self._expire(now)
        moment = max(now, self._blocked_until)
        if len(self._grants) >= self.limit:
            moment = max(moment, self._grants[-self.limit] + self.period + self.margin)
        return moment

    async def wait(self) -> None:
        """Wait until a grant is likely available, without taking it."""
        moment = self.available_at()
        if moment > self.clock.now():
            await self.clock.sleep_until(moment)

    async def acquire(self) -> None:
        """Take one grant, waiting (in arrival order) until the window allows it."""
        async with self._lock:
            while True:
                moment = self.available_at()
                if moment <= self.clock.now():
                    self._grants.append(self.clock.now())
                    return
                await self.clock.sleep_until(moment)

    def block_until(self, moment: float) -> None:
        """The provider said 429: grant nothing before `moment`."""
        self._blocked_until = max(self._blocked_until, moment)
