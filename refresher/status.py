"""How a job looks from outside: the entries of ``/v1/tokens`` (and so of
``refresher status``), and the state names. Never a token value: its fingerprint,
expiry, and classified failure fields only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from refresher.metrics import JobSnapshot
from refresher.token import rfc3339

if TYPE_CHECKING:
    from refresher.runtime import JobRuntime


def job_status(runtime: JobRuntime, now: float) -> dict[str, Any]:
    """One ``/v1/tokens`` entry."""
    token = runtime.token
    next_at = runtime.next_refresh_at
    return {
        "job": runtime.job,
        "tenant": runtime.tenant,
        "provider": runtime.provider_kind,
        "state": display_state(runtime, now),
        "valid": runtime.valid(now),
        "expires_at": rfc3339(token.expires_at) if token else None,
        "expires_in": round(token.expires_at - now, 1)
        if token and token.expires_at is not None
        else None,
        "fingerprint": token.fingerprint() if token else None,
        "next_refresh_at": rfc3339(next_at)
        if next_at is not None and math.isfinite(next_at)
        else None,
        "last_success_at": rfc3339(runtime.last_success_at),
        "last_error": runtime.failure_reason,
        "last_error_status": runtime.failure_status,
        "last_error_title": runtime.failure_title,
        "consecutive_failures": runtime.failures,
        "sinks": [s.target for s in runtime.sinks],
        "environment": getattr(runtime.provider, "environment", None),
        "scope_missing": list(token.missing_scopes) if token else [],
        "warning": token.warning if token else None,
    }


def display_state(runtime: JobRuntime, now: float) -> str:
    """``invalid_link``, ``sink_failing``, ``paused`` (its credential is paused),
    ``valid``, ``retrying`` (a valid token, failing refreshes), ``expired``,
    ``failing`` (no token yet, failing) or ``pending``."""
    if runtime.state == "invalid_link":
        return "invalid_link"
    paused = runtime.parked_at is not None and not runtime.failures
    token = runtime.token
    if token is not None and token.is_valid(now):
        if runtime.unwritten:
            return "sink_failing"
        if paused:
            return "paused"
        return "valid" if runtime.failures == 0 else "retrying"
    if paused:
        return "paused"
    if token is not None:
        return "expired"
    return "failing" if runtime.failures else "pending"


#: The longest title `/v1/tokens` shows.
MAX_TITLE_LENGTH = 120


def title(scrub: Callable[[str], str], text: str | None) -> str | None:
    """`text` on one line, redacted (`scrub`) and cut to `MAX_TITLE_LENGTH`: what the
    API may show of a failure."""
    if not text:
        return None
    shown = scrub(" ".join(text.split()))
    return shown if len(shown) <= MAX_TITLE_LENGTH else shown[: MAX_TITLE_LENGTH - 3] + "..."


def snapshots(runtimes: Iterable[JobRuntime], now: float) -> Iterator[JobSnapshot]:
    """What the metrics collector needs of each job at scrape time."""
    for runtime in list(runtimes):
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
