"""Lease leader election with client-go semantics, against the loopback API emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.coordination_v1 import Lease

from refresher.clock import ManualClock
from refresher.config import LeaderElectionConfig
from refresher.kube import KubeClients
from refresher.leader import LeaderElector, micro_time
from refresher.token import parse_rfc3339
from tests.conftest import wait_for
from tests.kube_support import (
    NS,
    NoJitter,
)

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------- leader election


class Replica:
    """One elector in its own cancel scope (cancel = kill -9 of the pod)."""

    def __init__(self, elector: LeaderElector, clock: ManualClock) -> None:
        self.elector = elector
        self.clock = clock
        self.changes: list[tuple[float, bool]] = []
        self.scope = anyio.CancelScope()
        elector.on_change = lambda leading: self.changes.append((clock.now(), leading))

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.elector.run(task_status=task_status)
        finally:
            self.done = True

    done = False

    def idle(self) -> bool:
        until = self.elector.waiting_until
        if self.done or self.scope.cancel_called:
            return self.done  # killed or released: idle once run() has returned
        return until is not None and until > self.clock.now()


def elector(kubeconfig: Path, clients: KubeClients, clock: ManualClock, identity: str) -> Replica:
    config = LeaderElectionConfig(enabled=True, kubeconfig=kubeconfig, identity=identity)
    return Replica(LeaderElector(config, clients=clients, clock=clock, rng=NoJitter()), clock)


def pods(kubeconfig: Path, clients: KubeClients, clock: ManualClock) -> tuple[Replica, Replica]:
    """Two replicas, ``pod-a`` and ``pod-b``, campaigning for the same Lease."""
    a = elector(kubeconfig, clients, clock, "pod-a")
    return a, elector(kubeconfig, clients, clock, "pod-b")


async def settle(replicas: list[Replica]) -> None:
    await wait_for(lambda: all(r.idle() for r in replicas), what="electors idle")


async def advance(clock: ManualClock, replicas: list[Replica], seconds: float) -> None:
    """Move time in 0.5 s steps, letting every elector finish its HTTP calls each step."""
    target = clock.now() + seconds
    while clock.now() < target:
        await clock.advance(min(0.5, target - clock.now()))
        await settle(replicas)


def leaders(replicas: list[Replica]) -> list[str]:
    return [r.elector.identity for r in replicas if r.elector.is_leader()]


async def test_two_electors_exactly_one_leader(kube, kubeconfig, clients, clock) -> None:
    a, b = pods(kubeconfig, clients, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        tg.start_soon(b.run)  # racing for the same absent Lease
        await settle([a, b])
        for _ in range(40):  # 20 s of renewals
            assert len(leaders([a, b])) == 1
            await advance(clock, [a, b], 0.5)
        winner = leaders([a, b])[0]
        lease = kube.lease(NS, "refresher")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == winner
        assert lease["spec"]["leaseDurationSeconds"] == 15
        assert lease["spec"]["leaseTransitions"] == 0
        assert {r.elector.holder for r in (a, b)} == {winner}
        tg.cancel_scope.cancel()


async def test_killed_leader_is_replaced_after_the_lease_expires(
    kube, kubeconfig, clients, clock
) -> None:
    a, b = pods(kubeconfig, clients, clock)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        assert leaders([a, b]) == ["pod-a"]
        await advance(clock, [a, b], 5)
        last_renew = kube.lease(NS, "refresher")["spec"]["renewTime"]
        renewed_at = parse_rfc3339(last_renew)

        a.scope.cancel()  # the pod is killed: no release
        await settle([a, b])
        assert not a.elector.is_leader()
        assert a.changes[-1][1] is False

        # The follower counts the lease from when it saw the last renewal (within one
        # retry period of it), and notices expiry at its next retry.
        while not b.elector.is_leader():
            assert clock.now() <= renewed_at + 2 + 15 + 2, "follower did not take over in time"
            await advance(clock, [a, b], 0.5)
        took_over = b.changes[-1]
        assert took_over[1] is True
        assert renewed_at + 15 < took_over[0] <= renewed_at + 2 + 15 + 2
        lease = kube.lease(NS, "refresher")
        assert lease["spec"]["holderIdentity"] == "pod-b"
        assert lease["spec"]["leaseTransitions"] == 1
        tg.cancel_scope.cancel()


async def test_failing_renewals_stop_leadership_at_the_renew_deadline(
    kube, kubeconfig, clients, clock
) -> None:
    a, b = pods(kubeconfig, clients, clock)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        await advance(clock, [a, b], 4)
        assert leaders([a, b]) == ["pod-a"]
        renewed_at = parse_rfc3339(kube.lease(NS, "refresher")["spec"]["renewTime"])

        kube.fail(500, count=10_000, resource="leases")
        while clock.now() < renewed_at + 10:
            assert leaders([a, b]) == ["pod-a"]
            await advance(clock, [a, b], 0.5)
        # Exactly at last renew + renew deadline: nobody claims leadership.
        assert clock.now() == renewed_at + 10
        assert leaders([a, b]) == []
        assert a.changes[-1] == (renewed_at + 10, False)

        kube.clear_faults()
        await advance(clock, [a, b], 2)
        assert len(leaders([a, b])) == 1  # pod-a renews its own, unexpired lease
        tg.cancel_scope.cancel()


async def test_a_hanging_renew_does_not_extend_leadership(kube, kubeconfig, clients, clock) -> None:
    a = elector(kubeconfig, clients, clock, "pod-a")
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        renewed_at = clock.now()
        assert a.elector.is_leader()
        kube.slow(0.3, verb="get", resource="leases")
        await clock.advance(2)  # next renew starts and hangs (in real time)
        await wait_for(lambda: a.elector.waiting_until is None)
        await clock.advance(8)  # the renew deadline passes while the call is in flight
        assert not a.elector.is_leader()
        assert a.changes[-1] == (renewed_at + 10, False)
        # The late answer did commit a renew stamped with its start (renewed_at + 2),
        # and the next round renews at once: a claim again, but only ever within
        # renew_deadline of the renewTime the Lease holds (followers wait 15 s).
        await settle([a])
        record = parse_rfc3339(kube.lease(NS, "refresher")["spec"]["renewTime"])
        assert record >= renewed_at + 2
        assert a.elector.is_leader() and clock.now() < record + 10
        tg.cancel_scope.cancel()


async def test_release_hands_over_at_the_next_retry(kube, kubeconfig, clients, clock) -> None:
    a, b = pods(kubeconfig, clients, clock)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        await advance(clock, [a, b], 3)
        released_at = clock.now()
        kube.conflict(verb="update", resource="leases")  # a renew raced the release
        await a.elector.release()
        assert not a.elector.is_leader()
        assert kube.lease(NS, "refresher")["spec"]["holderIdentity"] == ""
        await advance(clock, [a, b], 2)
        assert leaders([a, b]) == ["pod-b"]
        assert b.changes[-1][0] <= released_at + 2
        assert kube.lease(NS, "refresher")["spec"]["leaseTransitions"] == 1
        tg.cancel_scope.cancel()


async def test_another_holder_on_the_lease_makes_the_leader_step_down(
    kube, kubeconfig, clients, clock
) -> None:
    a = elector(kubeconfig, clients, clock, "pod-a")
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        async with AsyncClient(KubeConfig.from_file(kubeconfig)) as other:
            lease = await other.get(Lease, "refresher", namespace=NS)
            assert lease.spec is not None
            lease.spec.holderIdentity = "intruder"
            lease.spec.renewTime = micro_time(clock.now())
            # lightkube re-encodes the datetime it decoded without the fraction, which
            # the API server (and the emulator) reject: always send MicroTime strings.
            lease.spec.acquireTime = micro_time(clock.now())
            await other.replace(lease)
        await advance(clock, [a], 2)
        assert not a.elector.is_leader()
        assert a.elector.holder == "intruder"
        tg.cancel_scope.cancel()


async def test_forbidden_lease_access_is_logged_with_the_rbac_fix(
    kube, kubeconfig, clients, clock, leak_guard
) -> None:
    kube.forbid("get", "leases")
    a = elector(kubeconfig, clients, clock, "pod-a")
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await advance(clock, [a], 4)
        assert not a.elector.is_leader()
        tg.cancel_scope.cancel()
    events = leak_guard.events("leader election failed")
    assert len(events) == 1  # logged once, not every retry
    assert (
        'RBAC: grant "get" on leases.coordination.k8s.io "refresher" in namespace "apps"'
        in (events[0]["error"])
    )


async def test_release_before_run_returns_at_once(kube, kubeconfig, clients, clock) -> None:
    a = elector(kubeconfig, clients, clock, "pod-a")
    await a.elector.release()
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)  # returns: a released elector never campaigns
    assert not a.elector.is_leader()
    assert kube.lease(NS, "refresher") is None
