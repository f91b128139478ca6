"""Consumers and operators asking for a refresh (``POST /v1/tokens/{job}/refresh``):
a plain forced refresh, or the report that a token was rejected — the partners'
"on 401, get a fresh token and retry once; a second 401 means the link is invalid",
done once in the daemon for every consumer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from refresher.errors import NotActiveError
from refresher.runtime import JobRuntime, Rejection

if TYPE_CHECKING:
    from refresher.scheduler import Scheduler

INVALID_LINK = "a fresh token was rejected too: the link itself is invalid"


class Feedback:
    """What the HTTP face asks of the scheduler on a consumer's behalf."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def _runtime(self, job: str, tenant: str | None) -> JobRuntime:
        runtime = self.scheduler.jobs.get((job, tenant))
        if runtime is None:
            raise KeyError((job, tenant))
        if not self.scheduler.is_active():
            raise NotActiveError()
        return runtime

    async def force(self, job: str, tenant: str | None = None) -> JobRuntime:
        """An operator asked for a refresh: single-flight, within three budgets — one
        per (job, tenant), one per credential, one for the daemon (`TooSoonError`).
        It also clears an ``invalid_link`` verdict: the operator says try again.
        `NotActiveError` when this scheduler does not refresh (a follower, stopping)."""
        runtime = self._runtime(job, tenant)
        if runtime.refreshing is not None:
            await runtime.refreshing.wait()
            return runtime
        self.scheduler.budgets.spend_forced(runtime, per_job=True)
        if runtime.state == "invalid_link":
            runtime.state = "pending"
            runtime.answered_rejection = None
        await self.scheduler.refresh(runtime, force=True)
        return runtime

    async def report_rejected(self, job: str, tenant: str | None, fingerprint: str) -> Rejection:
        """A consumer's API call was rejected (401) with the token `fingerprint`.

        * not the current token: it was replaced already — nothing to mint;
        * the current token: mint a fresh one (single-flight: every report of the
          same token joins one mint); the per-job interval does not apply, the
          credential and daemon budgets do (`TooSoonError`);
        * a token minted in answer to an earlier report: the link itself is invalid
          (the partner's "second 401"): no more mints for this job and tenant until
          its config, tenant entry or credential changes or an operator forces one.
        """
        runtime = self._runtime(job, tenant)
        if runtime.state == "invalid_link":
            return Rejection(runtime, minted=False, invalid_link=True)
        current = runtime.token
        if current is None or current.fingerprint() != fingerprint:
            return Rejection(runtime, minted=False, invalid_link=False)
        if runtime.answered_rejection == fingerprint:
            self._invalid_link(runtime)
            return Rejection(runtime, minted=False, invalid_link=True)
        if runtime.refreshing is None:
            self.scheduler.budgets.spend_forced(runtime, per_job=False)
        await self.scheduler.refresh(runtime, force=True)
        fresh = runtime.token
        minted = fresh is not None and fresh.fingerprint() != fingerprint
        if minted and fresh is not None:
            runtime.answered_rejection = fresh.fingerprint()
        return Rejection(runtime, minted=minted, invalid_link=False)

    def _invalid_link(self, runtime: JobRuntime) -> None:
        """The partner rejected a token minted in answer to a rejection: park the job."""
        scheduler = self.scheduler
        labels = scheduler.series(runtime).labels
        scheduler.metrics.refresh_total.labels(*labels, "failure").inc()
        scheduler.metrics.refresh_failures.labels(*labels, "invalid_link").inc()
        runtime.state = "invalid_link"
        runtime.failures += 1
        runtime.failure_reason = "invalid_link"
        runtime.failure_message = runtime.failure_title = INVALID_LINK
        runtime.failure_status = 401
        scheduler.reschedule(runtime, math.inf)
        runtime.bound_log.error(
            "link invalid: the consumer's API rejected a token minted in answer to its "
            "earlier rejection; no more mints until the config, tenant or credential "
            "changes or an operator forces a refresh",
            fingerprint=runtime.token.fingerprint() if runtime.token else None,
        )
