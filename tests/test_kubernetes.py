"""Kubernetes Secret sink and Lease leader election, through lightkube against the
loopback API emulator (real HTTP, real kubeconfig / in-cluster config, no mocks)."""

from __future__ import annotations

import base64
import random
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
import yaml
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Secret

from refresher.clock import ManualClock
from refresher.config import KubernetesSinkConfig, LeaderElectionConfig, RefreshConfig
from refresher.errors import ConfigError, SinkError
from refresher.leader import LeaderElector, micro_time
from refresher.logging import Redactor
from refresher.metrics import Metrics
from refresher.scheduler import JobRuntime, Scheduler
from refresher.sinks.base import TokenSink
from refresher.sinks.kubernetes import (
    CONFLICT_ATTEMPTS,
    KubeClients,
    KubernetesSink,
    KubernetesSinkError,
    ServiceAccountTokenAuth,
    annotation_key,
    token_from_secret,
)
from refresher.token import Token, rfc3339
from tests.conftest import wait_for
from tests.emulators.kubernetes import KubernetesEmulator
from tests.kube_rbac import install_chart_rbac

pytestmark = pytest.mark.anyio

NS = "apps"
SECRET = "partner-tokens"
#: What these tests deploy, as the chart sees it: the Secrets they write or read and
#: the Lease. The emulator grants exactly the chart's Role for it (tests/kube_rbac.py).
CHART_CONFIG: dict[str, Any] = {
    "jobs": [
        {
            "name": "tokens",
            "sinks": [
                {"kind": "kubernetes", "secret": SECRET},
                {"kind": "kubernetes", "secret": "absent"},
            ],
        }
    ],
    "leader_election": {"enabled": True, "lease_name": "refresher", "namespace": NS},
}


class NoJitter(random.Random):
    """Followers retry every retry period exactly (timing assertions stay exact)."""

    def random(self) -> float:
        return 0.0


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_leftover_emulator_threads() -> Any:
    yield
    alive = [t.name for t in threading.enumerate() if t.name == "kubernetes-emulator"]
    assert not alive, f"emulator threads left running: {alive}"


@pytest.fixture
def kube(make_emulator: Callable[..., Any], clock: ManualClock) -> KubernetesEmulator:
    emulator: KubernetesEmulator = make_emulator(
        KubernetesEmulator, namespaces=[NS, "default"], clock=clock
    )
    install_chart_rbac(emulator, CHART_CONFIG)
    return emulator


@pytest.fixture
def admin_kubeconfig(kube: KubernetesEmulator, tmp_path: Path) -> Path:
    """Another tool with cluster-admin rights (kubectl, a test's own client)."""
    return kube.write_kubeconfig(
        tmp_path / "admin-kubeconfig", namespace=NS, token=kube.admin_token, user="admin"
    )


@pytest.fixture
def kubeconfig(kube: KubernetesEmulator, tmp_path: Path) -> Path:
    return kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)


@pytest.fixture
async def clients() -> AsyncIterator[KubeClients]:
    shared = KubeClients(environ={})  # never pick up a real in-cluster environment
    yield shared
    await shared.aclose()


def sink(
    kubeconfig: Path, clients: KubeClients, key: str = "gooclaim", **config: Any
) -> KubernetesSink:
    config = {"secret": SECRET, **config}
    spec = KubernetesSinkConfig(kind="kubernetes", kubeconfig=kubeconfig, **config)
    return KubernetesSink(spec, key, clients=clients)


@pytest.fixture
def make_token(clock: ManualClock, leak_guard: Any) -> Callable[..., Token]:
    def make(
        *, lifetime: float = 3600.0, jwt_exp: float | None = None, kind: str = "Bearer"
    ) -> Token:
        now = clock.now()
        if jwt_exp is not None:
            value = jwt.encode(
                {"sub": "svc", "iat": int(now), "exp": int(jwt_exp), "jti": secrets.token_hex(8)},
                "k" * 32,
                algorithm="HS256",
            )
        else:
            value = f"opaque-{secrets.token_urlsafe(24)}"
        leak_guard.secrets.add(value)
        return Token(value=value, token_type=kind, obtained_at=now, expires_at=now + lifetime)

    return make


def stored(kube: KubernetesEmulator) -> dict[str, Any]:
    secret = kube.secret(NS, SECRET)
    assert secret is not None
    return secret


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
    kube.put_secret(NS, SECRET, {"x": "y"}, type="example.com/custom")
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
    a, b = (
        elector(kubeconfig, clients, clock, "pod-a"),
        elector(kubeconfig, clients, clock, "pod-b"),
    )
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
    a, b = (
        elector(kubeconfig, clients, clock, "pod-a"),
        elector(kubeconfig, clients, clock, "pod-b"),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        assert leaders([a, b]) == ["pod-a"]
        await advance(clock, [a, b], 5)
        last_renew = kube.lease(NS, "refresher")["spec"]["renewTime"]
        renewed_at = lease_seconds(last_renew)

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


def lease_seconds(micro: str) -> float:
    """A Lease's MicroTime string → Unix seconds."""
    from datetime import datetime

    return datetime.fromisoformat(micro.replace("Z", "+00:00")).timestamp()


async def test_failing_renewals_stop_leadership_at_the_renew_deadline(
    kube, kubeconfig, clients, clock
) -> None:
    a, b = (
        elector(kubeconfig, clients, clock, "pod-a"),
        elector(kubeconfig, clients, clock, "pod-b"),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        await advance(clock, [a, b], 4)
        assert leaders([a, b]) == ["pod-a"]
        renewed_at = lease_seconds(kube.lease(NS, "refresher")["spec"]["renewTime"])

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
        record = lease_seconds(kube.lease(NS, "refresher")["spec"]["renewTime"])
        assert record >= renewed_at + 2
        assert a.elector.is_leader() and clock.now() < record + 10
        tg.cancel_scope.cancel()


async def test_release_hands_over_at_the_next_retry(kube, kubeconfig, clients, clock) -> None:
    a, b = (
        elector(kubeconfig, clients, clock, "pod-a"),
        elector(kubeconfig, clients, clock, "pod-b"),
    )
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
