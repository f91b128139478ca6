
"""The API emulator held to the API server's rules, and the code held to the chart's
RBAC. Each test is one rule of docs/kubernetes-emulator.md, which names its source in
the apiserver, apimachinery or client-go code."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Secret

from refresher.cli import main
from refresher.config import load_settings
from refresher.errors import ConfigError, KubernetesSinkError
from refresher.kube import KubeClients
from refresher.leader import LeaderElector, micro_time
from tests.emulators.kubernetes import KubernetesEmulator
from tests.kube_rbac import SERVICE_ACCOUNT, install_chart_rbac
from tests.kube_support import CHART_CONFIG, NS, SECRET, NoJitter, sink
from tests.test_leader import Replica, advance

pytestmark = pytest.mark.anyio


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def api(kube: KubernetesEmulator, token: str | None = None) -> httpx2.AsyncClient:
    """A raw HTTP client, to see exactly what the server answers."""
    headers = {"Authorization": f"Bearer {token or kube.token}"}
    return httpx2.AsyncClient(base_url=kube.url, headers=headers)


# ---------------------------------------------------------------------------- RBAC


async def test_the_chart_role_allows_what_the_code_does_and_nothing_else(
    kube, kubeconfig, clients, make_token
) -> None:
    """A sink's whole life under the chart's Role (create with apply, update, read
    back, remove) without a single 403; everything else the service account tries
    is refused, including a plain POST of a Secret the Role may create by name."""
    s = sink(kubeconfig, clients, extra_keys=["expires_at"])
    await s.write(make_token())
    await s.write(make_token())
    assert await s.read_back() is not None
    await s.remove()
    assert kube.calls(status=403) == []

    async with AsyncClient(KubeConfig.from_file(kubeconfig)) as client:
        denied = [
            client.get(Secret, "someone-elses", namespace=NS),
            client.delete(Secret, SECRET, namespace=NS),
            client.create(Secret(metadata=ObjectMeta(name="absent")), namespace=NS),
            client.apply(
                Secret(metadata=ObjectMeta(name="someone-elses"), data={"k": b64("v")}),
                namespace=NS,
                field_manager="refresher/k",
            ),
            client.get(Secret, SECRET, namespace="default"),
        ]
        for call in denied:
            with pytest.raises(ApiError) as caught:
                await call
            assert caught.value.status.code == 403
        with pytest.raises(ApiError) as listing:
            async for _ in client.list(Secret, namespace=NS):
                pass
        assert listing.value.status.code == 403
    # An apply may create a Secret the Role names: its create check carries the name.
    await sink(kubeconfig, clients, secret="absent").write(make_token())
    assert kube.secret(NS, "absent") is not None


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("1.31", f'secrets "{SECRET}" is forbidden: '),
        (
            "1.32",
            f'secrets "{SECRET}" is forbidden: User "{SERVICE_ACCOUNT}" cannot create '
            f'resource "secrets" in API group "" in the namespace "{NS}"',
        ),
    ],
)
async def test_a_refused_create_asks_for_create_in_both_message_forms(
    make_emulator, clock, tmp_path, clients, make_token, version, message
) -> None:
    """Without the create rule, creating a Secret through apply is refused by the
    check inside the handler; up to 1.31 its message names no verb. The sink's hint
    asks for "create" either way (never for "patch", which the Role has)."""
    kube = make_emulator(KubernetesEmulator, namespaces=[NS], clock=clock, version=version)
    install_chart_rbac(kube, CHART_CONFIG, rbac={"allowSecretCreate": False})
    config = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    async with api(kube) as http:
        assert (await http.get("/version")).json()["minor"] == version.split(".")[1]
        answer = await http.patch(
            f"/api/v1/namespaces/{NS}/secrets/{SECRET}?fieldManager=x",
            content=json.dumps(
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}}
            ),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
    assert answer.status_code == 403 and answer.json()["message"] == message
    with pytest.raises(KubernetesSinkError) as caught:
        await sink(config, clients).write(make_token())
    assert f'RBAC: grant "create" on secrets "{SECRET}" in namespace "{NS}"' in str(caught.value)
    assert caught.value.config_level


# ---------------------------------------------------------------------------- throttling


async def test_apf_rejects_in_plain_text_with_retry_after_before_authorizing(kube) -> None:
    """API Priority and Fairness answers 429 as Go's http.Error (text/plain, not a
    Status) with Retry-After, ahead of authorization."""
    kube.throttle(retry_after=3)
    kube.throttle()
    async with api(kube) as http:
        first = await http.get(f"/api/v1/namespaces/{NS}/secrets/{SECRET}")
        forbidden = await http.get(f"/api/v1/namespaces/{NS}/secrets/someone-elses")
        after = await http.get(f"/api/v1/namespaces/{NS}/secrets/someone-elses")
    assert first.status_code == 429
    assert first.headers["content-type"] == "text/plain; charset=utf-8"
    assert first.headers["retry-after"] == "3"
    assert first.text == "Too many requests, please try again later.\n"
    assert "x-kubernetes-pf-flowschema-uid" in first.headers
    assert forbidden.status_code == 429  # throttled before RBAC had a say
    assert after.status_code == 403


async def test_a_status_429_carries_retry_after_as_a_header_too(kube) -> None:
    """Other throttles answer a Status with details.retryAfterSeconds; the response
    writer copies it into Retry-After."""
    kube.fail(429, resource="secrets")
    async with api(kube) as http:
        answer = await http.get(f"/api/v1/namespaces/{NS}/secrets/{SECRET}")
    assert answer.status_code == 429
    assert answer.json()["details"]["retryAfterSeconds"] == 1
    assert answer.headers["retry-after"] == "1"


async def test_the_sink_waits_out_retry_after_and_writes(
    kube, kubeconfig, clock, make_token, leak_guard
) -> None:
    patient = KubeClients(environ={}, clock=clock)
    try:
        s = sink(kubeconfig, patient)
        await s.write(make_token())
        kube.throttle(retry_after=3, verb="patch")
        latest = make_token()
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.write, latest)
            await wait_until(lambda: kube.calls(status=429) != [])
            await clock.advance(2.9)
            assert kube.secret_data(NS, SECRET)["gooclaim"] != latest.value
            await clock.advance(0.1)
        assert kube.secret_data(NS, SECRET) == {"gooclaim": latest.value}
        patches = kube.calls(method="PATCH")
        assert [p.status for p in patches][-2:] == [429, 200]
        assert patches[-1].at - patches[-2].at == pytest.approx(3.0)
        assert leak_guard.events("kubernetes API asked to retry later: waiting")
    finally:
        await patient.aclose()


async def test_throttling_beyond_the_write_budget_says_so(
    kube, kubeconfig, clients, make_token
) -> None:
    """A Retry-After longer than a write may wait: the error says the API server
    throttled (not "not a Kubernetes Status response") and carries the delay."""
    kube.throttle(retry_after=30, verb="patch")
    with pytest.raises(KubernetesSinkError) as caught:
        await sink(kubeconfig, clients).write(make_token())
    message = str(caught.value)
    assert "throttled the request (429, retry after 30s)" in message
    assert "not a Kubernetes Status" not in message
    assert caught.value.status == 429 and caught.value.retry_after == 30
    assert not caught.value.config_level


async def test_the_elector_honours_retry_after_and_says_throttled(
    kube, kubeconfig, clients, clock, leak_guard
) -> None:
    from refresher.config import LeaderElectionConfig

    config = LeaderElectionConfig(enabled=True, kubeconfig=kubeconfig, identity="pod-a")
    a = Replica(LeaderElector(config, clients=clients, clock=clock, rng=NoJitter()), clock)
    kube.throttle(retry_after=7, resource="leases")
    started = clock.now()
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        assert not a.elector.is_leader()
        assert a.elector.waiting_until == pytest.approx(started + 7)  # not + 2 s
        await advance(clock, [a], 6.5)
        assert len(kube.calls(resource="leases")) == 1
        await advance(clock, [a], 0.5)
        assert a.elector.is_leader()
        tg.cancel_scope.cancel()
    [event] = leak_guard.events("leader election failed")
    assert "API server at" in event["error"] and "throttled the request (429" in event["error"]


# ---------------------------------------------------------------------------- Secret validation


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (".", "must not be '.'"),
        ("..", "must not be '..'"),
        ("..data", "must not start with '..'"),
        ("a b", "a valid config key must consist of alphanumeric characters"),
    ],
)
async def test_secret_data_keys_are_checked_like_configmap_keys(
    kube, admin_kubeconfig, key, problem
) -> None:
    async with AsyncClient(KubeConfig.from_file(admin_kubeconfig)) as client:
        with pytest.raises(ApiError) as caught:
            await client.create(
                Secret(metadata=ObjectMeta(name="keys"), data={key: b64("v")}), namespace=NS
            )
    assert caught.value.status.code == 422
    assert f'Secret "keys" is invalid: data[{key}]: Invalid value: "{key}": {problem}' in (
        caught.value.status.message or ""
    )


async def test_secret_data_may_not_exceed_one_mebibyte(kube, admin_kubeconfig) -> None:
    half = "x" * (512 * 1024)
    async with AsyncClient(KubeConfig.from_file(admin_kubeconfig)) as client:
        await client.create(
            Secret(metadata=ObjectMeta(name="big"), data={"a": b64(half), "b": b64(half)}),
            namespace=NS,
        )
        with pytest.raises(ApiError) as caught:
            await client.create(
                Secret(
                    metadata=ObjectMeta(name="bigger"), data={"a": b64(half + "x"), "b": b64(half)}
                ),
                namespace=NS,
            )
    assert caught.value.status.code == 422
    assert caught.value.status.message == (
        'Secret "bigger" is invalid: data: Too long: may not be more than 1048576 bytes'
    )


@pytest.mark.parametrize(
    ("secret_type", "data", "message"),
    [
        ("kubernetes.io/tls", {"tls.crt": "x"}, "data[tls.key]: Required value"),
        (
            "kubernetes.io/tls",
            {"token": "x"},
            "[data[tls.crt]: Required value, data[tls.key]: Required value]",
        ),
        (
            "kubernetes.io/basic-auth",
            {"token": "x"},
            "[data[username]: Required value, data[password]: Required value]",
        ),
        ("kubernetes.io/ssh-auth", {"ssh-privatekey": ""}, "data[ssh-privatekey]: Required value"),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": "a-token"},
            'data[.dockerconfigjson]: Invalid value: "<secret contents redacted>"',
        ),
        (
            "kubernetes.io/service-account-token",
            {"token": "x"},
            "metadata.annotations[kubernetes.io/service-account.name]: Required value",
        ),
    ],
)
async def test_builtin_secret_types_require_their_keys(
    kube, admin_kubeconfig, secret_type, data, message
) -> None:
    async with AsyncClient(KubeConfig.from_file(admin_kubeconfig)) as client:
        with pytest.raises(ApiError) as caught:
            await client.create(
                Secret(
                    metadata=ObjectMeta(name="typed"),
                    type=secret_type,
                    data={k: b64(v) for k, v in data.items()},
                ),
                namespace=NS,
            )
    assert caught.value.status.code == 422
    assert (caught.value.status.message or "").startswith(f'Secret "typed" is invalid: {message}')


async def test_a_sink_writes_a_typed_secret_whose_key_it_provides(
    kube, kubeconfig, clients, make_token
) -> None:
    token = make_token()
    await sink(kubeconfig, clients, key="password", type="kubernetes.io/basic-auth").write(token)
    assert kube.secret(NS, SECRET)["type"] == "kubernetes.io/basic-auth"
    assert kube.secret_data(NS, SECRET) == {"password": token.value}


def typed_job(secret_type: str, key: str = "{job}") -> dict[str, Any]:
    return {
        "name": "api",
        "provider": {
            "kind": "oauth2",
            "token_url": "https://auth.example.com/token",
            "client_id": "c",
            "client_secret": "s",
        },
        "sinks": [
            {
                "kind": "kubernetes",
                "namespace": NS,
                "secret": SECRET,
                "key": key,
                "type": secret_type,
            }
        ],
    }


@pytest.mark.parametrize(
    ("secret_type", "key", "problem"),
    [
        ("kubernetes.io/tls", "tls.crt", "needs both 'tls.crt' and 'tls.key'"),
        ("kubernetes.io/basic-auth", "{job}", "needs the data key 'username' or 'password'"),
        ("kubernetes.io/ssh-auth", "token", "needs the data key 'ssh-privatekey'"),
        ("kubernetes.io/dockerconfigjson", ".dockerconfigjson", "needs a Docker config JSON"),
        ("kubernetes.io/service-account-token", "token", "is filled by Kubernetes"),
    ],
)
def test_check_refuses_a_secret_type_whose_keys_the_sink_does_not_write(
    tmp_path: Path, capsys: Any, secret_type: str, key: str, problem: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"jobs": [typed_job(secret_type, key)]}))
    assert main(["check", "--no-files", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"sinks[0].type '{secret_type}' {problem}" in err


def test_secret_types_the_sink_can_satisfy_are_accepted() -> None:
    for secret_type, key in [
        ("Opaque", "{job}"),
        ("example.com/custom", "{job}"),
        ("kubernetes.io/basic-auth", "password"),
        ("kubernetes.io/ssh-auth", "ssh-privatekey"),
    ]:
        load_settings(data={"jobs": [typed_job(secret_type, key)]})
    with pytest.raises(ConfigError):
        load_settings(data={"jobs": [typed_job("kubernetes.io/basic-auth", "token")]})


# ---------------------------------------------------------------------------- Lease updates


def lease_body(holder: str = "x", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "refresher", **meta},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
    }


async def test_a_lease_put_needs_a_resource_version_and_may_create(kube) -> None:
    """Leases: PUT to an absent Lease creates it (authorized as create too); PUT
    without metadata.resourceVersion is 422; with a stale one 409."""
    url = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/refresher"
    async with api(kube) as http:
        created = await http.put(url, json=lease_body())
        unconditional = await http.put(url, json=lease_body())
        current = created.json()["metadata"]["resourceVersion"]
        updated = await http.put(url, json=lease_body("y", resourceVersion=current))
        stale = await http.put(url, json=lease_body("z", resourceVersion=current))
    assert created.status_code == 201
    assert unconditional.status_code == 422
    assert unconditional.json()["message"] == (
        'leases.coordination.k8s.io "refresher" is invalid: metadata.resourceVersion: '
        "Invalid value: 0: must be specified for an update"
    )
    assert updated.status_code == 200
    assert stale.status_code == 409


async def test_a_secret_put_never_creates(kube) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}}
    async with api(kube, kube.admin_token) as http:
        answer = await http.put(f"/api/v1/namespaces/{NS}/secrets/{SECRET}", json=body)
    assert answer.status_code == 404


async def test_the_elector_keeps_lease_metadata_it_did_not_set(
    kube, kubeconfig, admin_kubeconfig, clients, clock
) -> None:
    """client-go's LeaseLock replaces only the spec: labels, annotations, owner
    references and finalizers that others set survive acquisition and renewals."""
    owner = OwnerReference(apiVersion="v1", kind="ConfigMap", name="owner", uid="1234")
    async with AsyncClient(KubeConfig.from_file(admin_kubeconfig)) as admin:
        await admin.create(
            Lease(
                metadata=ObjectMeta(
                    name="refresher",
                    labels={"team": "payments"},
                    annotations={"note": "keep"},
                    ownerReferences=[owner],
                    finalizers=["example.com/keep"],
                ),
                spec=LeaseSpec(holderIdentity="", leaseDurationSeconds=1),
            ),
            namespace=NS,
        )
    from refresher.config import LeaderElectionConfig

    config = LeaderElectionConfig(enabled=True, kubeconfig=kubeconfig, identity="pod-a")
    a = Replica(LeaderElector(config, clients=clients, clock=clock, rng=NoJitter()), clock)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await advance(clock, [a], 6)
        assert a.elector.is_leader()
        tg.cancel_scope.cancel()
    lease = kube.lease(NS, "refresher")
    meta = lease["metadata"]
    assert lease["spec"]["holderIdentity"] == "pod-a"
    assert meta["labels"] == {"team": "payments"}
    assert meta["annotations"] == {"note": "keep"}
    assert meta["finalizers"] == ["example.com/keep"]
    assert meta["ownerReferences"][0]["name"] == "owner"


# ---------------------------------------------------------------------------- field ownership


async def test_the_creator_owns_a_defaulted_type_an_applier_does_not(
    kube, admin_kubeconfig
) -> None:
    """An Update's field manager diffs the defaulted object (it owns ``type``); an
    applier owns only what it applied."""
    async with AsyncClient(KubeConfig.from_file(admin_kubeconfig)) as client:
        await client.create(
            Secret(metadata=ObjectMeta(name="made"), data={"a": b64("1")}),
            namespace=NS,
            field_manager="kubectl-create",
        )
        await client.apply(
            Secret(metadata=ObjectMeta(name="applied"), data={"a": b64("1")}),
            namespace=NS,
            field_manager="tool",
        )
    assert ".type" in kube.managers("secrets", NS, "made")["kubectl-create"]
    assert ".type" not in kube.managers("secrets", NS, "applied")["tool"]
    assert kube.secret(NS, "applied")["type"] == "Opaque"


async def test_a_noop_apply_changes_nothing_timestamps_included(
    kube, kubeconfig, clients, clock, make_token
) -> None:
    token = make_token()
    s = sink(kubeconfig, clients)
    await s.write(token)
    before = kube.secret(NS, SECRET)
    await clock.advance(120)
    await s.write(token)
    assert kube.secret(NS, SECRET) == before


async def test_an_apply_with_a_resource_version_creates_an_absent_secret(
    kube, admin_kubeconfig
) -> None:
    """A resourceVersion is a precondition on an update only: an apply that creates
    ignores it (the registry wipes it before creating)."""
    async with AsyncClient(KubeConfig.from_file(admin_kubeconfig)) as client:
        created = await client.apply(
            Secret(
                metadata=ObjectMeta(name="fresh", resourceVersion="12345"), data={"a": b64("1")}
            ),
            namespace=NS,
            field_manager="tool",
        )
    assert created.metadata is not None and created.metadata.resourceVersion != "12345"
    assert kube.secret(NS, "fresh") is not None


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


# ---------------------------------------------------------------------------- emulator protocol


async def test_emulator_speaks_status_errors_and_resource_versions(
    kube, kubeconfig, admin_kubeconfig
) -> None:
    async with AsyncClient(KubeConfig.from_file(admin_kubeconfig)) as client:
        with pytest.raises(ApiError) as missing:
            await client.get(Secret, "nothing", namespace=NS)
        assert missing.value.status.code == 404
        assert missing.value.status.reason == "NotFound"
        assert missing.value.status.message == 'secrets "nothing" not found'

        created = await client.create(
            Secret(metadata=ObjectMeta(name="s"), stringData={"a": "1"}), namespace=NS
        )
        assert created.data == {"a": base64.b64encode(b"1").decode()}
        with pytest.raises(ApiError) as exists:
            await client.create(Secret(metadata=ObjectMeta(name="s")), namespace=NS)
        assert exists.value.status.reason == "AlreadyExists"

        fresh = await client.get(Secret, "s", namespace=NS)
        fresh.data = {"a": base64.b64encode(b"2").decode()}
        await client.replace(fresh)
        with pytest.raises(ApiError) as stale:
            await client.replace(fresh)  # same (now stale) resourceVersion
        assert stale.value.status.code == 409

        # Server-side apply conflicts with another manager's field unless forced.
        with pytest.raises(ApiError) as conflict:
            await client.apply(
                Secret(metadata=ObjectMeta(name="s"), data={"a": base64.b64encode(b"3").decode()}),
                namespace=NS,
                field_manager="other",
            )
        assert conflict.value.status.code == 409
        assert "Apply failed with 1 conflict" in (conflict.value.status.message or "")

    bad = kube.write_kubeconfig(kubeconfig.parent / "bad", namespace=NS, token="wrong")
    async with AsyncClient(KubeConfig.from_file(bad)) as client:
        with pytest.raises(ApiError) as unauthorized:
            await client.get(Secret, "s", namespace=NS)
        assert unauthorized.value.status.code == 401


async def test_emulator_rejects_lease_times_without_microseconds(kube, kubeconfig, clock) -> None:
    from datetime import UTC, datetime

    whole_second = datetime.fromtimestamp(int(clock.now()), UTC)
    async with AsyncClient(KubeConfig.from_file(kubeconfig)) as client:
        # What lightkube sends for a datetime with zero microseconds: the real API
        # server's RFC3339Micro parser refuses it, hence refresher.leader.micro_time.
        with pytest.raises(ApiError) as caught:
            await client.create(
                Lease(metadata=ObjectMeta(name="l"), spec=LeaseSpec(renewTime=whole_second)),
                namespace=NS,
            )
        assert caught.value.status.code == 400
        ok = await client.create(
            Lease(metadata=ObjectMeta(name="l"), spec=LeaseSpec(renewTime=micro_time(clock.now()))),
            namespace=NS,
        )
        assert ok.spec is not None and ok.spec.renewTime == whole_second




async def test_emulator_answers_unknown_paths_with_a_status(kube) -> None:
    import httpx2

    async with httpx2.AsyncClient(
        base_url=kube.url, headers={"Authorization": f"Bearer {kube.token}"}
    ) as http:
        response = await http.get("/api/v1/namespaces/apps/configmaps/x")
        namespace = await http.get("/api/v1/namespaces/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"  # lightkube needs exactly this
    assert response.json()["kind"] == "Status" and response.json()["reason"] == "NotFound"
    assert namespace.json()["details"] == {"name": "nope", "kind": "namespaces"}
