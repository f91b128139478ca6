"""The pure timing rules of `refresher.policy`, as tables: when to refresh, how long
to back off after each kind of failure, how early a refresh may leave."""

from __future__ import annotations

import math
import random

import pytest

from refresher.config import BackoffConfig, RefreshConfig
from refresher.errors import (
    BadResponseError,
    ForbiddenError,
    RateLimitedError,
    ServerError,
    UnauthorizedError,
)
from refresher.policy import backoff_delay, early_slack, refresh_time, retry_delay
from refresher.token import Token

NOW = 1_800_000_000.0


def token(lifetime: float | None, *, obtained: float = NOW, recheck: float | None = None) -> Token:
    expires = None if lifetime is None else obtained + lifetime
    return Token("v" * 20, "Bearer", obtained_at=obtained, expires_at=expires, recheck_at=recheck)


def exact(**fields: object) -> RefreshConfig:
    return RefreshConfig.model_validate({"jitter": 0, **fields})


@pytest.mark.parametrize(
    ("lifetime", "fields", "after"),
    [
        # refresh_at of the lifetime, never later than expiry − min_remaining (5 min)
        (3600, {}, 2700),
        (86400, {}, 64800),
        (1800, {}, 1350),  # Debitura's 30 min
        # the margin is capped to the part of a short lifetime after refresh_at
        (60, {}, 45),
        (1800, {"refresh_at": 0.9}, 1620),
        (1800, {"min_remaining": 0}, 1350),
        (0, {}, 0),
    ],
)
def test_refresh_time_table(lifetime: float, fields: dict[str, object], after: float) -> None:
    assert refresh_time(token(lifetime), exact(**fields), random.Random(1)) == NOW + after


def test_refresh_time_with_jitter_stays_inside_its_band_and_before_the_cap() -> None:
    policy = RefreshConfig(jitter=0.1)
    rng = random.Random(7)
    hour = [refresh_time(token(3600), policy, rng) - NOW for _ in range(2000)]
    assert min(hour) >= 2430 and max(hour) <= 2970 and max(hour) - min(hour) > 400
    # Near the cap the jitter mirrors below it rather than piling onto it.
    capped = [
        refresh_time(token(1800), RefreshConfig(jitter=0.1, refresh_at=0.83), rng) - NOW
        for _ in range(2000)
    ]
    assert max(capped) <= 1500 and sum(c == 1500 for c in capped) < 20


@pytest.mark.parametrize(
    ("recheck", "expected"),
    [(None, math.inf), (NOW + 900, NOW + 900)],
)
def test_tokens_without_expiry(recheck: float | None, expected: float) -> None:
    assert refresh_time(token(None, recheck=recheck), exact(), random.Random(1)) == expected


@pytest.mark.parametrize(
    ("failures", "initial", "maximum", "cap"),
    [
        (1, 1, 300, 1),
        (2, 1, 300, 2),
        (5, 1, 300, 16),
        (9, 1, 300, 256),
        (10, 1, 300, 300),
        (10**6, 1, 300, 300),
        (3, 10, 15, 15),
    ],
)
def test_backoff_is_full_jitter_under_an_exponential_cap(
    failures: int, initial: float, maximum: float, cap: float
) -> None:
    backoff = BackoffConfig(initial=initial, max=maximum)
    delays = [backoff_delay(failures, backoff, random.Random(seed)) for seed in range(300)]
    assert min(delays) >= initial / 10 and max(delays) <= cap
    assert max(delays) > cap * 0.8  # full jitter reaches up to the cap


RETRY = RefreshConfig(backoff=BackoffConfig(initial=1, max=300), max_retry_after=3600)


@pytest.mark.parametrize(
    ("error", "held", "delay", "capped"),
    [
        (RateLimitedError("429", retry_after=42), 3600, 42, False),
        (RateLimitedError("429", retry_after=7200), 3600, 3600, True),  # capped at max_retry_after
        (UnauthorizedError("401", status=401), 3600, 300, False),  # backoff.max, never sooner
        (UnauthorizedError("401", status=401), 20, 300, False),  # even while the token runs out
        (ForbiddenError("403", status=403), 3600, 300, False),
    ],
)
def test_retry_delay_table(error: Exception, held: float, delay: float, capped: bool) -> None:
    got = retry_delay(
        error,
        failures=3,
        token=token(held, obtained=NOW - 10),
        now=NOW,
        policy=RETRY,
        rng=random.Random(1),
    )  # type: ignore[arg-type]
    assert got == (delay, capped)


@pytest.mark.parametrize(
    "error",
    [
        ServerError("503", status=503),
        BadResponseError("junk"),
        RateLimitedError("429", retry_after=0),
    ],
)
def test_transient_failures_back_off_and_land_before_the_token_expires(error: Exception) -> None:
    rng = random.Random(3)
    for _ in range(200):
        # 6 s left on the held token; a 10th failure's cap (300 s) would overshoot it.
        held = token(60, obtained=NOW - 54)
        delay, capped = retry_delay(error, failures=10, token=held, now=NOW, policy=RETRY, rng=rng)  # type: ignore[arg-type]
        assert not capped and 0.1 <= delay <= 300
        if not isinstance(error, RateLimitedError):
            assert NOW + delay < held.expires_at  # type: ignore[operator]


@pytest.mark.parametrize(
    ("held", "coalesce", "slack"),
    [
        (token(3600), 0.01, 36.0),
        (token(60), 0.01, 0.6),
        (token(60), 0.0, 0.0),  # coalescing off: exactly on time
        (token(None, recheck=NOW + 900), 0.01, 0.0),  # no lifetime to take a share of
        (token(60, obtained=NOW - 120), 0.01, 0.0),  # expired: a rescue, not a refresh
        (None, 0.01, 0.0),  # a first mint
    ],
)
def test_early_slack_table(held: Token | None, coalesce: float, slack: float) -> None:
    assert early_slack(held, NOW, exact(coalesce=coalesce)) == pytest.approx(slack)
