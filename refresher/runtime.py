"""The live state of one (job, tenant): `JobRuntime`.

A runtime is created from the configuration (`refresher.jobs`), driven by the
`Scheduler`, and shown by `refresher.status`. States: ``pending`` (no token yet),
``valid``, ``invalid_link`` (a consumer's second rejection: no more mints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from refresher.metrics import JobSeries
from refresher.providers.base import TokenProvider
from refresher.sinks.base import TokenSink
from refresher.token import Token

JobKey = tuple[str, str | None]
State = Literal["pending", "valid", "invalid_link"]


@dataclass(eq=False)
class JobRuntime:
    """The live state of one (job, tenant)."""

    job: str
    tenant: str | None
    provider: TokenProvider
    sinks: Sequence[TokenSink]
    on_expiry: str = "keep"
    token: Token | None = None
    state: State = "pending"
    next_refresh_at: float | None = None
    failures: int = 0
    #: The last failure's reason code (a `refresh_failures_total` reason), or None.
    failure_reason: str | None = None
    #: The full message, for logs and tests; never shown by the API.
    failure_message: str | None = None
    failure_status: int | None = None
    #: A short, redacted title the API may show (the provider's problem title, or ours).
    failure_title: str | None = None
    last_success_at: float | None = None
    backoff: float = 0.0
    unwritten: list[TokenSink] = field(default_factory=list)
    generation: int = 0
    #: Set while a refresh of this job runs; others join it instead of minting again.
    refreshing: anyio.Event | None = None
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
        """What `/v1/tokens` shows (see `refresher.status.job_status`)."""
        from refresher.status import job_status

        return job_status(self, now)

    def display_state(self, now: float) -> str:
        """The state `/v1/tokens` and `refresher status` show (`refresher.status`)."""
        from refresher.status import display_state

        return display_state(self, now)


@dataclass(frozen=True)
class Rejection:
    """The outcome of a consumer's rejection report (`Feedback.report_rejected`)."""

    runtime: JobRuntime
    #: A token other than the rejected one is current now (minted for this report).
    minted: bool
    invalid_link: bool
