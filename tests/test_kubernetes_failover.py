"""One writer, always: leader election under clock skew, a leader paused past its renew
deadline (in process and with SIGSTOP on a real process), a stale leader's write in
flight, client-go's retry jitter, and a scheduler that refuses forced refreshes when
it does not refresh. Every test runs against the API emulator with the chart's RBAC."""


from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml

from refresher.clock import ManualClock
from refresher.config import LeaderElectionConfig, RefreshConfig
from refresher.errors import ConfigError, LeadershipLostError, NotActiveError
from refresher.kube import KubeClients
from refresher.leader import LeaderElector
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.runtime import JobRuntime
from refresher.scheduler import Scheduler
from refresher.server import create_app
from refresher.token import Token, fingerprint
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for
from tests.emulators.kubernetes import KubernetesEmulator
from tests.emulators.oauth2 import OAuth2Emulator
from tests.kube_rbac import SERVICE_ACCOUNT, install_chart_rbac
from tests.kube_support import NS, SECRET, NoJitter, sink
from tests.test_leader import Replica, advance, leaders, settle

pytestmark = pytest.mark.anyio


class SkewedClock:
    """One node's clock: the shared manual clock plus a fixed offset (NTP gone wrong)."""

    def __init__(self, base: ManualClock, offset: float) -> None:
        self.base = base
        self.offset = offset

    def now(self) -> float:
        return self.base.now() + self.offset

    async def sleep_until(self, deadline: float) -> None:
        await self.base.sleep_until(deadline - self.offset)


def replica(
    kubeconfig: Path, clients: KubeClients, clock: Any, identity: str, **timing: float
) -> Replica:
    config = LeaderElectionConfig(enabled=True, kubeconfig=kubeconfig, identity=identity, **timing)
    return Replica(LeaderElector(config, clients=clients, clock=clock, rng=NoJitter()), clock)


# ---------------------------------------------------------------------------- clock skew


@pytest.mark.parametrize(
    ("leader_offset", "follower_offset"),
    [(0, 60), (0, -60), (60, 0), (-60, 0)],
    ids=["follower-ahead", "follower-behind", "leader-ahead", "leader-behind"],
)
async def test_skewed_clocks_never_make_two_leaders_and_never_delay_takeover(
    kube, kubeconfig, clients, clock, leader_offset, follower_offset
) -> None:
    """Clocks a minute apart either way: while the leader renews, the follower never
    leads; once the leader dies, the follower takes over one lease after it last saw a
    renewal, by its own clock (client-go's observedTime), not a minute early or late."""
    a = replica(kubeconfig, clients, SkewedClock(clock, leader_offset), "pod-a")
    b = replica(kubeconfig, clients, SkewedClock(clock, follower_offset), "pod-b")
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        for _ in range(60):  # 30 s of renewals
            assert leaders([a, b]) == ["pod-a"]
            await advance(clock, [a, b], 0.5)
        a.scope.cancel()  # killed: no release
        await settle([a, b])
        killed_at = clock.now()  # pod-a renewed at most 2 s before
        while not b.elector.is_leader():
            assert clock.now() <= killed_at + 2 + 15 + 2, "follower did not take over in time"
            await advance(clock, [a, b], 0.5)
        assert clock.now() > killed_at - 2 + 15, "took over before the lease could expire"
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------------------- paused leader


async def test_no_write_begins_after_the_renew_deadline(
    kube, kubeconfig, clients, clock, make_token
) -> None:
    """A leader whose renewals stop (a GC stall, a partition) sends its last write
    before `last renew + renew_deadline` and none after: checked right before the
    request, from the clock, whatever the elector's own task is doing."""
    a = replica(kubeconfig, clients, clock, "pod-a")
    s = sink(kubeconfig, clients)
    s.may_write = a.elector.is_leader
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        renewed_at = clock.now()
        kube.fail(500, count=10_000, resource="leases")  # no more renewals
        await clock.set(renewed_at + 10 - 0.001)
        await s.write(make_token())  # still within the deadline: written
        before = len(kube.requests)
        await clock.set(renewed_at + 10)
        with pytest.raises(LeadershipLostError, match="no longer the leader"):
            await s.write(make_token())
        assert len(kube.requests) == before, "a request was sent after the renew deadline"
        tg.cancel_scope.cancel()


