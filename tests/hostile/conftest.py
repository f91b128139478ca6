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
    from refresher.emulators.kubernetes import KubernetesEmulator

    return make_emulator(KubernetesEmulator, namespaces=[NS], clock=clock)


def kubeconfig(kube: Any, tmp_path: Path, user: str = "refresher") -> Path:
    kube.add_token(f"sa-token-{user}", user)
    return kube.write_kubeconfig(
        tmp_path / f"kubeconfig-{user}", namespace=NS, token=f"sa-token-{user}", user=user
    )


def alive(daemon: Daemon) -> bool:
    """The daemon's task group still runs (an escaped exception would have ended it)."""
    return daemon._tg is not None and not daemon._tg.cancel_scope.cancel_called


def all_minted(daemon: Daemon) -> bool:
    """Every job holds a token and none is minting (faults injected now hit the next
    request on purpose, not a job's first mint still under way)."""
    return all(r.token and r.inflight is None for r in daemon.scheduler.jobs.values())
