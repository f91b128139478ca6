"""One credential, one fate: what a 401 or a 429 at the token endpoint means for
every job and tenant sharing that credential (a client id, an API key).

A 401 from a mint says the credential itself is rejected, and a 429 says its budget
is spent: neither is one tenant's problem. The credential's `Gate` closes: every
job sharing it is *parked* (off the timer, no request, no log line each), and a
single *probe* — the parked job waiting longest — tries again when the pause ends,
so a tenant the partner refuses cannot keep the others paused. A probe that
succeeds opens the gate and every parked job resumes; one that fails closes it for
another pause. A rotated credential file opens it at once.

One exception keeps a single bad tenant from pausing thousands of good ones: a 401
for a tenant while another tenant on the same credential minted within the last
`window` seconds (``backoff.max``) is that tenant's own (the partner does not say
what its mint answers for an unlinked tenant), and stays its own until it mints.

Until a credential has worked once, one request at a time finds out whether it
does (`Gate.first_try`): a revoked key costs one 401, not one per tenant.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import structlog

from refresher.clock import Clock
from refresher.runtime import JobKey, JobRuntime

log = structlog.get_logger("refresher.credentials")


@dataclass
class Gate:
    """The shared state of one credential."""

    credential: str
    #: Closed until this moment (0: open); while closed, jobs park.
    paused_until: float = 0.0
    #: Why it is closed: ``unauthorized`` or ``rate_limited``.
    reason: str | None = None
    #: The parked job that will try again when the pause ends.
    probe: JobKey | None = None
    #: Every other job waiting for the gate to open, oldest first.
    parked: dict[JobKey, None] = field(default_factory=dict)
    last_success_at: float | None = None
    #: Tenants whose 401s are their own (see the module docstring).
    refused: set[JobKey] = field(default_factory=set)
    #: Set while the first request of a credential that never worked is out.
    first_try: anyio.Event | None = None

    @property
    def closed(self) -> bool:
        return self.reason is not None

    def own_401(self, key: JobKey, now: float, window: float) -> bool:
        """Whether a 401 for tenant `key` is its own, not the credential's: it was
        before, or the credential minted for another tenant within `window` seconds
        and the gate is open. Records the verdict."""
        own = key in self.refused or (
            not self.closed
            and self.last_success_at is not None
            and now - self.last_success_at < window
        )
        if own:
            self.refused.add(key)
        return own

    def minted(self, key: JobKey, now: float) -> None:
        self.last_success_at = now
        self.refused.discard(key)


class Planner(Protocol):
    """What the gates need of the scheduler: its jobs, its clock, its timer."""

    jobs: dict[JobKey, JobRuntime]
    clock: Clock

    def reschedule(self, runtime: JobRuntime, moment: float | None) -> None: ...


class Gates:
    """The gates of every credential in use (created on first use), and the moves
    that park, probe and resume the jobs behind them."""

    def __init__(self, planner: Planner) -> None:
        self._gates: dict[str, Gate] = {}
        self._planner = planner

    def __getitem__(self, credential: str) -> Gate:
        gate = self._gates.get(credential)
        if gate is None:
            gate = self._gates[credential] = Gate(credential)
        return gate

    def __iter__(self) -> Iterator[Gate]:
        return iter(self._gates.values())

    def find(self, key: JobKey) -> Gate | None:
        """The gate `key` is parked at or probes for, if any."""
        for gate in self._gates.values():
            if gate.probe == key or key in gate.parked:
                return gate
        return None

    async def through(self, runtime: JobRuntime, *, force: bool) -> bool:
        """Whether `runtime` may ask now; if not, it is parked or rescheduled. Waits
        while another job finds out whether a never-used credential works."""
        gate = self[runtime.provider.credential]
        while True:
            if gate.closed and not force:
                if gate.probe != runtime.key:
                    self.park(runtime, gate)
                    return False
                if gate.paused_until > self._planner.clock.now():
                    self._planner.reschedule(runtime, gate.paused_until)
                    return False
            if gate.first_try is None:
                return True
            await gate.first_try.wait()

    def park(self, runtime: JobRuntime, gate: Gate) -> None:
        """Off the timer until `gate` opens; no request, no log line of its own."""
        if gate.probe != runtime.key:
            gate.parked[runtime.key] = None
        runtime.parked_at = gate.credential
        runtime.failure_reason = runtime.failure_reason or gate.reason
        runtime.backoff = max(gate.paused_until - self._planner.clock.now(), 0.0)
        self._planner.reschedule(runtime, math.inf)
        runtime.next_refresh_at = gate.paused_until

    def close(self, runtime: JobRuntime, reason: str, pause: float) -> None:
        """`runtime`'s mint says its credential is rejected or throttled: pause every
        job sharing it; the one parked longest probes when the pause ends."""
        gate = self[runtime.provider.credential]
        first = not gate.closed
        gate.reason = reason
        gate.paused_until = self._planner.clock.now() + pause
        jobs = self._planner.jobs.values()
        sharing = [r for r in jobs if r.provider.credential == gate.credential]
        if first:
            for other in sharing:
                if other is not runtime and other.parked_at is None and other.refreshing is None:
                    self.park(other, gate)
        gate.probe = None
        gate.parked.pop(runtime.key, None)
        self.park(runtime, gate)
        self._next_probe(gate)
        if first:
            runtime.bound_log.error(
                "credential rejected: pausing every token that uses it"
                if reason == "unauthorized"
                else "credential throttled: pausing every token that uses it",
                reason=reason,
                tokens=len(sharing),
                retry_in=round(pause, 3),
            )

    def open(self, credential: str, *, reason: str) -> None:
        """The credential works again: every parked job resumes at once."""
        gate = self[credential]
        if not gate.closed and not gate.parked and gate.probe is None:
            return
        probe = gate.probe
        keys = [*gate.parked, *([probe] if probe is not None else [])]
        gate.reason, gate.paused_until, gate.probe = None, 0.0, None
        gate.parked.clear()
        resumed = 0
        for key in keys:
            runtime = self._planner.jobs.get(key)
            if runtime is None or (runtime.parked_at != credential and key != probe):
                continue
            runtime.parked_at = None
            if runtime.refreshing is None:
                self._planner.reschedule(runtime, None)
            resumed += 1
        if resumed:
            log.info("credential usable again: resuming its tokens", because=reason, tokens=resumed)

    def forget(self, key: JobKey) -> None:
        """A job was removed: it no longer waits, and another parked job probes."""
        gate = self.find(key)
        if gate is not None:
            gate.parked.pop(key, None)
            if gate.probe == key:
                gate.probe = None
                self._next_probe(gate)

    def _next_probe(self, gate: Gate) -> None:
        while gate.probe is None and gate.parked:
            key = next(iter(gate.parked))
            del gate.parked[key]
            runtime = self._planner.jobs.get(key)
            if runtime is not None:
                gate.probe = key
                self._planner.reschedule(runtime, gate.paused_until)