async def test_a_stale_leaders_write_in_flight_fails_instead_of_overwriting(
    kube, kubeconfig, clock, make_token
) -> None:
    """pod-a sends a write, then stalls; its request is still on the way when pod-b
    has taken over and written. The Secret keeps pod-b's token: pod-a's apply carries
    the resourceVersion it last saw (409), and it does not retry once it is no longer
    the leader."""
    a_clients, b_clients = KubeClients(environ={}), KubeClients(environ={})
    try:
        a = replica(kubeconfig, a_clients, clock, "pod-a")
        b = replica(kubeconfig, b_clients, clock, "pod-b")
        sink_a, sink_b = sink(kubeconfig, a_clients), sink(kubeconfig, b_clients)
        sink_a.may_write, sink_b.may_write = a.elector.is_leader, b.elector.is_leader
        async with anyio.create_task_group() as tg:
            await tg.start(a.run)
            await tg.start(b.run)
            await sink_a.write(make_token())
            stale, fresh = make_token(), make_token()
            held = kube.hold(verb="patch", resource="secrets")
            outcome: list[BaseException | None] = []

            async def stale_write() -> None:
                try:
                    await sink_a.write(stale)
                    outcome.append(None)
                except LeadershipLostError as exc:
                    outcome.append(exc)

            tg.start_soon(stale_write)
            await wait_for(held.arrived.is_set)  # on the server, not yet processed
            a.scope.cancel()  # pod-a stalls: no renewals, no release
            while not b.elector.is_leader():
                await advance(clock, [a, b], 0.5)
            await sink_b.read_back()  # the new leader adopts what it finds ...
            await sink_b.write(fresh)  # ... and writes
            held.release()  # pod-a's request finally gets processed
            await wait_for(lambda: bool(outcome))
            assert isinstance(outcome[0], LeadershipLostError)
            assert kube.secret_data(NS, SECRET) == {"gooclaim": fresh.value}
            patches = kube.calls(method="PATCH")
            # By arrival: pod-a's create, pod-a's stale write, pod-b's write; pod-a's was
            # processed last, refused, and not sent again.
            assert [c.status for c in sorted(patches, key=lambda c: c.at)] == [201, 409, 200]
            assert [c.status for c in patches] == [201, 200, 409]
            tg.cancel_scope.cancel()
    finally:
        await a_clients.aclose()
        await b_clients.aclose()


# ---------------------------------------------------------------------------- jitter


async def test_followers_retry_with_client_go_jitter(kube, kubeconfig, clients, clock) -> None:
    """The leader renews every retry period; a follower waits retry x [1, 2.2) after
    each attempt (client-go's JitterUntil with JitterFactor 1.2), spread at random."""
    a = replica(kubeconfig, clients, clock, "pod-a")
    config = LeaderElectionConfig(enabled=True, kubeconfig=kubeconfig, identity="pod-b")
    b = Replica(LeaderElector(config, clients=clients, clock=clock, rng=random.Random(3)), clock)
    waits: dict[str, list[float]] = {"pod-a": [], "pod-b": []}
    for r in (a, b):
        planned = r.elector._next_attempt

        def record(attempt_at: float, r: Replica = r, planned: Any = planned) -> float:
            moment: float = planned(attempt_at)
            waits[r.elector.identity].append(moment - attempt_at)
            return moment

        r.elector._next_attempt = record  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        await advance(clock, [a, b], 40)
        tg.cancel_scope.cancel()
    assert set(waits["pod-a"]) == {2.0}
    assert len(waits["pod-b"]) >= 8
    assert all(2.0 <= w < 2.0 * 2.2 for w in waits["pod-b"])
    assert max(waits["pod-b"]) - min(waits["pod-b"]) > 0.5, "no jitter"


def test_renew_deadline_must_exceed_the_jittered_retry_period() -> None:
    """client-go refuses renewDeadline <= JitterFactor x retryPeriod: a leader must get
    at least one jittered retry in before it gives up."""
    with pytest.raises(ValueError, match=r"renew_deadline must be greater than 1.2 x retry_period"):
        LeaderElectionConfig(lease_duration=15, renew_deadline=2.4, retry_period=2)
    LeaderElectionConfig(lease_duration=15, renew_deadline=2.5, retry_period=2)
    with pytest.raises(ValueError, match="lease_duration must be greater than renew_deadline"):
        LeaderElectionConfig(lease_duration=10, renew_deadline=10, retry_period=2)


