"""The client-side request budget: a sliding window, most urgent waiter first."""

from __future__ import annotations

import math

import anyio
import pytest

from refresher.clock import ManualClock
from refresher.ratelimit import SlidingWindowLimiter

pytestmark = pytest.mark.anyio


async def settle() -> None:
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


async def test_never_more_than_limit_in_any_window(clock: ManualClock) -> None:
    limiter = SlidingWindowLimiter(3, 60.0, clock)
    start = clock.now()
    granted: list[float] = []

    async def take() -> None:
        await limiter.acquire()
        granted.append(clock.now() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(7):
            tg.start_soon(take)
        await settle()
        assert granted == [0, 0, 0], "the first `limit` go at once"
        while len(granted) < 7:
            deadline = clock.next_deadline()
            assert deadline is not None
            await clock.set(deadline)
            await settle()
    assert granted == [0, 0, 0, 60.25, 60.25, 60.25, 120.5]
    for i, moment in enumerate(granted):
        inside = [g for g in granted if moment - 60.25 < g <= moment]
        assert len(inside) <= 3, (i, granted)


async def test_most_urgent_waiter_goes_first_not_first_come(clock: ManualClock) -> None:
    limiter = SlidingWindowLimiter(1, 60.0, clock)
    await limiter.acquire()  # the budget is spent for a minute
    order: list[str] = []

    async def take(name: str, expires_at: float) -> None:
        await limiter.acquire(expires_at)
        order.append(name)

    async with anyio.create_task_group() as tg:
        # Arrival order is the opposite of urgency; a job with no token at all
        # (priority -inf) beats every job that still holds one.
        for name, expires_at in (("late", 900.0), ("soon", 100.0), ("mid", 500.0), ("none", -math.inf), ("soon-2nd", 100.0)):
            tg.start_soon(take, name, expires_at)
            await settle()
        while len(order) < 5:
            deadline = clock.next_deadline()
            assert deadline is not None
            await clock.set(deadline)
            await settle()
    assert order == ["none", "soon", "soon-2nd", "mid", "late"]


async def test_cancelled_waiter_does_not_hold_up_the_queue(clock: ManualClock) -> None:
    limiter = SlidingWindowLimiter(1, 10.0, clock)
    await limiter.acquire()
    got: list[str] = []

    async def take(name: str, priority: float) -> None:
        await limiter.acquire(priority)
        got.append(name)

    urgent_scope = anyio.CancelScope()

    async def urgent() -> None:
        with urgent_scope:
            await take("urgent", 1.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "patient", 50.0)
        await settle()
        tg.start_soon(urgent)
        await settle()
        urgent_scope.cancel()  # the head of the queue gives up
        await settle()
        await clock.advance(10.25)
        await settle()
    assert got == ["patient"]


async def test_429_blocks_every_waiter_until_retry_after(clock: ManualClock) -> None:
    limiter = SlidingWindowLimiter(100, 60.0, clock)
    limiter.block_until(clock.now() + 7)
    assert limiter.available_at() == clock.now() + 7
    done = anyio.Event()

    async def take() -> None:
        await limiter.acquire()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await clock.advance(6.9)
        await settle()
        assert not done.is_set()
        await clock.advance(0.1)
        await settle()
        assert done.is_set()


async def test_restamp_counts_a_late_send_from_when_it_is_sent(clock: ManualClock) -> None:
    limiter = SlidingWindowLimiter(1, 60.0, clock)
    grant = await limiter.acquire()
    await clock.advance(5)
    assert limiter.restamp(grant) is True
    # The window now runs from the send (5 s later), not from the grant.
    assert limiter.available_at() == pytest.approx(clock.now() + 60.25)
    await clock.advance(61)
    assert limiter.restamp(grant) is False, "a grant that left the window must be re-taken"
