"""RBAC for the Kubernetes tests, proven against the chart: the Role and RoleBinding
the Helm chart (real Helm engine) renders for a test's daemon config, installed in the
API emulator. Every request the code sends is then checked against what the chart
grants, so a new verb or resource in the code fails the tests until the chart
grants it too.

The test's config is turned into chart values the way an operator would deploy it:
the same jobs' Secret sinks and Lease, in-cluster (the ``kubeconfig`` a test uses to
reach the emulator stands in for the pod's service account), release namespace
`RELEASE_NAMESPACE`, release name ``refresher`` (so the ServiceAccount is
`SERVICE_ACCOUNT`). Providers do not matter for RBAC and are replaced by a valid one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import helm_python as helm

from tests.emulators.kubernetes import KubernetesEmulator
from tests.test_helm_chart import CHART, OAUTH2_PROVIDER, RELEASE, render

RELEASE_NAMESPACE = "apps"
SERVICE_ACCOUNT = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}"
_SINK_FIELDS = ("kind", "namespace", "secret", "key", "type", "extra_keys", "format", "template")
_LEASE_FIELDS = ("enabled", "lease_name", "namespace")
_STATE_FIELDS = ("name", "namespace")
#: A provider keeping rotated refresh tokens in a state Secret.
REFRESH_PROVIDER = {
    "kind": "oauth2",
    "token_url": "https://auth.example.com/oauth/token",
    "client_id": "c",
    "client_auth": "none",
    "grant": "refresh_token",
    "refresh_token_file": "/etc/refresher/credentials/refresh-token",
}


def chart_values(config: Mapping[str, Any], **values: Any) -> dict[str, Any]:
    """Chart values deploying `config`'s Secret sinks (bundles and templates kept in a
    Secret too), oauth2 state Secrets and Lease (plus `values`)."""
    jobs = []
    for job in config.get("jobs", []):
        sinks = [
            {k: v for k, v in sink.items() if k in _SINK_FIELDS}
            for sink in job["sinks"]
            if sink.get("kind") == "kubernetes" or sink.get("secret")  # a bundle in a Secret
        ]
        provider: dict[str, Any] = OAUTH2_PROVIDER
        state = job.get("provider", {}).get("state_secret")
        if state is not None:
            kept = {k: v for k, v in state.items() if k in _STATE_FIELDS}
            provider = {**REFRESH_PROVIDER, "state_secret": kept}
        if sinks or state is not None:
            # A chart job needs a sink: this one grants a Secret nobody writes.
            sinks = sinks or [{"kind": "kubernetes", "secret": "unused"}]
            jobs.append({"name": job["name"], "provider": provider, "sinks": sinks})
    chart_config: dict[str, Any] = {"jobs": jobs}
    election = config.get("leader_election") or {}
    if election.get("enabled"):
        chart_config["leader_election"] = {k: v for k, v in election.items() if k in _LEASE_FIELDS}
    return {"config": chart_config, "credentials": {"existingSecret": "partner-creds"}, **values}


def chart_rbac(config: Mapping[str, Any], **values: Any) -> list[dict[str, Any]]:
    """The Roles and RoleBindings the chart renders for `config`."""
    key = json.dumps(chart_values(config, **values), sort_keys=True)
    return [json.loads(m) for m in _rendered_rbac(key)]


@functools.cache
def _rendered_rbac(values_json: str) -> tuple[str, ...]:
    with helm.Chart.load(CHART) as chart:
        manifests = render(chart, json.loads(values_json), namespace=RELEASE_NAMESPACE)
    kinds = ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    return tuple(json.dumps(m) for m in manifests if m["kind"] in kinds)


def install_chart_rbac(
    kube: KubernetesEmulator, config: Mapping[str, Any], **values: Any
) -> list[dict[str, Any]]:
    """Grant the chart's service account exactly what the chart's RBAC grants for
    `config`; returns the rendered Roles."""
    manifests = chart_rbac(config, **values)
    kube.apply_rbac(manifests)
    return [m for m in manifests if m["kind"] == "Role"]
