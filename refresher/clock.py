"""Injectable clocks.

The scheduler, rate limiters and emulators ask a `Clock` for the time and sleep
through it, so tests drive time with `ManualClock.advance()` instead of sleeping.
`SystemClock` reads `time.time()`, which freezegun also controls.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from typing import Protocol

import anyio
import anyio.lowlevel


class Clock(Protocol):
    """Wall-clock time in Unix seconds, and a way to sleep until a moment of it."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.time()
        if delay > 0:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()


class ManualClock:
    """A clock that only moves when a test calls `advance()`.

    Sleepers are woken in deadline order. Safe to read from other threads (the
    emulators run on their own event loop); `advance()` must be awaited from the
    event loop whose tasks are sleeping.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        with self._lock:
            return self._now

    async def sleep_until(self, deadline: float) -> None:
        with self._lock:
            if deadline <= self._now:
                ready = True
            else:
                ready = False
                event = anyio.Event()
                heapq.heappush(self._sleepers, (deadline, next(self._seq), event))
        if ready:
            await anyio.lowlevel.checkpoint()
            return
        await event.wait()

    def next_deadline(self) -> float | None:
        """The earliest moment a sleeper waits for, if any."""
        with self._lock:
            return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has come."""
        await self.set(self.now() + seconds)

    async def set(self, moment: float) -> None:
        """Jump to `moment`, waking sleepers in deadline order."""
        with self._lock:
            self._now = max(self._now, moment)
            due = []
            while self._sleepers and self._sleepers[0][0] <= self._now:
                due.append(heapq.heappop(self._sleepers)[2])
        for event in due:
            event.set()
        # Let the woken tasks run before the caller looks at their effects.
        for _ in range(3):
            await anyio.lowlevel.checkpoint()


async def sleep_or_wake(clock: Clock, wake: anyio.Event, deadline: float) -> None:
    """Sleep until `deadline` on `clock`, or until `wake` is set, whichever is first."""
    if isinstance(clock, SystemClock):
        # One cancel scope, not a task group racing two tasks: the scheduler sleeps
        # like this once per refresh at steady state.
        with anyio.move_on_after(deadline - clock.now()):
            await wake.wait()
        return
    async with anyio.create_task_group() as race:

        async def timer() -> None:
            await clock.sleep_until(deadline)
            race.cancel_scope.cancel()

        async def woken() -> None:
            await wake.wait()
            race.cancel_scope.cancel()

        if math.isfinite(deadline):
            race.start_soon(timer)
        race.start_soon(woken)
