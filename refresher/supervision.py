"""Supervision: an exception outside the error tree in a job's path is a bug. It is
caught at the job's boundary (its refresh, read-back, expiry, notifications, file
watch, tenant sync, reload, an HTTP handler), logged once with its traceback,
counted in ``refresher_internal_errors_total{component}``, and the job retries with
backoff; the daemon and every other job keep running.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import structlog

from refresher.policy import backoff_delay
from refresher.runtime import JobRuntime

if TYPE_CHECKING:
    from refresher.scheduler import Scheduler

log = structlog.get_logger("refresher")


class Supervisor:
    """Turns a bug at a boundary into a logged, counted, retried failure."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def internal_error(
        self,
        component: str,
        exc: BaseException,
        runtime: JobRuntime | None = None,
        *,
        retry: bool = True,
    ) -> None:
        """A bug surfaced at a job's boundary: log it once with its traceback, count
        it, and (with `retry`) plan the job's next attempt with backoff. Never raises:
        this is the last line between one job's bug and the whole daemon."""
        scheduler = self.scheduler
        try:
            scheduler.metrics.internal_errors.labels(component).inc()
            logger = runtime.bound_log if runtime is not None and runtime.bound_log else log
            logger.error("internal error", component=component, exc_info=exc)
        except Exception:
            # The logging pipeline failed too: say only what cannot leak.
            print(f"refresher: internal error in {component}", file=sys.stderr)
        if runtime is None or not retry:
            return
        try:
            labels = scheduler.series(runtime).labels
            scheduler.metrics.refresh_total.labels(*labels, "failure").inc()
            scheduler.metrics.refresh_failures.labels(*labels, "internal").inc()
            runtime.failures += 1
            runtime.failure_reason = "internal"
            runtime.failure_message = f"internal error: {type(exc).__name__}"
            runtime.failure_status = None
            runtime.failure_title = "internal error (see the daemon's log)"
            policy = scheduler.policy.backoff
            runtime.backoff = backoff_delay(runtime.failures, policy, scheduler.rng)
            if scheduler.jobs.get(runtime.key) is runtime:
                scheduler.reschedule(runtime, scheduler.clock.now() + runtime.backoff)
        except Exception:
            print(f"refresher: cannot plan a retry after an error in {component}", file=sys.stderr)
