"""Leader election over a ``coordination.k8s.io/v1`` Lease, with client-go semantics.

With more than one replica only the Lease holder refreshes. Defaults follow
client-go: lease 15 s, renew deadline 10 s, retry 2 s.

* Time comes from this process's clock only, never from the timestamps in the Lease:
  a candidate remembers *when it observed* the Lease record change, and takes the
  Lease when it is absent, released (no holder) or unchanged for
  ``leaseDurationSeconds`` since that observation (client-go's ``observedTime``).
  Node clocks may disagree by any amount; only their rates matter. Taking the Lease
  from another holder increments ``leaseTransitions``.
* The holder renews every retry period; followers retry every retry period plus up
  to 1.2 times that at random (client-go's ``JitterFactor``), so candidates do not
  move in lockstep. An API server answer with ``Retry-After`` is honoured.
* Every write is a PUT guarded by the ``resourceVersion`` just read, replacing only
  the spec (labels, annotations, owner references and finalizers others set stay),
  so of two racing candidates one gets 409 and stays a follower.
* Leadership is claimed only until ``start of the last successful renew +
  renew_deadline``: `is_leader()` is computed from the clock, and a watchdog flips it
  (and calls ``on_change(False)``) at that moment even while a renew request hangs.
  A follower waits at least ``lease_duration`` (longer than the renew deadline) from
  a moment after that renew, so the old leader has stopped before anyone may take
  over — never two writers, however far the clocks are apart.
* Observing another holder on the Lease while leading steps down at once.
* `release()` on shutdown clears ``holderIdentity`` so a follower takes over at its
  next retry instead of waiting for the lease to expire. A killed process cannot
  release; its Lease simply expires.

All timing goes through an injected `Clock`, so tests drive it with `ManualClock`.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx2
import structlog
from lightkube import ApiError, AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from refresher.clock import Clock
from refresher.config import LEADER_JITTER_FACTOR, LeaderElectionConfig
from refresher.errors import ConfigError, KubernetesAPIError, LeaderElectionError
from refresher.kube import KubeClients, api_error, transport_error

log = structlog.get_logger("refresher.leader")


def micro_time(moment: float) -> Any:
    """A ``MicroTime`` the API server accepts: always six fractional digits.

    (lightkube encodes a ``datetime`` without the fraction when it is zero, which the
    API server's ``RFC3339Micro`` parser rejects; typed as Any to sit in a
    ``datetime`` field.)
    """
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seconds(value: datetime | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def default_identity(environ: Mapping[str, str] | None = None) -> str:
    """``$POD_NAME``, else the hostname plus a random suffix (two processes on one
    host must never share an identity: both would believe they hold the Lease)."""
    env = os.environ if environ is None else environ
    pod = env.get("POD_NAME")
    if pod:
        return pod
    return f"{socket.gethostname()}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaseRecord:
    """What the Lease says, as last read or written.

    `renew_time` and `acquire_time` are the writer's clock: informational only,
    never compared with this process's clock.
    """

    holder: str
    renew_time: float | None
    acquire_time: float | None
    duration: float
    transitions: int
    resource_version: str | None

    @classmethod
    def of(cls, lease: Lease, default_duration: float) -> LeaseRecord:
        spec = lease.spec or LeaseSpec()
        meta = lease.metadata or ObjectMeta()
        return cls(
            holder=spec.holderIdentity or "",
            renew_time=_seconds(spec.renewTime),
            acquire_time=_seconds(spec.acquireTime),
            duration=float(spec.leaseDurationSeconds or default_duration),
            transitions=int(spec.leaseTransitions or 0),
            resource_version=meta.resourceVersion,
        )

    def same_record(self, other: LeaseRecord) -> bool:
        """The same election record (client-go compares the record, not the object:
        a label or annotation edit is not a renewal)."""
        return self._election() == other._election()

    def _election(self) -> tuple[str, float | None, float | None, float, int]:
        return (self.holder, self.renew_time, self.acquire_time, self.duration, self.transitions)


class LeaderElector:
    """Campaigns for the Lease `config.lease_name` and keeps it while alive.

    `on_change` is called (synchronously, from the elector's task) with True when
    this replica becomes leader and False when it stops being leader; exceptions it
    raises are logged and ignored. Gate every write on `is_leader()`.
    """

    def __init__(
        self,
        config: LeaderElectionConfig,
        *,
        clients: KubeClients,
        clock: Clock,
        on_change: Callable[[bool], None] | None = None,
        identity: str | None = None,
        namespace: str | None = None,
        environ: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.clients = clients
        self.clock = clock
        self.on_change = on_change
        self.rng = rng or random.Random()
        self.identity = identity or config.identity or default_identity(env)
        self.lease_name = config.lease_name
        self.namespace = (
            namespace
            or config.namespace
            or env.get("POD_NAMESPACE")
            or clients.namespace(config.kubeconfig, config.context)
        )
        self.lease_duration = config.lease_duration
        self.renew_deadline = config.renew_deadline
        self.retry_period = config.retry_period
        #: The Lease as last observed (None before the first successful read).
        self.observed: LeaseRecord | None = None
        #: This process's clock when `observed` last changed (client-go's observedTime).
        self.observed_at: float | None = None
        #: Clock time the main loop sleeps until (None while it works); for tests/status.
        self.waiting_until: float | None = None
        self._leading = False
        self._renewed_at: float | None = None
        self._became_leader = anyio.Event()
        self._stopped = False
        self._scope: anyio.CancelScope | None = None
        self._last_error: str | None = None
        #: Not before this clock time: the API server asked us to wait (Retry-After).
        self._throttled_until: float | None = None

    # ------------------------------------------------------------ public API

    def is_leader(self) -> bool:
        """True only while the last successful renew is younger than the renew deadline."""
        return (
            self._leading
            and self._renewed_at is not None
            and self.clock.now() < self._renewed_at + self.renew_deadline
        )

    @property
    def holder(self) -> str | None:
        """The holder identity last seen on the Lease ('' when released)."""
        return self.observed.holder if self.observed is not None else None

    def leader(self) -> str | None:
        """Who leads, as far as this replica knows: itself while `is_leader()`, else
        the holder last seen on the Lease (None: nobody, or only itself, stale)."""
        if self.is_leader():
            return self.identity
        holder = self.holder
        return holder if holder and holder != self.identity else None

    def lease_valid(self, now: float) -> bool:
        """The observed holder may still be acting: its record changed less than its
        lease duration ago, by this process's clock."""
        return (
            self.observed is not None
            and self.observed_at is not None
            and self.observed_at + self.observed.duration > now
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Campaign and renew until cancelled or `release()`d.

        Signals `task_status` after the first attempt, so ``await tg.start(e.run)``
        returns knowing whether this replica leads. Cancellation stops claiming
        leadership but does not release the Lease (a killed pod cannot either).
        """
        started = False
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watchdog)
                    while not self._stopped:
                        attempt_at = self.clock.now()
                        await self._attempt(attempt_at)
                        if not started:
                            started = True
                            task_status.started()
                        await self._sleep_until(self._next_attempt(attempt_at))
                    tg.cancel_scope.cancel()
            if not started:  # released before the first attempt
                task_status.started()
        finally:
            self._scope = None
            self.waiting_until = None
            self._set_leader(False, reason="elector stopped")

    async def release(self) -> None:
        """Stop campaigning; if holding the Lease, stop claiming it and clear the holder."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
        held = self._leading or (
            self.observed is not None and self.observed.holder == self.identity
        )
        self._set_leader(False, reason="released")
        if not held:
            return
        try:
            with anyio.fail_after(min(5.0, self.renew_deadline)):
                for attempt in (1, 2):  # a renew still in flight may win once (409)
                    try:
                        await self._release_once()
                        return
                    except ApiError as exc:
                        if exc.status.code != 409 or attempt == 2:
                            raise
        except (ApiError, httpx2.HTTPError, OSError, TimeoutError, LeaderElectionError) as exc:
            log.warning(
                "cannot release the leader lease; followers take over when it expires",
                lease=self._lease_ref(),
                error=self._describe(exc, "update"),
            )

    async def _release_once(self) -> None:
        client = self._client()
        lease = await client.get(Lease, self.lease_name, namespace=self.namespace)
        record = LeaseRecord.of(lease, self.lease_duration)
        if record.holder != self.identity:
            return
        now = self.clock.now()
        released = self._with_spec(
            lease,
            LeaseSpec(
                holderIdentity="",
                leaseDurationSeconds=1,
                acquireTime=micro_time(now),
                renewTime=micro_time(now),
                leaseTransitions=record.transitions,
            ),
        )
        result = await client.replace(released)
        self._observe(LeaseRecord.of(result, self.lease_duration))
        log.info("leader lease released", lease=self._lease_ref(), identity=self.identity)

    # ------------------------------------------------------------ the loop

    def _next_attempt(self, attempt_at: float) -> float:
        """The leader renews every retry period; a follower waits a jittered retry
        period after its attempt ended (client-go's JitterUntil, sliding)."""
        if self._leading:
            moment = attempt_at + self.retry_period
        else:
            factor = 1.0 + self.rng.random() * LEADER_JITTER_FACTOR
            moment = self.clock.now() + self.retry_period * factor
        if self._throttled_until is not None:
            moment = max(moment, self._throttled_until)
            self._throttled_until = None
        return moment

    async def _attempt(self, now: float) -> None:
        lost_to: str | None = None
        try:
            with anyio.fail_after(self.renew_deadline):
                acquired, lost_to = await self._try_acquire_or_renew(now)
        except (ApiError, httpx2.HTTPError, OSError, TimeoutError, LeaderElectionError) as exc:
            acquired = False
            error = self._error(exc, "update" if self._leading else "get")
            if error.retry_after is not None:
                self._throttled_until = self.clock.now() + error.retry_after
            message = str(error)
            if message != self._last_error:
                self._last_error = message
                log.warning(
                    "leader lease renew failed" if self._leading else "leader election failed",
                    lease=self._lease_ref(),
                    identity=self.identity,
                    error=message,
                )
        else:
            self._last_error = None
        if acquired:
            self._renewed_at = now
            if self.clock.now() < now + self.renew_deadline:
                self._set_leader(True, reason="acquired")
        elif self._leading:
            if lost_to:
                self._set_leader(False, reason=f"lease taken by {lost_to}")
            elif self._renewed_at is None or self.clock.now() >= (
                self._renewed_at + self.renew_deadline
            ):
                self._set_leader(False, reason="renew deadline passed")

    async def _try_acquire_or_renew(self, now: float) -> tuple[bool, str | None]:
        """(acquired-or-renewed, identity of another holder that has the Lease)."""
        client = self._client()
        try:
            lease = await client.get(Lease, self.lease_name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            return await self._create(client, now), None
        record = LeaseRecord.of(lease, self.lease_duration)
        if self.observed is None or record.holder != self.observed.holder:
            log.info(
                "leader lease observed",
                lease=self._lease_ref(),
                holder=record.holder or None,
                identity=self.identity,
            )
        if self.observed is None or not record.same_record(self.observed):
            self._observe(record)
        else:
            self.observed = record  # same record, newer object: keep the observation time
        ours = record.holder == self.identity
        if record.holder and not ours and self.lease_valid(now):
            return False, record.holder
        spec = LeaseSpec(
            holderIdentity=self.identity,
            leaseDurationSeconds=self._duration_seconds(),
            acquireTime=(
                micro_time(record.acquire_time)
                if ours and record.acquire_time is not None
                else micro_time(now)
            ),
            renewTime=micro_time(now),
            leaseTransitions=record.transitions if ours else record.transitions + 1,
        )
        try:
            result = await client.replace(self._with_spec(lease, spec))
        except ApiError as exc:
            if exc.status.code == 409:  # someone else wrote first: lost this round
                return False, None
            raise
        written = LeaseRecord.of(result, self.lease_duration)
        self._observe(written)
        if not ours:
            log.info(
                "leader lease acquired",
                lease=self._lease_ref(),
                identity=self.identity,
                previous_holder=record.holder or None,
                transitions=written.transitions,
            )
        return True, None

    async def _create(self, client: AsyncClient, now: float) -> bool:
        lease = Lease(
            metadata=ObjectMeta(name=self.lease_name, namespace=self.namespace),
            spec=LeaseSpec(
                holderIdentity=self.identity,
                leaseDurationSeconds=self._duration_seconds(),
                acquireTime=micro_time(now),
                renewTime=micro_time(now),
                leaseTransitions=0,
            ),
        )
        try:
            result = await client.create(lease)
        except ApiError as exc:
            if exc.status.code == 409:  # created by another candidate meanwhile
                return False
            raise
        self._observe(LeaseRecord.of(result, self.lease_duration))
        log.info("leader lease created", lease=self._lease_ref(), identity=self.identity)
        return True

    async def _watchdog(self) -> None:
        """Step down exactly at the renew deadline, even while a renew call hangs."""
        while True:
            await self._became_leader.wait()
            renewed_at = self._renewed_at
            if renewed_at is None:  # pragma: no cover - set before becoming leader
                await anyio.lowlevel.checkpoint()
                continue
            await self.clock.sleep_until(renewed_at + self.renew_deadline)
            if (
                self._leading
                and self._renewed_at is not None
                and self.clock.now() >= self._renewed_at + self.renew_deadline
            ):
                self._set_leader(False, reason="renew deadline passed")

    async def _sleep_until(self, moment: float) -> None:
        self.waiting_until = moment
        try:
            await self.clock.sleep_until(moment)
        finally:
            self.waiting_until = None

    # ------------------------------------------------------------ helpers

    def _observe(self, record: LeaseRecord) -> None:
        self.observed = record
        self.observed_at = self.clock.now()

    def _set_leader(self, leading: bool, *, reason: str) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            self._became_leader.set()
            log.info("became leader", lease=self._lease_ref(), identity=self.identity)
        else:
            self._became_leader = anyio.Event()
            level = log.info if reason in ("released", "elector stopped") else log.warning
            level("stopped leading", lease=self._lease_ref(), identity=self.identity, reason=reason)
        if self.on_change is not None:
            try:
                self.on_change(leading)
            except Exception as exc:
                log.error("leader on_change callback failed", error=repr(exc))

    def _client(self) -> AsyncClient:
        try:
            return self.clients.client(self.config.kubeconfig, self.config.context)
        except ConfigError as exc:
            raise LeaderElectionError(str(exc), config_level=True) from None

    def _duration_seconds(self) -> int:
        return max(1, math.ceil(self.lease_duration))

    def _with_spec(self, current: Lease, spec: LeaseSpec) -> Lease:
        """The Lease as read, with only its spec replaced (as client-go's LeaseLock
        does): labels, annotations, owner references and finalizers stay."""
        return Lease(metadata=current.metadata or ObjectMeta(), spec=spec)

    def _lease_ref(self) -> str:
        return f"{self.namespace}/{self.lease_name}"

    def _error(self, exc: BaseException, verb: str) -> KubernetesAPIError:
        if isinstance(exc, KubernetesAPIError):
            return exc
        if isinstance(exc, ApiError):
            return api_error(
                exc,
                verb=verb,
                resource="leases",
                namespace=self.namespace,
                name=self.lease_name,
            )
        if isinstance(exc, TimeoutError):
            return LeaderElectionError(
                "the Kubernetes API did not answer within the renew deadline"
            )
        if isinstance(exc, (httpx2.HTTPError, OSError)):
            try:
                server = self.clients.server(self.config.kubeconfig, self.config.context)
            except ConfigError:
                server = "(unknown)"
            return transport_error(exc, server)
        return LeaderElectionError(str(exc))

    def _describe(self, exc: BaseException, verb: str) -> str:
        return str(self._error(exc, verb))
