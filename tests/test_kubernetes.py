"""The Kubernetes Secret sink, through lightkube against the loopback API emulator
(real HTTP, real kubeconfig / in-cluster config, no mocks)."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from refresher.config import KubernetesSinkConfig, RefreshConfig
from refresher.errors import ConfigError, KubernetesSinkError, SinkError
from refresher.kube import KubeClients, ServiceAccountTokenAuth
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.runtime import JobRuntime
from refresher.scheduler import Scheduler
from refresher.sinks.base import TokenSink
from refresher.sinks.kubernetes import (
    CONFLICT_ATTEMPTS,
    KubernetesSink,
    annotation_key,
    token_from_secret,
)
from refresher.token import Token, rfc3339
from tests.emulators.kubernetes import KubernetesEmulator
from tests.kube_rbac import install_chart_rbac
from tests.kube_support import (
    CHART_CONFIG,
    NS,
    SECRET,
    sink,
    stored,
)

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------- the sink


async def test_sink_satisfies_protocol_and_names_its_target(kubeconfig, clients) -> None:
    s = sink(kubeconfig, clients)
    assert isinstance(s, TokenSink)
    assert s.kind == "kubernetes"
    assert s.target == f"secret/{NS}/{SECRET}#gooclaim"
    assert s.namespace == NS  # the kubeconfig context's namespace


async def test_create_sets_data_labels_annotations_type_and_extra_keys(
    kube, kubeconfig, clients, make_token
) -> None:
    token = make_token(kind="DPoP")
    s = sink(kubeconfig, clients, extra_keys=["expires_at", "token_type"])
    await s.write(token)

    secret = stored(kube)
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "refresher"}
    notes = secret["metadata"]["annotations"]
    assert notes["refresher.io/gooclaim.expires-at"] == rfc3339(token.expires_at)
    assert notes["refresher.io/gooclaim.fingerprint"] == token.fingerprint()
    assert notes["refresher.io/gooclaim.obtained-at"] == rfc3339(token.obtained_at)
    assert kube.secret_data(NS, SECRET) == {
        "gooclaim": token.value,
        "gooclaim.expires_at": rfc3339(token.expires_at),
        "gooclaim.token_type": "DPoP",
    }
    # A read (absent: no precondition), then one apply that created the Secret, owned by
    # this key's own field manager.
    assert [(c.method, c.status) for c in kube.calls(resource="secrets")] == [
        ("GET", 404),
        ("PATCH", 201),
    ]
    owners = kube.managers("secrets", NS, SECRET)
    assert set(owners) == {"refresher/gooclaim"}
    assert ".data.gooclaim" in owners["refresher/gooclaim"]


async def test_update_replaces_value_and_moves_resource_version(
    kube, kubeconfig, clients, make_token
) -> None:
    s = sink(kubeconfig, clients)
    first, second = make_token(), make_token(lifetime=7200)
    await s.write(first)
    rv1 = stored(kube)["metadata"]["resourceVersion"]
    await s.write(second)
    secret = stored(kube)
    assert int(secret["metadata"]["resourceVersion"]) > int(rv1)
    assert kube.secret_data(NS, SECRET) == {"gooclaim": second.value}
    assert secret["metadata"]["annotations"]["refresher.io/gooclaim.fingerprint"] == (
        second.fingerprint()
    )
    assert secret["metadata"]["annotations"]["refresher.io/gooclaim.expires-at"] == rfc3339(
        second.expires_at
    )
    # Writing the same token again is a no-op for the API server.
    await s.write(second)
    assert stored(kube)["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]


async def test_two_jobs_share_one_secret_without_clobbering(
    kube, kubeconfig, clients, make_token
) -> None:
    goo = sink(kubeconfig, clients, key="gooclaim")
    deb = sink(kubeconfig, clients, key="debitura-t-001")
    t1, t2, t3 = make_token(), make_token(), make_token()
    await goo.write(t1)
    await deb.write(t2)
    await goo.write(t3)  # refreshing one job leaves the other's key alone

    assert kube.secret_data(NS, SECRET) == {"gooclaim": t3.value, "debitura-t-001": t2.value}
    notes = stored(kube)["metadata"]["annotations"]
    assert notes["refresher.io/gooclaim.fingerprint"] == t3.fingerprint()
    assert notes["refresher.io/debitura-t-001.fingerprint"] == t2.fingerprint()
    assert stored(kube)["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "refresher"
    owners = kube.managers("secrets", NS, SECRET)
    assert ".data.gooclaim" in owners["refresher/gooclaim"]
    assert ".data.debitura-t-001" in owners["refresher/debitura-t-001"]


async def test_foreign_keys_labels_and_annotations_are_preserved(
    kube, kubeconfig, clients, make_token
) -> None:
    kube.put_secret(
        NS,
        SECRET,
        {"db-password": "hunter2-not-ours"},
        labels={"team": "payments"},
        annotations={"owner": "someone-else"},
        manager="kubectl-edit",
    )
    s = sink(kubeconfig, clients)
    await s.write(make_token())
    # Another tool keeps writing its own keys with server-side apply too.
    async with AsyncClient(KubeConfig.from_file(kubeconfig)) as other:
        await other.apply(
            Secret(
                metadata=ObjectMeta(name=SECRET, annotations={"helm.sh/note": "x"}),
                data={"config.json": base64.b64encode(b"{}").decode()},
            ),
            field_manager="helm",
        )
    latest = make_token()
    await s.write(latest)

    assert kube.secret_data(NS, SECRET) == {
        "db-password": "hunter2-not-ours",
        "config.json": "{}",
        "gooclaim": latest.value,
    }
    meta = stored(kube)["metadata"]
    assert meta["labels"] == {"team": "payments", "app.kubernetes.io/managed-by": "refresher"}
    assert meta["annotations"]["owner"] == "someone-else"
    assert meta["annotations"]["helm.sh/note"] == "x"
    owners = kube.managers("secrets", NS, SECRET)
    assert owners["kubectl-edit"] >= {".data.db-password", ".metadata.labels.team"}
    assert ".data.config.json" in owners["helm"]


async def test_remove_deletes_only_our_keys(kube, kubeconfig, clients, make_token) -> None:
    kube.put_secret(NS, SECRET, {"other": "kept"})
    s = sink(kubeconfig, clients, extra_keys=["expires_at"])
    await s.write(make_token())
    await s.remove()
    assert kube.secret_data(NS, SECRET) == {"other": "kept"}
    notes = stored(kube)["metadata"].get("annotations") or {}
    assert not any(k.startswith("refresher.io/gooclaim.") for k in notes)
    assert await s.read_back() is None
    await s.remove()  # idempotent


async def test_403_names_verb_resource_namespace_and_keeps_old_value(
    kube, kubeconfig, clients, make_token
) -> None:
    s = sink(kubeconfig, clients)
    old = make_token()
    await s.write(old)
    kube.forbid("patch", "secrets")
    with pytest.raises(KubernetesSinkError) as caught:
        await s.write(make_token())
    error = caught.value
    assert isinstance(error, SinkError)
    assert 'RBAC: grant "patch" on secrets "partner-tokens" in namespace "apps"' in str(error)
    assert "system:serviceaccount:apps:refresher" in str(error)
    assert error.status == 403 and error.config_level
    assert kube.secret_data(NS, SECRET) == {"gooclaim": old.value}
    # No retry storm: exactly one request for the refused write.
    assert len(kube.calls(method="PATCH", status=403)) == 1


async def test_first_write_without_create_permission_asks_for_create(
    kube, kubeconfig, clients, make_token
) -> None:
    # Server-side apply of an absent object is authorized as "create" as well.
    kube.forbid("create", "secrets")
    with pytest.raises(KubernetesSinkError, match='grant "create" on secrets "partner-tokens"'):
        await sink(kubeconfig, clients).write(make_token())
    assert kube.secret(NS, SECRET) is None


async def test_409_is_retried_and_succeeds(kube, kubeconfig, clients, make_token) -> None:
    s = sink(kubeconfig, clients)
    await s.write(make_token())
    kube.conflict(count=2)
    latest = make_token()
    await s.write(latest)
    assert kube.secret_data(NS, SECRET) == {"gooclaim": latest.value}
    assert [c.status for c in kube.calls(method="PATCH")][-3:] == [409, 409, 200]


async def test_persistent_409_gives_up_after_a_few_attempts(
    kube, kubeconfig, clients, make_token
) -> None:
    s = sink(kubeconfig, clients)
    old = make_token()
    await s.write(old)
    kube.conflict(count=100)
    with pytest.raises(KubernetesSinkError, match="still conflicting") as caught:
        await s.write(make_token())
    assert caught.value.status == 409 and not caught.value.config_level
    assert len(kube.calls(method="PATCH", status=409)) == CONFLICT_ATTEMPTS
    kube.clear_faults()
    assert kube.secret_data(NS, SECRET) == {"gooclaim": old.value}


async def test_500_is_a_sink_error_and_the_old_value_stays(
    kube, kubeconfig, clients, make_token
) -> None:
    s = sink(kubeconfig, clients)
    old = make_token()
    await s.write(old)
    kube.fail(500, verb="patch", resource="secrets")
    with pytest.raises(KubernetesSinkError, match="Kubernetes API error 500") as caught:
        await s.write(make_token())
    assert caught.value.status == 500 and not caught.value.config_level
    assert kube.secret_data(NS, SECRET) == {"gooclaim": old.value}
    newer = make_token()
    await s.write(newer)  # the next attempt (after the scheduler's backoff) works
    assert kube.secret_data(NS, SECRET) == {"gooclaim": newer.value}


async def test_timeout_is_a_sink_error(kube, kubeconfig, make_token) -> None:
    slow = KubeClients(environ={}, timeout=0.1)
    try:
        s = sink(kubeconfig, slow)
        kube.slow(0.4, verb="patch")
        with pytest.raises(KubernetesSinkError, match="did not answer in time"):
            await s.write(make_token())
    finally:
        await slow.aclose()


async def test_missing_namespace_is_a_config_level_error(
    kube, kubeconfig, clients, make_token
) -> None:
    # Allowed everywhere (a ClusterRole), so the namespace check is what answers.
    kube.grant(
        kube.tokens[kube.token].user,
        [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "patch", "create"]}],
    )
    s = sink(kubeconfig, clients, namespace="nope")
    assert s.target == f"secret/nope/{SECRET}#gooclaim"
    with pytest.raises(KubernetesSinkError, match='namespace "nope" does not exist') as caught:
        await s.write(make_token())
    assert caught.value.config_level and caught.value.status == 404
    assert await s.read_back() is None


async def test_type_mismatch_is_reported_not_retried(kube, kubeconfig, clients, make_token) -> None:
    kube.put_secret(NS, SECRET, {"x": "y"}, secret_type="example.com/custom")
    with pytest.raises(KubernetesSinkError, match="field is immutable") as caught:
        await sink(kubeconfig, clients).write(make_token())
    assert caught.value.config_level and caught.value.status == 422


async def test_long_keys_get_valid_annotation_names(kube, kubeconfig, clients, make_token) -> None:
    key = "tenant-" + "x" * 70
    token = make_token()
    s = sink(kubeconfig, clients, key=key)
    await s.write(token)
    notes = stored(kube)["metadata"]["annotations"]
    fp_key = annotation_key(key, "fingerprint")
    assert len(fp_key.split("/", 1)[1]) <= 63
    assert notes[fp_key] == token.fingerprint()
    assert (await s.read_back()) == token


def test_invalid_key_is_a_config_error(tmp_path: Path) -> None:
    spec = KubernetesSinkConfig(kind="kubernetes", secret=SECRET, namespace=NS)
    with pytest.raises(ConfigError, match="kubernetes sink key"):
        KubernetesSink(spec, "bad key/with slash", clients=KubeClients(environ={}))


def test_no_cluster_and_no_kubeconfig_is_a_config_error() -> None:
    spec = KubernetesSinkConfig(kind="kubernetes", secret=SECRET)
    with pytest.raises(ConfigError, match="not running in a cluster"):
        KubernetesSink(spec, "k", clients=KubeClients(environ={}))


# ---------------------------------------------------------------------------- read back


async def test_read_back_round_trip_opaque_and_jwt(
    kube, kubeconfig, clients, make_token, clock
) -> None:
    opaque = make_token(kind="DPoP")
    await sink(kubeconfig, clients, key="a", extra_keys=["token_type"]).write(opaque)
    signed = make_token(lifetime=7200, jwt_exp=clock.now() + 1800)  # JWT exp is earlier
    await sink(kubeconfig, clients, key="b").write(signed)

    fresh = KubeClients(environ={})  # a restarted process
    try:
        back_a = await sink(kubeconfig, fresh, key="a", extra_keys=["token_type"]).read_back()
        back_b = await sink(kubeconfig, fresh, key="b").read_back()
        missing = await sink(kubeconfig, fresh, key="c").read_back()
    finally:
        await fresh.aclose()
    assert back_a == opaque
    assert back_b is not None
    assert back_b.value == signed.value
    assert back_b.expires_at == int(clock.now() + 1800)
    assert missing is None


async def test_read_back_ignores_annotations_after_a_foreign_edit(
    kube, kubeconfig, clients, make_token
) -> None:
    s = sink(kubeconfig, clients)
    await s.write(make_token())
    kube.put_secret(NS, SECRET, {"gooclaim": "edited-by-hand"})
    # Opaque value, fingerprint mismatch → expiry unknown → treat as due.
    assert await s.read_back() is None
    assert await sink(kubeconfig, clients, secret="absent").read_back() is None


def test_token_from_secret_rejects_garbage() -> None:
    assert token_from_secret(None, None, "k") is None
    assert token_from_secret({"k": "!!!not-base64"}, None, "k") is None
    assert token_from_secret({"k": base64.b64encode(b"v").decode()}, {}, "k") is None


class _MustNotMint:
    kind = "oauth2"

    async def fetch(self, *args: object, **kwargs: object) -> Token:
        raise AssertionError("a valid token in the Secret must be adopted, not re-minted")

    def secrets(self) -> list[str]:
        return []

    def secret_files(self) -> list[Path]:
        return []


async def test_restart_adopts_token_from_secret_without_minting(
    kube, kubeconfig, clients, make_token, clock
) -> None:
    token = make_token(lifetime=3600)
    await sink(kubeconfig, clients).write(token)
    await clock.advance(600)  # the process restarts 10 minutes later

    fresh = KubeClients(environ={})
    try:
        scheduler = Scheduler(RefreshConfig(), clock=clock, metrics=Metrics(), redactor=Redactor())
        runtime = JobRuntime(
            job="gooclaim", tenant=None, provider=_MustNotMint(), sinks=[sink(kubeconfig, fresh)]
        )
        assert await scheduler.recover(runtime)
        assert runtime.token == token
        assert runtime.next_refresh_at is not None and runtime.next_refresh_at > clock.now()

        # A token already due is not adopted (the daemon re-mints it).
        await clock.advance(3000)
        due = JobRuntime(
            job="gooclaim", tenant=None, provider=_MustNotMint(), sinks=[sink(kubeconfig, fresh)]
        )
        assert not await scheduler.recover(due)
    finally:
        await fresh.aclose()


# ---------------------------------------------------------------------------- client config


async def test_kubeconfig_context_is_honoured(kube, tmp_path, make_token) -> None:
    path = kube.write_kubeconfig(tmp_path / "kc", namespace=NS, context="emulator")
    doc = yaml.safe_load(path.read_text())
    # The current context points at a dead server; the sink asks for "emulator".
    doc["clusters"].append({"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}})
    doc["contexts"].append({"name": "dead", "context": {"cluster": "dead", "user": "refresher"}})
    doc["current-context"] = "dead"
    path.write_text(yaml.safe_dump(doc))
    shared = KubeClients(environ={})
    try:
        s = sink(path, shared, context="emulator")
        token = make_token()
        await s.write(token)
        assert kube.secret_data(NS, SECRET) == {"gooclaim": token.value}
        with pytest.raises(ConfigError, match="Context 'nope' not found"):
            sink(path, shared, context="nope")
    finally:
        await shared.aclose()


async def test_in_cluster_config_follows_service_account_token_rotation(
    make_emulator, clock, tmp_path, monkeypatch, make_token
) -> None:
    kube = make_emulator(KubernetesEmulator, namespaces=[NS], clock=clock, tls=True)
    install_chart_rbac(kube, CHART_CONFIG)
    account = tmp_path / "serviceaccount"
    env = kube.write_service_account(account, namespace=NS)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shared = KubeClients(service_account_dir=account)  # reads the real os.environ
    try:
        spec = KubernetesSinkConfig(kind="kubernetes", secret=SECRET)  # no namespace: the pod's
        s = KubernetesSink(spec, "gooclaim", clients=shared)
        assert s.target == f"secret/{NS}/{SECRET}#gooclaim"
        assert shared.server().startswith("https://127.0.0.1:")
        await s.write(make_token())
        first = kube.calls(method="PATCH")[-1]
        assert first.headers["authorization"] == f"Bearer {kube.token}"

        # The kubelet rotates the projected token; the old one stops working.
        rotated = f"kube-sa-rotated-{secrets.token_urlsafe(16)}"
        kube.add_token(rotated, "system:serviceaccount:apps:refresher")
        (account / "token").write_text(rotated)
        kube.revoke_token(kube.token)
        latest = make_token()
        await s.write(latest)
        assert kube.calls(method="PATCH")[-1].headers["authorization"] == f"Bearer {rotated}"
        assert kube.calls(status=401) == []  # re-read before sending, not after a 401
        assert kube.secret_data(NS, SECRET) == {"gooclaim": latest.value}
    finally:
        await shared.aclose()


def test_token_auth_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    import httpx2

    path = tmp_path / "token"
    path.write_text("one\n")
    auth = ServiceAccountTokenAuth(path)
    request = httpx2.Request("GET", "https://example.invalid/")
    assert next(auth.auth_flow(request)).headers["Authorization"] == "Bearer one"
    path.write_text("two-longer\n")
    assert next(auth.auth_flow(request)).headers["Authorization"] == "Bearer two-longer"