def test_bad_leader_timing_is_a_config_error_naming_the_section(tmp_path: Path) -> None:
    from refresher.config import load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(data={"leader_election": {"renew_deadline": "2s", "retry_period": "2s"}})
    assert "leader_election" in " ".join(caught.value.errors)


# ---------------------------------------------------------------------------- forced refreshes


class _MustNotMint:
    kind = "oauth2"
    credential = "c"
    rate_limit = None
    max_concurrency = None

    async def fetch(self, *args: object, **kwargs: object) -> Token:
        raise AssertionError("an inactive scheduler must not mint")

    def secrets(self) -> list[str]:
        return []

    def secret_files(self) -> list[Path]:
        return []


async def test_force_refuses_when_the_scheduler_is_not_active(clock) -> None:
    """Defence in depth: whatever the HTTP layer does, a scheduler that does not
    refresh (a follower, a daemon shutting down) refuses forced refreshes."""
    active = False
    scheduler = Scheduler(
        RefreshConfig(),
        clock=clock,
        metrics=Metrics(),
        redactor=Redactor(),
        is_active=lambda: active,
    )
    scheduler.add(JobRuntime(job="api", tenant=None, provider=_MustNotMint(), sinks=[]))
    with pytest.raises(NotActiveError):
        await scheduler.feedback.force("api")
    with pytest.raises(KeyError):  # an unknown job is still a 404, not a 503
        await scheduler.feedback.force("nope")
    # The HTTP layer maps it to 503 even when the leader check passed (shutting down).
    app = create_app(scheduler, Metrics(), is_leader=lambda: True, leader=lambda: "pod-a")
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/v1/tokens/api/refresh")
    assert response.status_code == 503
    assert response.json() == {"error": "not refreshing now", "leader": "pod-a"}
    assert response.headers["retry-after"] == "2"


# ---------------------------------------------------------------------------- real processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Short, but with room for a loaded machine: a leader stalled 2 s steps down.
LEASE, RENEW_DEADLINE = 3, 2


