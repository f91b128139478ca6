"""The pure timing rules: when to refresh a token, how long to back off.

Nothing here does I/O or keeps state; every function is a rule from the refresh
policy, tested by tables in ``tests/test_policy.py``.
"""

from __future__ import annotations

import math
import random

from refresher.config import BackoffConfig, RefreshConfig
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


def backoff_delay(failures: int, backoff: BackoffConfig, rng: random.Random) -> float:
    """Full-jitter exponential backoff after `failures` consecutive failures."""
    exponent = min(max(failures - 1, 0), MAX_BACKOFF_EXPONENT)
    cap = min(backoff.max, backoff.initial * 2.0**exponent)
    return max(backoff.initial / 10, rng.uniform(0, cap))
