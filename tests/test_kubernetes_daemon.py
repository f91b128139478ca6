"""Whole daemons against the Kubernetes API emulator: a Secret kept fresh, and two
replicas with leader election where exactly one writes and a follower takes over
from a killed leader without re-minting valid tokens. Driven only through lightkube
with generated kubeconfigs; time is the injected clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from tests.conftest import CLIENT_ID, CLIENT_SECRET, get_json, wait_for
from tests.emulators.kubernetes import KubernetesEmulator
from tests.kube_rbac import SERVICE_ACCOUNT, install_chart_rbac

pytestmark = pytest.mark.anyio
NS = "apps"


@pytest.fixture
def kube(make_emulator, clock) -> KubernetesEmulator:
    return make_emulator(KubernetesEmulator, namespaces=[NS], clock=clock)


def config(
    oauth2, kube: KubernetesEmulator, tmp_path: Path, identity: str, *, leader: bool
) -> dict[str, Any]:
    """A replica's config; every replica runs as the chart's service account, with the
    chart's RBAC for this config (each replica has its own token, as pods do)."""
    kube.add_token(f"sa-token-{identity}", SERVICE_ACCOUNT)
    kubeconfig = kube.write_kubeconfig(
        tmp_path / f"kubeconfig-{identity}",
        namespace=NS,
        token=f"sa-token-{identity}",
        user=identity,
    )
    data: dict[str, Any] = {
        "jobs": [
            {
                "name": "api",
                "provider": {
                    "kind": "oauth2",
                    "token_url": oauth2.token_url,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                },
                "sinks": [
                    {
                        "kind": "kubernetes",
                        "namespace": NS,
                        "secret": "partner-tokens",
                        "key": "api",
                        "kubeconfig": str(kubeconfig),
                        "extra_keys": ["expires_at"],
                    }
                ],
            }
        ],
    }
    if leader:
        data["leader_election"] = {
            "enabled": True,
            "namespace": NS,
            "lease_name": "refresher",
            "identity": identity,
            "kubeconfig": str(kubeconfig),
        }
    install_chart_rbac(kube, data)
    return data


async def advance_to(clock, moment: float, leader) -> None:
    """Walk the clock in 1 s steps, as real time would pass, letting the leader's
    lease renewal (every 2 s, over HTTP) complete before time moves on."""
    while clock.now() < moment:
        await clock.set(min(moment, clock.now() + 1))
        await wait_for(lambda: clock.now() - leader.elector._renewed_at <= 2.0 + 1e-6)


async def post(daemon, path: str) -> httpx2.Response:
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}") as client:
        return await client.post(path)


def secret_writes(kube: KubernetesEmulator, identity: str) -> int:
    """Writes sent with `identity`'s token (a replica's own service-account token)."""
    bearer = f"Bearer sa-token-{identity}"
    return sum(
        1
        for r in kube.calls(resource="secrets")
        if r.method in ("PATCH", "POST", "PUT") and r.headers.get("authorization") == bearer
    )


async def test_secret_kept_fresh_and_restart_does_not_mint(
    start_daemon, oauth2_emulator, kube, clock, tmp_path
) -> None:
    cfg = config(oauth2_emulator, kube, tmp_path, "pod-a", leader=False)
    async with start_daemon(cfg) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert rt.unwritten == [], rt.failure_message
        data = kube.secret_data(NS, "partner-tokens")
        assert data["api"] == rt.token.value and "api.expires_at" in data
        secret = kube.secret(NS, "partner-tokens")
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "refresher"
        assert (
            secret["metadata"]["annotations"]["refresher.io/api.fingerprint"]
            == rt.token.fingerprint()
        )
        await clock.set(rt.next_refresh_at)
        await wait_for(lambda: oauth2_emulator.count() == 2 and rt.refreshing is None)
        assert kube.secret_data(NS, "partner-tokens")["api"] == rt.token.value
    async with start_daemon(cfg) as daemon:
        assert daemon.scheduler.jobs[("api", None)].token is not None
        assert oauth2_emulator.count() == 2, "restart re-minted a token the Secret still holds"