def _until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform != "linux", reason="SIGSTOP/SIGCONT semantics")
def test_sigstopped_leader_resumes_as_a_follower_and_sends_no_write(
    tmp_path: Path, leak_guard: Any
) -> None:
    """Two `refresher run` processes on one Lease (lease 3 s, renew deadline 2 s). The
    leader is SIGSTOPped until the follower has taken over and written. Resumed, the
    old leader sends no Secret write after its renew deadline, answers forced refreshes
    with 503 naming the new leader, and reports itself a follower."""
    (tmp_path / "secret").write_text(CLIENT_SECRET + "\n")
    with (
        OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=8) as oauth2,
        KubernetesEmulator(namespaces=[NS]) as kube,
    ):
        leak_guard.emulators.extend([oauth2, kube])
        procs: dict[str, subprocess.Popen[bytes]] = {}
        ports = {"pod-a": _free_port(), "pod-b": _free_port()}

        def start(identity: str) -> None:
            token = f"sa-token-{identity}"
            kube.add_token(token, SERVICE_ACCOUNT)
            kubeconfig = kube.write_kubeconfig(
                tmp_path / f"kubeconfig-{identity}", namespace=NS, token=token, user=identity
            )
            config: dict[str, Any] = {
                "server": {"listen": f"127.0.0.1:{ports[identity]}"},
                "logging": {"format": "json"},
                "refresh": {"min_remaining": "2s", "jitter": 0},
                "jobs": [
                    {
                        "name": "api",
                        "provider": {
                            "kind": "oauth2",
                            "token_url": oauth2.token_url,
                            "client_id": CLIENT_ID,
                            "client_secret_file": str(tmp_path / "secret"),
                        },
                        "sinks": [
                            {
                                "kind": "kubernetes",
                                "secret": SECRET,
                                "key": "api",
                                "kubeconfig": str(kubeconfig),
                            }
                        ],
                    }
                ],
                "leader_election": {
                    "enabled": True,
                    "namespace": NS,
                    "identity": identity,
                    "kubeconfig": str(kubeconfig),
                    "lease_duration": f"{LEASE}s",
                    "renew_deadline": f"{RENEW_DEADLINE}s",
                    "retry_period": "0.5s",
                },
            }
            install_chart_rbac(kube, config)
            path = tmp_path / f"{identity}.yaml"
            path.write_text(yaml.safe_dump(config))
            log = (tmp_path / f"{identity}.log").open("w")
            procs[identity] = subprocess.Popen(
                [sys.executable, "-m", "refresher", "run", "--config", str(path)],
                stdout=log,
                stderr=log,
            )

        def writes(identity: str, *, ok: bool = False) -> list[Any]:
            bearer = f"Bearer sa-token-{identity}"
            return [
                r
                for r in kube.calls(resource="secrets", method="PATCH")
                if r.headers.get("authorization") == bearer and (not ok or r.status < 300)
            ]

        def lease_puts(identity: str) -> list[Any]:
            bearer = f"Bearer sa-token-{identity}"
            return [
                r
                for r in kube.calls(resource="leases")
                if r.method in ("PUT", "POST")
                and r.headers.get("authorization") == bearer
                and 200 <= r.status < 300
            ]

        def get(identity: str, path: str) -> httpx2.Response:
            return httpx2.get(f"http://127.0.0.1:{ports[identity]}{path}", timeout=5)

        try:
            start("pod-a")
            start("pod-b")

            def holder() -> str | None:
                lease = kube.lease(NS, "refresher") or {"spec": {}}
                return lease["spec"].get("holderIdentity")

            _until(lambda: holder() in procs and writes(holder(), ok=True), 60, "a writer")
            old = holder()
            new = "pod-b" if old == "pod-a" else "pod-a"
            _until(lambda: _answers(get, new, "/readyz") == "follower", what=f"{new} following")
            os.kill(procs[old].pid, signal.SIGSTOP)
            try:
                # The follower takes over once the lease expires (by its clock); asked to,
                # it mints and writes at once.
                _until(lambda: holder() == new, what=f"{new} taking over")
                url = f"http://127.0.0.1:{ports[new]}/v1/tokens/api/refresh"
                _until(lambda: httpx2.post(url, timeout=5).status_code == 200, what="a refresh")
                assert writes(new, ok=True)
            finally:
                os.kill(procs[old].pid, signal.SIGCONT)
            resumed_at = time.time()
            answers: list[httpx2.Response] = []

            def refused() -> bool:
                url = f"http://127.0.0.1:{ports[old]}/v1/tokens/api/refresh"
                answers.append(httpx2.post(url, timeout=5))
                return answers[-1].json().get("leader") == new

            _until(refused, what=f"{old} naming the new leader")
            assert {a.status_code for a in answers} == {503}, answers[-1].text
            assert answers[-1].json() == {"error": "not the leader", "leader": new}
            assert answers[-1].headers["retry-after"] == "1"
            assert _answers(get, old, "/readyz") == "follower"
            time.sleep(0.5)  # room for anything the old leader would still send
            # Its renew deadline: its last successful renew began before that request
            # arrived, + RENEW_DEADLINE. No write of its began after it; one it began
            # before (stopped between its check and the send) arrives late and is
            # refused for its stale resourceVersion.
            renewals = [r.at for r in lease_puts(old) if r.at < resumed_at]
            deadline = max(renewals, default=0.0) + RENEW_DEADLINE
            late = [(r.at - deadline, r.status) for r in writes(old) if r.at > deadline]
            assert all(status == 409 for _, status in late), f"{old} wrote late: {late}"
            assert holder() == new
            secret = kube.secret_data(NS, SECRET)["api"]
            status = json.loads(get(new, "/v1/tokens").text)["jobs"][0]
            assert status["fingerprint"] == fingerprint(secret)
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for identity in procs:
                leak_guard.extra_outputs.append((tmp_path / f"{identity}.log").read_text())


def _answers(get: Any, identity: str, path: str) -> str | None:
    try:
        response = get(identity, path)
    except httpx2.HTTPError:
        return None
    role: str | None = response.json().get("role", "leader")
    return role
