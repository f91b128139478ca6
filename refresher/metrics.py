"""Every Prometheus metric refresher exports, defined in one place.

Counters and histograms are recorded as events happen. Gauges that describe the
current state (token validity, expiry, backoff, tenant counts, leadership) are
computed at scrape time from the scheduler's state by `StateCollector`, so they can
never drift from what `/v1/tokens` reports, and 10,000 tenants cost nothing between
scrapes.

Labels: ``token_job`` and ``provider``; ``tenant`` only with ``metrics.tenant_labels:
true`` (otherwise per-tenant jobs aggregate, and ``tenants_valid``/``tenants_configured``
say how many of a job's tenants hold a valid token). Never ``job``: that is Prometheus's
own target label, and exporting it would force ``honor_labels: true`` on every scrape.

Every series an alert or a dashboard panel reads exists from a job's first scrape:
the attempt and failure counters are created at 0 for each job and each reason in
`FAILURE_REASONS` (``increase()`` cannot see a counter's first increment, so a series
born at 1 would hide a job's first failure from the alerts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from refresher import __version__

PREFIX = "refresher"

#: Provider round trips: loopback emulators answer in ~1 ms, partners in 50 ms-5 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RETRY_AFTER_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 900, 3600)
#: The label naming the token job (``job`` is Prometheus's scrape job).
TOKEN_JOB = "token_job"
#: Every ``reason`` of `refresher_refresh_failures_total`: the `reason` of each error in
#: refresher/errors.py, plus ``internal`` (a bug caught at a job's boundary).
FAILURE_REASONS = (
    "transport",
    "timeout",
    "server_error",
    "rate_limited",
    "unauthorized",
    "forbidden",
    "bad_response",
    "invalid_link",
    "tenant_mismatch",
    "scope_missing",
    "sink",
    "config",
    "internal",
)
#: The ``result`` values of `refresher_refresh_total`.
REFRESH_RESULTS = ("success", "failure")
#: Where an unexpected error can be caught (`refresher_internal_errors_total`).
INTERNAL_ERROR_COMPONENTS = (
    "refresh",
    "read_back",
    "expiry",
    "notify",
    "watch",
    "tenants",
    "reload",
    "server",
)


@dataclass(frozen=True)
class JobSnapshot:
    """What the collector needs to know about one (job, tenant) at scrape time.
    (`job` is the token job's name, exported as the ``token_job`` label.)"""

    job: str
    provider: str
    tenant: str | None
    valid: bool
    expires_at: float | None
    last_success_at: float | None
    backoff_seconds: float
    environment: str | None = None
    scope_missing: int = 0


@dataclass
class JobSeries:
    """One job's label values and the metric children every successful refresh
    touches, resolved once: a ``labels()`` lookup costs more than the observation."""

    labels: tuple[str, ...]
    refresh_duration: Any
    refreshed: Any
    sink_write_duration: dict[str, Any]


class Metrics:
    """The metric set of one daemon, registered in its own registry."""

    def __init__(
        self, *, tenant_labels: bool = False, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tenant_labels = tenant_labels
        labels = [TOKEN_JOB, "provider"] + (["tenant"] if tenant_labels else [])
        self._labels = labels
        r = self.registry
        # Registered first: it creates a new job's zero series before the counters
        # below are collected in the same scrape.
        self._state = StateCollector(self)
        r.register(self._state)
        #: (job, provider) pairs whose series exist (see `declare_job`).
        self._declared: set[tuple[str, str]] = set()
        self.refresh_duration = Histogram(
            f"{PREFIX}_refresh_duration_seconds",
            "Provider round trip of a token refresh, in seconds.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refresh_total = Counter(
            f"{PREFIX}_refresh",
            "Token refresh attempts by result.",
            [*labels, "result"],
            registry=r,
        )
        self.refresh_failures = Counter(
            f"{PREFIX}_refresh_failures",
            "Failed token refreshes by reason.",
            [*labels, "reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limited",
            "Token requests answered 429 by the provider.",
            labels,
            registry=r,
        )
        self.retry_after = Histogram(
            f"{PREFIX}_retry_after_seconds",
            "Retry-After values received with 429 answers, in seconds.",
            labels,
            buckets=RETRY_AFTER_BUCKETS,
            registry=r,
        )
        self.sink_write_duration = Histogram(
            f"{PREFIX}_sink_write_duration_seconds",
            "Time to write a token to a sink, in seconds.",
            [*labels, "sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_failures = Counter(
            f"{PREFIX}_sink_failures", "Failed sink writes.", [*labels, "sink"], registry=r
        )
        self.config_reload_failures = Counter(
            f"{PREFIX}_config_reload_failures",
            "Configuration reloads rejected because the new config was invalid.",
            registry=r,
        )
        self.notify_failures = Counter(
            f"{PREFIX}_notify_failures",
            "Notifier runs that failed (non-zero exit, no process, HTTP error).",
            [*labels, "notifier"],
            registry=r,
        )
        self.internal_errors = Counter(
            f"{PREFIX}_internal_errors",
            "Unexpected errors caught at a job's boundary, by component (a bug: the job "
            "retries and the daemon lives on).",
            ["component"],
            registry=r,
        )
        for component in INTERNAL_ERROR_COMPONENTS:
            self.internal_errors.labels(component)
        self.tenants_rejected = Gauge(
            f"{PREFIX}_tenants_rejected",
            "Lines of the job's tenants_file refused at its last read (bad tenant id, "
            "a target that collides or escapes its directory).",
            [TOKEN_JOB, "provider"],
            registry=r,
        )

        self.bundle_writes = Counter(
            f"{PREFIX}_bundle_writes",
            "Rewrites of a bundle file or Secret key (one per batch of changed tokens).",
            ["bundle"],
            registry=r,
        )
        self.bundle_members_skipped = Gauge(
            f"{PREFIX}_bundle_members_skipped",
            "Bundle members left out because another member has their variable name.",
            ["bundle"],
            registry=r,
        )
        self.template_errors = Counter(
            f"{PREFIX}_template_errors",
            "Template changes refused and renders that failed (the last good output stays).",
            ["template"],
            registry=r,
        )

    def declare_job(self, job: str, provider: str) -> None:
        """Create a job's counters at 0: per job, never per tenant (with tenant labels
        on they carry ``tenant=""``), so the series grow with jobs, not tenants.
        Idempotent and cheap when already done."""
        key = (job, provider)
        if key in self._declared:
            return
        labels = self.label_values(job, provider, None)
        for result in REFRESH_RESULTS:
            self.refresh_total.labels(*labels, result)
        for reason in FAILURE_REASONS:
            self.refresh_failures.labels(*labels, reason)
        self.rate_limited.labels(*labels)
        self._declared.add(key)

    def label_values(self, job: str, provider: str, tenant: str | None) -> tuple[str, ...]:
        if self.tenant_labels:
            return (job, provider, tenant or "")
        return (job, provider)

    def series(self, job: str, provider: str, tenant: str | None) -> JobSeries:
        """The hot-path children of one (job, tenant) (see `JobSeries`)."""
        self.declare_job(job, provider)
        labels = self.label_values(job, provider, tenant)
        return JobSeries(
            labels=labels,
            refresh_duration=self.refresh_duration.labels(*labels),
            refreshed=self.refresh_total.labels(*labels, "success"),
            sink_write_duration={},
        )

    def sink_write_duration_of(self, series: JobSeries, sink: str) -> Any:
        child = series.sink_write_duration.get(sink)
        if child is None:
            child = series.sink_write_duration[sink] = self.sink_write_duration.labels(
                *series.labels, sink
            )
        return child

    def register_state(
        self,
        snapshots: Callable[[], Iterable[JobSnapshot]],
        *,
        is_leader: Callable[[], bool] | None = None,
    ) -> None:
        """Export the scheduler's state at scrape time (`StateCollector`). `is_leader`
        is None when leader election is off."""
        self._state.follow(snapshots, is_leader)


class StateCollector(Collector):
    """Gauges derived from the scheduler state at scrape time; declares the counters
    of jobs it sees for the first time (`Metrics.declare_job`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.snapshots: Callable[[], Iterable[JobSnapshot]] | None = None
        self.is_leader: Callable[[], bool] | None = None

    def follow(
        self,
        snapshots: Callable[[], Iterable[JobSnapshot]],
        is_leader: Callable[[], bool] | None,
    ) -> None:
        self.snapshots = snapshots
        self.is_leader = is_leader

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.snapshots is None:
            return
        labels = self.metrics._labels
        valid = GaugeMetricFamily(
            f"{PREFIX}_token_valid",
            "1 if the job holds a token that has not expired.",
            labels=labels,
        )
        expiry = GaugeMetricFamily(
            f"{PREFIX}_token_expiry_timestamp_seconds",
            "Unix time at which the job's current token expires (earliest tenant).",
            labels=labels,
        )
        last_success = GaugeMetricFamily(
            f"{PREFIX}_token_last_success_timestamp_seconds",
            "Unix time of the job's last successful refresh (latest tenant).",
            labels=labels,
        )
        backoff = GaugeMetricFamily(
            f"{PREFIX}_backoff_seconds",
            "Current wait before the next retry after a failure, in seconds (0 when healthy).",
            labels=labels,
        )
        tenants_valid = GaugeMetricFamily(
            f"{PREFIX}_tenants_valid",
            "Tenants of the job holding a valid token.",
            labels=[TOKEN_JOB, "provider"],
        )
        tenants_configured = GaugeMetricFamily(
            f"{PREFIX}_tenants_configured",
            "Tenants configured for the job.",
            labels=[TOKEN_JOB, "provider"],
        )
        scope_missing = GaugeMetricFamily(
            f"{PREFIX}_scope_missing",
            "Scopes requested (or expected) that the job's current token was not granted.",
            labels=labels,
        )
        # One series per token job (its identifying labels, no tenant): an info metric.
        job_info = GaugeMetricFamily(
            f"{PREFIX}_job_info",
            "1 per token job; environment is sandbox or production where the provider "
            "has both (DutyClaims), else empty.",
            labels=[*labels[:2], "environment"],
        )
        groups: dict[tuple[str, ...], list[JobSnapshot]] = {}
        tenants: dict[tuple[str, str], list[int]] = {}
        declare, last_job = self.metrics.declare_job, None
        jobs: dict[tuple[str, str], str] = {}
        for snap in self.snapshots():
            if snap.job != last_job:  # a job's tenants come one after another
                declare(snap.job, snap.provider)
                last_job = snap.job
            key = self.metrics.label_values(snap.job, snap.provider, snap.tenant)
            groups.setdefault(key, []).append(snap)
            jobs.setdefault((snap.job, snap.provider), snap.environment or "")
            if snap.tenant is not None:
                counts = tenants.setdefault((snap.job, snap.provider), [0, 0])
                counts[0] += snap.valid
                counts[1] += 1
        for key, snaps in groups.items():
            values = list(key)
            valid.add_metric(values, 1.0 if all(s.valid for s in snaps) else 0.0)
            expiries = [s.expires_at for s in snaps if s.expires_at is not None]
            if expiries:
                expiry.add_metric(values, min(expiries))
            successes = [s.last_success_at for s in snaps if s.last_success_at is not None]
            if successes:
                last_success.add_metric(values, max(successes))
            backoff.add_metric(values, max(s.backoff_seconds for s in snaps))
            scope_missing.add_metric(values, max(s.scope_missing for s in snaps))
        for (job, provider), (ok, total) in tenants.items():
            tenants_valid.add_metric([job, provider], ok)
            tenants_configured.add_metric([job, provider], total)
        for (job, provider), environment in jobs.items():
            job_info.add_metric([job, provider, environment], 1.0)
        yield from (valid, expiry, last_success, backoff, tenants_valid, tenants_configured)
        yield from (scope_missing, job_info)
        enabled = GaugeMetricFamily(
            f"{PREFIX}_leader_election_enabled",
            "1 if this daemon takes part in leader election (0: it always refreshes).",
        )
        enabled.add_metric([], 0.0 if self.is_leader is None else 1.0)
        yield enabled
        leader = GaugeMetricFamily(
            f"{PREFIX}_is_leader", "1 if this daemon is the one that refreshes (holds the lease)."
        )
        leader.add_metric([], 1.0 if self.is_leader is None or self.is_leader() else 0.0)
        yield leader
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "Build information.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
