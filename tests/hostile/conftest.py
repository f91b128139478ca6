"""Shared pieces of the hostile-input suite: a Kubernetes API emulator with a
kubeconfig, and a check that every daemon task is still alive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from refresher.daemon import Daemon

NS = "apps"


@pytest.fixture
def kube(make_emulator: Any, clock: Any) -> Any:
    """The API emulator, granting what the chart grants for the Secret these tests use."""
    from tests.emulators.kubernetes import KubernetesEmulator
    from tests.kube_rbac import install_chart_rbac

    emulator = make_emulator(KubernetesEmulator, namespaces=[NS], clock=clock)
    sink = {"kind": "kubernetes", "namespace": NS, "secret": "debitura", "key": "{tenant}"}
    install_chart_rbac(emulator, {"jobs": [{"name": "debitura", "sinks": [sink]}]})
    return emulator


def kubeconfig(kube: Any, tmp_path: Path, user: str = "refresher") -> Path:
    """A kubeconfig with a token of the chart's service account (`user` names the file)."""
    from tests.kube_rbac import SERVICE_ACCOUNT

    kube.add_token(f"sa-token-{user}", SERVICE_ACCOUNT)
    return kube.write_kubeconfig(
        tmp_path / f"kubeconfig-{user}", namespace=NS, token=f"sa-token-{user}", user=user
    )


def alive(daemon: Daemon) -> bool:
    """The daemon's task group still runs (an escaped exception would have ended it)."""
    return daemon._tg is not None and not daemon._tg.cancel_scope.cancel_called


def all_minted(daemon: Daemon) -> bool:
    """Every job holds a token and none is minting (faults injected now hit the next
    request on purpose, not a job's first mint still under way)."""
    return all(r.token and r.refreshing is None for r in daemon.scheduler.jobs.values())
