"""What the Kubernetes tests share: the namespace and Secret they use, the chart
config whose Role the emulator enforces, and fixtures for the emulator, kubeconfigs,
clients and tokens."""

from __future__ import annotations

import random
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from refresher.clock import ManualClock
from refresher.config import KubernetesSinkConfig
from refresher.kube import KubeClients
from refresher.sinks.kubernetes import (
    KubernetesSink,
)
from refresher.token import Token
from tests.emulators.kubernetes import KubernetesEmulator
from tests.kube_rbac import install_chart_rbac

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


