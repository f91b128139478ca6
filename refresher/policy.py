"""The pure timing rules: when to refresh a token, how long to back off.

Nothing here does I/O or keeps state; every function is a rule from the refresh
policy, tested by tables in ``tests/test_policy.py``.
"""

from __future__ import annotations

import math
import random

from refresher.config import BackoffConfig, RefreshConfig
from refresher.errors import (
    ForbiddenError,
    ProviderError,
    RateLimitedError,
    SecretUnusableError,
    UnauthorizedError,
)
from refresher.token import Token

#: ``initial * 2**n`` stops growing here: 2**62 seconds is far past any ``max``, and a
#: float cannot hold ``2**1024``.
MAX_BACKOFF_EXPONENT = 62


def refresh_time(token: Token, policy: RefreshConfig, rng: random.Random) -> float:
    """When to refresh `token`.

    At ``obtained_at + refresh_at x lifetime``, never later than
    ``expires_at - min_remaining`` (the margin capped to the part of a short lifetime
    after ``refresh_at``), spread by ± ``jitter``. A token without expiry is checked
    again at its `recheck_at` (spread by ± ``jitter`` too), or never (+inf).
    """
    if token.expires_at is None:
        if token.recheck_at is None:
            return math.inf
        interval = max(token.recheck_at - token.obtained_at, 0.0)
        if policy.jitter:
            interval *= 1 + rng.uniform(-policy.jitter, policy.jitter)
        return token.obtained_at + interval
    lifetime = max(token.lifetime or 0.0, 0.0)
    margin = min(policy.min_remaining, lifetime * (1 - policy.refresh_at))
    latest = token.expires_at - margin
    planned = policy.refresh_at * lifetime
    if policy.jitter:
        planned *= 1 + rng.uniform(-policy.jitter, policy.jitter)
    moment = token.obtained_at + planned
    if moment > latest:
        # Mirror below the cap instead of clamping onto it: clamped jobs would all
        # align on `expires_at - margin` (whole seconds for a JWT ``exp``).
        moment = max(2 * latest - moment, token.obtained_at)
    return min(moment, latest)


def early_slack(token: Token | None, now: float, policy: RefreshConfig) -> float:
    """How long before its planned moment a refresh of `token` may leave: ``coalesce``
    of the lifetime for a valid token with an expiry, nothing otherwise (a retry, a
    wait a provider asked for, a first mint keep their exact moment)."""
    if token is None or token.expires_at is None or not token.is_valid(now):
        return 0.0
    return policy.coalesce * max(token.lifetime or 0.0, 0.0)


def backoff_delay(failures: int, backoff: BackoffConfig, rng: random.Random) -> float:
    """Full-jitter exponential backoff after `failures` consecutive failures."""
    exponent = min(max(failures - 1, 0), MAX_BACKOFF_EXPONENT)
    cap = min(backoff.max, backoff.initial * 2.0**exponent)
    return max(backoff.initial / 10, rng.uniform(0, cap))


def retry_delay(
    error: ProviderError,
    *,
    failures: int,
    token: Token | None,
    now: float,
    policy: RefreshConfig,
    rng: random.Random,
) -> tuple[float, bool]:
    """How long to wait after `error` (the `failures`-th in a row), and whether a
    ``Retry-After`` was capped at ``max_retry_after``.

    * 429: exactly ``Retry-After``; "0" or a date already past backs off instead
      (waiting "exactly" that long would be a tight loop).
    * 401, 403, an unusable secret: ``backoff.max``, never sooner, even while the
      current token runs out (no retry fixes these soon; do not retry 401 in a loop;
      a rotated secret file re-mints at once anyway).
    * anything else: full-jitter backoff, planned to land before the current token
      expires while there is time for one.
    """
    if isinstance(error, RateLimitedError):
        delay = error.retry_after or backoff_delay(failures, policy.backoff, rng)
        if delay > policy.max_retry_after:
            return policy.max_retry_after, True
        return delay, False
    if isinstance(error, (UnauthorizedError, ForbiddenError, SecretUnusableError)):
        return policy.backoff.max, False
    delay = backoff_delay(failures, policy.backoff, rng)
    if token is not None and token.expires_at is not None:
        remaining = token.expires_at - now
        if remaining > 1 and now + delay >= token.expires_at - 0.5:
            delay = max(min(delay, remaining / 2), 0.1)
    return delay, False