async def test_two_replicas_one_writer_followers_refuse_forced_refreshes_and_takeover_without_re_mint(
    start_daemon, oauth2_emulator, kube, clock, tmp_path
) -> None:
    daemons: dict[str, Any] = {}
    stops = {"pod-a": anyio.Event(), "pod-b": anyio.Event()}

    async def replica(identity: str) -> None:
        async with start_daemon(
            config(oauth2_emulator, kube, tmp_path, identity, leader=True)
        ) as daemon:
            daemons[identity] = daemon
            await stops[identity].wait()

    oauth2_emulator.token_lifetime = 60
    async with anyio.create_task_group() as tg:
        tg.start_soon(replica, "pod-a")
        await wait_for(lambda: "pod-a" in daemons and daemons["pod-a"].elector.is_leader())
        a = daemons["pod-a"]
        rt_a = a.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt_a.token is not None and rt_a.refreshing is None)
        tg.start_soon(replica, "pod-b")
        await wait_for(lambda: "pod-b" in daemons)
        b = daemons["pod-b"]
        # The follower is live and ready, reports is_leader 0, and never writes.
        status, body = await get_json(b, "/readyz")
        assert status == 200 and body["role"] == "follower"
        assert "refresher_is_leader 0.0" in (await get_json(b, "/metrics"))[1]
        assert "refresher_is_leader 1.0" in (await get_json(a, "/metrics"))[1]
        # Behind the Service, consumers reach the follower too: it refuses to mint or
        # write, names the leader, and says when to retry.
        refused = await post(b, "/v1/tokens/api/refresh")
        assert refused.status_code == 503
        assert refused.json() == {"error": "not the leader", "leader": "pod-a"}
        assert refused.headers["retry-after"] == "2"
        assert oauth2_emulator.count() == 1 and secret_writes(kube, "pod-b") == 0
        for cycle in range(1, 4):  # three refresh cycles: only the leader writes
            await advance_to(clock, rt_a.next_refresh_at, a)
            await wait_for(
                lambda c=cycle: oauth2_emulator.count() == 1 + c and rt_a.refreshing is None
            )
        assert secret_writes(kube, "pod-a") >= 3 and secret_writes(kube, "pod-b") == 0
        mints = oauth2_emulator.count()
        assert mints == 4

        # Kill the leader: no lease release, it just stops.
        async def no_release() -> None:
            return None

        a.elector.release = no_release
        killed_at = clock.now()
        stops["pod-a"].set()
        await wait_for(lambda: a.scheduler.is_active() is False)
        while not b.elector.is_leader():
            # the follower saw the last renewal within one jittered retry period (up to
            # 2 s x 2.2) and takes over at the first retry after lease 15 s from then,
            # + one step of slack for the HTTP round trip
            assert clock.now() - killed_at <= 4.4 + 15 + 4.4 + 0.5, (
                "follower did not take over in time"
            )
            await clock.advance(0.5)
            await anyio.sleep(0.05)
        took_over = clock.now() - killed_at
        assert took_over > 10, "took over before the old lease could have expired"
        await wait_for(lambda: b.leadership.leading)
        rt_b = b.scheduler.jobs[("api", None)]
        assert rt_b.token is not None and rt_b.token.value == rt_a.token.value
        assert oauth2_emulator.count() == mints, "new leader re-minted a valid token"
        await advance_to(clock, rt_b.next_refresh_at, b)
        await wait_for(lambda: oauth2_emulator.count() == mints + 1 and rt_b.refreshing is None)
        assert secret_writes(kube, "pod-b") >= 1
        assert kube.secret_data(NS, "partner-tokens")["api"] == rt_b.token.value
        # The new leader takes forced refreshes.
        assert (await post(b, "/v1/tokens/api/refresh")).status_code == 200
        assert kube.secret_data(NS, "partner-tokens")["api"] == rt_b.token.value
        assert oauth2_emulator.count() == mints + 2
        stops["pod-b"].set()
