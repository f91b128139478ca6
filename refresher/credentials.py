"""One credential, one fate: what a 401 or a 429 at the token endpoint means for
every job and tenant sharing that credential (a client id, an API key).

A 401 from a mint says the credential itself is rejected, and a 429 says its budget
is spent: neither is one tenant's problem. The credential's `Gate` closes: every
job sharing it is *parked* (off the timer, no request, no log line each), and a
single *probe* — one parked job — tries again when the pause ends. A probe that
succeeds opens the gate and every parked job resumes; one that fails closes it for
another pause. A rotated credential file opens the gate at once.

One exception keeps a single bad tenant from pausing thousands of good ones: a 401
for a tenant while another tenant on the same credential minted within the last
`window` seconds (``backoff.max``) is that tenant's own (Debitura does not say what
its mint answers for an unlinked tenant), and stays its own until it mints again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

JobKey = tuple[str, str | None]


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


class Gates:
    """The gates of every credential in use, created on first use."""

    def __init__(self) -> None:
        self._gates: dict[str, Gate] = {}

    def __getitem__(self, credential: str) -> Gate:
        gate = self._gates.get(credential)
        if gate is None:
            gate = self._gates[credential] = Gate(credential)
        return gate

    def __iter__(self) -> object:
        return iter(self._gates.values())

    def find(self, key: JobKey) -> Gate | None:
        """The gate `key` is parked at or probes for, if any."""
        for gate in self._gates.values():
            if gate.probe == key or key in gate.parked:
                return gate
        return None
