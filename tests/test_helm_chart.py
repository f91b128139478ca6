"""The Helm chart in helm/refresher, rendered and linted by the real Helm v4 engine.

`helm_python` (PyPI helm-python-sdk) binds Helm's Go SDK through a bundled shared library
(`libhelm_c.so`, inside the wheel): no helm binary, no network, no cluster. Every rendered
manifest is validated with `kubernetes_validate` against its bundled (offline) JSON schemas
in strict mode; Prometheus Operator resources have no schema there and are checked by hand.

The config the chart renders into its ConfigMap is also loaded with the daemon's own
`refresher.config.load_settings`, so chart and daemon cannot drift apart silently.

The chart is copied to a temporary directory first. files/alerts.yaml and
dashboards/refresher.json are written by other work streams; when one is missing, a
minimal placeholder goes into the copy only (never into the repository).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "refresher"
EXAMPLES = CHART / "examples"
KUBE_VERSION = kubernetes_validate.latest_version()
RELEASE = "refresher"
NAMESPACE = "token-system"
CRD_GROUPS = ("monitoring.coreos.com/",)

PLACEHOLDER_ALERTS = """\
groups:
  - name: refresher-placeholder
    rules:
      - alert: RefresherPlaceholder
        expr: absent(up{job="refresher"}) > 1
        annotations:
          summary: "placeholder for {{ $labels.job }}"
"""
PLACEHOLDER_DASHBOARD = '{"title": "refresher (placeholder)", "panels": []}\n'

KUBE_SINK_JOBS = [
    {
        "name": "gooclaim",
        "provider": {
            "kind": "gooclaim",
            "client_id": "abc",
            "client_secret_file": "/etc/refresher/credentials/gooclaim",
        },
        "sinks": [
            {"kind": "file", "path": "/tokens/gooclaim.token"},
            {
                "kind": "kubernetes",
                "namespace": "apps",
                "secret": "partner-tokens",
                "key": "gooclaim",
            },
            # No namespace: the pod's, i.e. the release namespace.
            {"kind": "kubernetes", "secret": "gooclaim-token", "key": "token"},
        ],
    },
    {
        "name": "debitura",
        "provider": {
            "kind": "debitura",
            "api_key_file": "/etc/refresher/credentials/debitura",
            "tenants": ["t-001", "t-002"],
        },
        "sinks": [
            # One key per tenant in one Secret.
            {"kind": "kubernetes", "namespace": "apps", "secret": "debitura", "key": "{tenant}"},
            # Shared Secret, other keys: listed once.
            {
                "kind": "kubernetes",
                "namespace": "apps",
                "secret": "partner-tokens",
                "key": "debitura-{tenant}",
            },
        ],
    },
]

# A complete oauth2 provider: the schema checks providers as the daemon does.
OAUTH2_PROVIDER = {
    "kind": "oauth2",
    "token_url": "https://auth.example.com/oauth/token",
    "client_id": "c",
    "client_secret_file": "/etc/refresher/credentials/oauth2",
}


def http2_job(http2: object) -> dict[str, Any]:
    return {
        "name": "api",
        "provider": {**OAUTH2_PROVIDER, "http2": http2},
        "sinks": [{"kind": "file", "path": "/run/refresher/api.token"}],
    }


KUBE_SINK_VALUES: dict[str, Any] = {
    "config": {"jobs": KUBE_SINK_JOBS},
    "credentials": {"existingSecret": "partner-creds"},
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("chart") / "refresher"
    shutil.copytree(CHART, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    alerts = target / "files" / "alerts.yaml"
    if not alerts.is_file():
        alerts.parent.mkdir(parents=True, exist_ok=True)
        alerts.write_text(PLACEHOLDER_ALERTS)
    dashboard = target / "dashboards" / "refresher.json"
    if not dashboard.is_file():
        dashboard.parent.mkdir(parents=True, exist_ok=True)
        dashboard.write_text(PLACEHOLDER_DASHBOARD)
    return target


@pytest.fixture(scope="session")
def chart(chart_dir: Path) -> Iterator[helm.Chart]:
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


def example_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return values


def render_raw(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def render(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """Render and parse every manifest (NOTES.txt excluded)."""
    manifests: list[dict[str, Any]] = []
    for path, text in sorted(render_raw(chart, values, name=name, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), (path, doc)
                manifests.append(doc)
    return manifests


def validate(manifests: list[dict[str, Any]]) -> None:
    """Schema-validate every manifest except CRD-backed kinds; no duplicates."""
    seen = set()
    for manifest in manifests:
        key = (
            manifest["kind"],
            manifest["metadata"].get("namespace"),
            manifest["metadata"]["name"],
        )
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        if manifest["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {path}: {exc.message}")


def only(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def kinds(manifests: list[dict[str, Any]]) -> list[str]:
    return sorted(m["kind"] for m in manifests)


def daemon_config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    config_maps = [m for m in of_kind(manifests, "ConfigMap") if "config.yaml" in m["data"]]
    assert len(config_maps) == 1
    config: dict[str, Any] = yaml.safe_load(config_maps[0]["data"]["config.yaml"])
    return config


def pod_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(manifests)["containers"]
    assert [c["name"] for c in containers] == ["refresher"]
    result: dict[str, Any] = containers[0]
    return result


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in spec.get("volumes", [])}


def rules_by_resource(role: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rule in role["rules"]:
        for resource in rule["resources"]:
            out.setdefault(resource, []).append(rule)
    return out


def assert_pod_security_context(pod: dict[str, Any]) -> None:
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}


def assert_container_security_context(c: dict[str, Any]) -> None:
    csc = c["securityContext"]
    assert csc["runAsNonRoot"] is True
    assert csc["runAsUser"] == 10001
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not csc.get("privileged", False)


# ----------------------------------------------------------------------------- metadata, lint


def test_chart_metadata_matches_package(chart: helm.Chart) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "refresher"
    assert meta["version"] == "0.2.0"
    assert meta["appVersion"] == project["version"]
    # The default image is the package version built from the repository's Dockerfile.
    image = container(render(chart))["image"]
    assert image == f"ghcr.io/refresher-dev/refresher:{project['version']}"


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(None, id="defaults"),
        pytest.param({"replicaCount": 3}, id="replicas-3"),
        pytest.param(example_values("values-sidecar.yaml"), id="sidecar-example"),
        pytest.param(example_values("values-standalone.yaml"), id="standalone-example"),
    ],
)
def test_lint_is_clean(chart_dir: Path, values: dict[str, Any] | None) -> None:
    report = helm.lint(
        chart_dir, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_reports_schema_violations(chart_dir: Path) -> None:
    report = helm.lint(chart_dir, {"replicaCount": 0}, namespace=NAMESPACE)
    assert any("/replicaCount" in error for error in report["errors"]), report


# ----------------------------------------------------------------------------- default render


def test_default_render(chart: helm.Chart) -> None:
    manifests = render(chart)
    validate(manifests)
    # No kubernetes sinks and one replica: no Role, no PDB, no monitoring objects. The
    # NetworkPolicy is on by default; the Pod is the `helm test` hook.
    assert kinds(manifests) == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "Pod",
        "Secret",
        "Service",
        "ServiceAccount",
    ]

    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = pod_spec(manifests)
    c = container(manifests)
    assert_pod_security_context(pod)
    assert pod["securityContext"]["runAsUser"] == 10001
    assert_container_security_context(c)
    assert c["args"] == ["run", "--config", "/etc/refresher/config.yaml"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Nothing talks to the Kubernetes API: no token in the pod.
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == only(manifests, "ServiceAccount")["metadata"]["name"]

    # Mounts: the config file, the admin token directory, writable /tokens and /tmp.
    m = mounts(c)
    v = volumes(pod)
    assert m["/etc/refresher/config.yaml"]["subPath"] == "config.yaml"
    assert v[m["/etc/refresher/config.yaml"]["name"]]["configMap"]["name"] == RELEASE
    assert "subPath" not in m["/etc/refresher/admin"]
    assert v[m["/tokens"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert not m["/tokens"].get("readOnly", False)
    assert "/tmp" in m
    assert "/etc/refresher/credentials" not in m

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])

    config = daemon_config(manifests)
    assert config["server"] == {
        "listen": "0.0.0.0:9464",
        "admin_token_file": "/etc/refresher/admin/token",
    }
    assert config["jobs"] == []
    assert "leader_election" not in config
    assert config["refresh"]["min_remaining"] == "5m"

    admin = only(manifests, "Secret")
    assert admin["metadata"]["name"] == v["admin-token"]["secret"]["secretName"]
    assert len(base64.b64decode(admin["data"]["token"])) == 48

    service = only(manifests, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()

    notes = render_raw(chart)["refresher/templates/NOTES.txt"]
    assert "config.jobs is empty" in notes


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def test_config_checksum_follows_config(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = only(render(chart, values), "Deployment")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum({})
    assert checksum({}) == base
    assert checksum({"config": {"refresh": {"min_remaining": "10m"}}}) != base


def test_values_are_passed_through(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        {
            "image": {"tag": "1.2.3", "digest": "sha256:" + "a" * 64},
            "extraEnv": [{"name": "REFRESHER_LOGGING__LEVEL", "value": "debug"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "podAnnotations": {"example.com/team": "platform"},
            "config": {"logging": {"format": "json"}, "metrics": {"tenant_labels": True}},
        },
    )
    validate(manifests)
    c = container(manifests)
    assert c["image"] == "ghcr.io/refresher-dev/refresher:1.2.3@sha256:" + "a" * 64
    assert {"name": "REFRESHER_LOGGING__LEVEL", "value": "debug"} in c["env"]
    assert pod_spec(manifests)["nodeSelector"] == {"kubernetes.io/os": "linux"}
    config = daemon_config(manifests)
    assert config["logging"] == {"format": "json"}
    assert config["metrics"] == {"tenant_labels": True}


# ----------------------------------------------------------------------------- replicas > 1


def test_three_replicas_enable_leader_election(chart: helm.Chart) -> None:
    manifests = render(chart, {"replicaCount": 3})
    validate(manifests)
    assert only(manifests, "Deployment")["spec"]["replicas"] == 3

    config = daemon_config(manifests)
    assert config["leader_election"] == {
        "enabled": True,
        "lease_name": RELEASE,
        "namespace": NAMESPACE,
    }

    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= pod_labels(only(manifests, "Deployment")).items()
    )

    role = only(manifests, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    by_resource = rules_by_resource(role)
    assert set(by_resource) == {"leases"}, "no Secret rules without kubernetes sinks"
    leases = by_resource["leases"]
    assert all(r["apiGroups"] == ["coordination.k8s.io"] for r in leases)
    create = [r for r in leases if "create" in r["verbs"]]
    named = [r for r in leases if "resourceNames" in r]
    assert create == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}
    ]
    assert len(named) == 1
    assert named[0]["resourceNames"] == [RELEASE]
    assert sorted(named[0]["verbs"]) == ["get", "update"]

    binding = only(manifests, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
    ]
    # The Lease needs the API: the token is mounted.
    assert pod_spec(manifests)["automountServiceAccountToken"] is True


def test_single_replica_has_no_pdb_and_explicit_leader_election(chart: helm.Chart) -> None:
    assert of_kind(render(chart, {"replicaCount": 1}), "PodDisruptionBudget") == []
    manifests = render(
        chart, {"config": {"leader_election": {"enabled": True, "lease_name": "my-lease"}}}
    )
    validate(manifests)
    assert daemon_config(manifests)["leader_election"] == {
        "enabled": True,
        "lease_name": "my-lease",
        "namespace": NAMESPACE,
    }
    named = [r for r in only(manifests, "Role")["rules"] if "resourceNames" in r]
    assert named[0]["resourceNames"] == ["my-lease"]
    assert of_kind(manifests, "PodDisruptionBudget") == []


# ----------------------------------------------------------------------------- RBAC for sinks


def test_kubernetes_sinks_get_exact_secret_rbac(chart: helm.Chart) -> None:
    manifests = render(chart, KUBE_SINK_VALUES)
    validate(manifests)
    roles = {r["metadata"]["namespace"]: r for r in of_kind(manifests, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(manifests, "RoleBinding")}
    assert set(roles) == set(bindings) == {"apps", NAMESPACE}

    expected = {
        "apps": ["debitura", "partner-tokens"],
        NAMESPACE: ["gooclaim-token"],
    }
    for namespace, role in roles.items():
        assert role["rules"] == [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": expected[namespace],
                "verbs": ["get", "patch"],
            },
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": expected[namespace],
                "verbs": ["create"],
            },
        ], namespace
        assert bindings[namespace]["subjects"] == [
            {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
        ]
    assert pod_spec(manifests)["automountServiceAccountToken"] is True
    assert only(manifests, "ServiceAccount")["automountServiceAccountToken"] is True
    notes = render_raw(chart, KUBE_SINK_VALUES)["refresher/templates/NOTES.txt"]
    assert "apps: debitura, partner-tokens" in notes
    assert "subPath" in notes


def test_secret_create_is_limited_to_the_sink_secrets(chart: helm.Chart) -> None:
    values = {**KUBE_SINK_VALUES, "replicaCount": 2}
    manifests = render(chart, values)
    validate(manifests)
    for role in of_kind(manifests, "Role"):
        secrets = rules_by_resource(role)["secrets"]
        create = [r for r in secrets if "create" in r["verbs"]]
        named = [r for r in secrets if "create" not in r["verbs"]]
        # An apply's create check carries the name: create on exactly the sinks' Secrets.
        assert [r["verbs"] for r in create] == [["create"]]
        assert create[0]["resourceNames"] == named[0]["resourceNames"] != []
        assert [sorted(r["verbs"]) for r in named] == [["get", "patch"]]
    # Pre-created Secrets: create can be left out altogether.
    manifests = render(chart, {**values, "rbac": {"allowSecretCreate": False}})
    for role in of_kind(manifests, "Role"):
        assert all("create" not in r["verbs"] for r in rules_by_resource(role)["secrets"])
    # The lease rules live in the release namespace only, next to its Secret rules.
    lease_namespaces = [
        r["metadata"]["namespace"]
        for r in of_kind(manifests, "Role")
        if "leases" in rules_by_resource(r)
    ]
    assert lease_namespaces == [NAMESPACE]


def test_rbac_never_grants_broad_access(chart: helm.Chart) -> None:
    values = {**KUBE_SINK_VALUES, "replicaCount": 3}
    manifests = render(chart, values)
    assert (
        of_kind(manifests, "ClusterRole") == [] and of_kind(manifests, "ClusterRoleBinding") == []
    )
    for role in of_kind(manifests, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert not {"list", "watch", "delete", "deletecollection"} & set(rule["verbs"])
            # Only the Lease's create (a POST) cannot name its object.
            if rule["resources"] != ["leases"] or "create" not in rule["verbs"]:
                assert rule.get("resourceNames"), rule


def test_rbac_can_be_disabled(chart: helm.Chart) -> None:
    manifests = render(chart, {**KUBE_SINK_VALUES, "rbac": {"create": False}})
    assert of_kind(manifests, "Role") == [] and of_kind(manifests, "RoleBinding") == []


def test_sinks_with_their_own_kubeconfig_get_no_rbac(chart: helm.Chart) -> None:
    jobs = [
        {
            "name": "remote",
            "provider": OAUTH2_PROVIDER,
            "sinks": [
                {"kind": "kubernetes", "secret": "remote-token", "kubeconfig": "/etc/kube/other"}
            ],
        }
    ]
    manifests = render(chart, {"config": {"jobs": jobs}, "credentials": {"existingSecret": "c"}})
    assert of_kind(manifests, "Role") == []
    assert pod_spec(manifests)["automountServiceAccountToken"] is False


def test_rbac_refuses_the_default_service_account(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"serviceAccount\.name"):
        render(chart, {**KUBE_SINK_VALUES, "serviceAccount": {"create": False}})


# ----------------------------------------------------------------------------- secrets


def test_credentials_secret_is_mounted_as_a_directory(chart: helm.Chart) -> None:
    manifests = render(chart, {"credentials": {"files": {"gooclaim": "s3cret"}}})
    validate(manifests)
    secrets = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    creds = secrets[f"{RELEASE}-credentials"]
    assert base64.b64decode(creds["data"]["gooclaim"]) == b"s3cret"
    m = mounts(container(manifests))["/etc/refresher/credentials"]
    assert "subPath" not in m and m["readOnly"] is True
    volume = volumes(pod_spec(manifests))[m["name"]]
    assert volume["secret"]["secretName"] == f"{RELEASE}-credentials"
    assert (
        "checksum/credentials"
        in only(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    )
    # The secret value never lands in the ConfigMap.
    assert "s3cret" not in json.dumps(of_kind(manifests, "ConfigMap"))


def test_referenced_credentials_must_be_mounted(chart: helm.Chart) -> None:
    jobs = [
        {
            "name": "partner",
            "provider": {
                **OAUTH2_PROVIDER,
                "client_secret_file": "/etc/refresher/credentials/partner-secret",
            },
            "sinks": [{"kind": "kubernetes", "secret": "partner-token"}],
        }
    ]
    with pytest.raises(helm.HelmRenderError, match="no credentials are mounted"):
        render(chart, {"config": {"jobs": jobs}})
    with pytest.raises(helm.HelmRenderError, match='has no key "partner-secret"'):
        render(chart, {"config": {"jobs": jobs}, "credentials": {"files": {"partner": "x"}}})
    render(chart, {"config": {"jobs": jobs}, "credentials": {"files": {"partner-secret": "x"}}})
    render(chart, {"config": {"jobs": jobs}, "credentials": {"existingSecret": "mine"}})


def test_existing_secrets_are_referenced_not_created(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        {
            "credentials": {"existingSecret": "partner-creds"},
            "adminToken": {"existingSecret": "my-admin", "key": "bearer"},
        },
    )
    validate(manifests)
    assert of_kind(manifests, "Secret") == []
    v = volumes(pod_spec(manifests))
    assert v["credentials"]["secret"]["secretName"] == "partner-creds"
    assert v["admin-token"]["secret"]["secretName"] == "my-admin"
    assert v["admin-token"]["secret"]["items"] == [{"key": "bearer", "path": "bearer"}]
    assert daemon_config(manifests)["server"]["admin_token_file"] == "/etc/refresher/admin/bearer"


def test_admin_token_value(chart: helm.Chart) -> None:
    manifests = render(chart, {"adminToken": {"value": "fixed-token"}})
    admin = only(manifests, "Secret")
    assert base64.b64decode(admin["data"]["token"]) == b"fixed-token"
    # Offline, lookup finds nothing: a fresh random token per render.
    a, b = (only(render(chart), "Secret")["data"]["token"] for _ in range(2))
    assert a != b


def test_admin_token_required_for_non_loopback_listener(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="admin_token_file"):
        render(chart, {"adminToken": {"enabled": False}})
    # With a file of one's own, the chart does not mount its own.
    manifests = render(
        chart,
        {
            "adminToken": {"enabled": False},
            "config": {"server": {"admin_token_file": "/run/admin/token"}},
        },
    )
    assert daemon_config(manifests)["server"]["admin_token_file"] == "/run/admin/token"
    assert "/etc/refresher/admin" not in mounts(container(manifests))


def test_loopback_listener_is_refused_in_standalone_mode(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="loopback"):
        render(chart, {"config": {"server": {"listen": "127.0.0.1:9464"}}})


def test_listen_port_drives_the_container_port(chart: helm.Chart) -> None:
    manifests = render(chart, {"config": {"server": {"listen": "[::]:9100"}}})
    validate(manifests)
    assert container(manifests)["ports"][0]["containerPort"] == 9100


# ----------------------------------------------------------------------------- monitoring


def test_service_monitor(chart: helm.Chart) -> None:
    manifests = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    validate(manifests)
    monitor = only(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = only(manifests, "Service")
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["path"] == "/metrics"
    # The daemon exports no `job` label: the scrape job stays Prometheus's own.
    assert "honorLabels" not in endpoint
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "refresher"}]
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    assert set(endpoint) <= {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "relabelings",
        "metricRelabelings",
    }
    # The user's relabelings come after the chart's, so they can still refine the target.
    extra = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    custom = render(chart, {"serviceMonitor": {"enabled": True, "relabelings": [extra]}})
    [endpoint] = only(custom, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["relabelings"] == [
        {"targetLabel": "job", "replacement": "refresher"},
        extra,
    ]


def test_prometheus_rule_renders_alerts_file(chart: helm.Chart, chart_dir: Path) -> None:
    manifests = render(chart, {"prometheusRule": {"enabled": True}})
    validate(manifests)
    rule = only(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    shipped = yaml.safe_load((chart_dir / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip()
    # The Prometheus templating survives Helm untouched.
    assert "{{ $labels." in json.dumps(rule["spec"])


DOWN_SELECTOR = 'up{job="refresher"}'


def down_rule(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    rule = only(manifests, "PrometheusRule")
    [down] = [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "RefresherDown"
    ]
    return down


@pytest.mark.parametrize(
    ("values", "job"),
    [
        pytest.param({}, "refresher", id="default"),
        pytest.param({"fullnameOverride": "tokens"}, "tokens", id="fullname-override"),
        pytest.param({"scrapeJob": "kubernetes-pods"}, "kubernetes-pods", id="own-scrape-job"),
    ],
)
def test_down_alert_selects_the_scrape_job_the_monitor_sets(
    chart: helm.Chart, values: dict[str, Any], job: str
) -> None:
    for monitor in ("serviceMonitor", "podMonitor"):
        manifests = render(
            chart, {**values, monitor: {"enabled": True}, "prometheusRule": {"enabled": True}}
        )
        validate(manifests)
        kind = monitor[0].upper() + monitor[1:]
        [endpoint] = only(manifests, kind)["spec"][
            "endpoints" if monitor == "serviceMonitor" else "podMetricsEndpoints"
        ]
        assert endpoint["relabelings"][0] == {"targetLabel": "job", "replacement": job}
        down = down_rule(manifests)
        assert down["expr"].count(f'up{{job="{job}"}}') == 2
        assert f'matches up{{job="{job}"}}' in down["annotations"]["description"]
        spec = only(manifests, "PrometheusRule")["spec"]
        texts = " ".join(
            r["expr"] + r["annotations"]["description"] for g in spec["groups"] for r in g["rules"]
        )
        assert (DOWN_SELECTOR in texts) is (job == "refresher")


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")
def test_rendered_down_alert_with_promtool(chart: helm.Chart, tmp_path: Path) -> None:
    """The issue: `fullnameOverride: tokens` made RefresherDown fire for ever. The rendered
    rules, run by promtool: silent while the release's target is up, firing when it is down
    or missing, blind to another release's targets."""
    manifests = render(
        chart,
        {
            "fullnameOverride": "tokens",
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
        },
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        yaml.safe_dump({"groups": only(manifests, "PrometheusRule")["spec"]["groups"]})
    )
    selected = 'up{job="tokens", instance="10.0.0.1:9464"}'
    other = 'up{job="refresher", instance="10.0.0.9:9464"}'

    def case(name: str, series: list[tuple[str, str]], alerts: list[dict[str, Any]]) -> Any:
        return {
            "name": name,
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "RefresherDown", "exp_alerts": alerts}
            ],
        }

    description = (
        'No scrape target matches up{job="tokens"}: refresher has not been scraped at all '
        "for 5 minutes. While it is unscraped no other refresher alert can fire, so token "
        "expiry is unmonitored."
    )
    url = "https://github.com/refresher-dev/refresher/blob/main/docs/runbooks.md#refresherdown"
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            case("up", [(selected, "1x12")], []),
            case(
                "down",
                [(selected, "0x12")],
                [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "job": "tokens",
                            "instance": "10.0.0.1:9464",
                        },
                        "exp_annotations": {
                            "summary": "refresher target is down or missing",
                            "description": (
                                "Prometheus has not scraped refresher target 10.0.0.1:9464 "
                                "(scrape job tokens) successfully for 5 minutes. While it is "
                                "unscraped no other refresher alert can fire, so token expiry "
                                "is unmonitored."
                            ),
                            "runbook_url": url,
                        },
                    }
                ],
            ),
            case(
                "missing, another release up",
                [(other, "1x12")],
                [
                    {
                        "exp_labels": {"severity": "critical", "job": "tokens"},
                        "exp_annotations": {
                            "summary": "refresher target is down or missing",
                            "description": description,
                            "runbook_url": url,
                        },
                    }
                ],
            ),
        ],
    }
    path = tmp_path / "rules_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run(
        ["promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same test against the plain file's selector would see a permanent outage.
    plain = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    rules.write_text(yaml.safe_dump(plain))
    proc = subprocess.run(
        ["promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "name: up," in proc.stderr, proc.stdout + proc.stderr


def test_alerts_file_without_the_down_selector_is_refused(chart_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "refresher"
    shutil.copytree(chart_dir, copy)
    alerts = copy / "files" / "alerts.yaml"
    alerts.write_text(alerts.read_text().replace(DOWN_SELECTOR, 'up{job="x"}'))
    with (
        helm.Chart.load(copy) as broken,
        pytest.raises(helm.HelmRenderError, match="RefresherDown selector"),
    ):
        render(broken, {"prometheusRule": {"enabled": True}})


def test_grafana_alerts_configmap(chart: helm.Chart, chart_dir: Path) -> None:
    values = {
        "fullnameOverride": "tokens",
        "grafanaAlerts": {
            "enabled": True,
            "datasourceUid": "prom-main",
            "folder": "Platform",
            "annotations": {"grafana_folder": "Platform"},
        },
    }
    manifests = render(chart, values)
    validate(manifests)
    [config_map] = [
        m
        for m in of_kind(manifests, "ConfigMap")
        if m["metadata"]["name"] == "tokens-grafana-alerts"
    ]
    assert config_map["metadata"]["labels"]["grafana_alert"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Platform"}
    assert config_map["metadata"]["namespace"] == NAMESPACE
    rendered = yaml.safe_load(config_map["data"]["refresher-alerts.yaml"])
    # What the chart changes, applied by hand to the shipped file: nothing else differs.
    shipped = (chart_dir / "files" / "grafana-alerts.yaml").read_text()
    expected = yaml.safe_load(shipped.replace(DOWN_SELECTOR, 'up{job="tokens"}'))
    for group in expected["groups"]:
        group["folder"] = "Platform"
        for rule in group["rules"]:
            for query in rule["data"]:
                if query["datasourceUid"] != "__expr__":
                    query["datasourceUid"] = query["model"]["datasource"]["uid"] = "prom-main"
    assert rendered == expected
    assert "$A" in config_map["data"]["refresher-alerts.yaml"], "Grafana math survives Helm"
    # Off by default.
    assert not [m for m in render(chart) if m["metadata"]["name"].endswith("-grafana-alerts")]


def test_dashboard_configmap(chart: helm.Chart, chart_dir: Path) -> None:
    manifests = render(
        chart, {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Platform"}}}
    )
    validate(manifests)
    [dashboard] = [
        m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Platform"}
    shipped = json.loads((chart_dir / "dashboards" / "refresher.json").read_text())
    assert json.loads(dashboard["data"]["refresher.json"]) == shipped
    assert not [m for m in render(chart) if m["metadata"]["name"].endswith("-dashboard")]


def test_network_policy(chart: helm.Chart) -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    manifests = render(chart, {"networkPolicy": {"enabled": True, "ingressFrom": [peer]}})
    validate(manifests)
    policy = only(manifests, "NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items()
        <= pod_labels(only(manifests, "Deployment")).items()
    )
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    test_pod = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "refresher-test",
                "app.kubernetes.io/instance": RELEASE,
            }
        }
    }
    assert policy["ingress"] == [
        {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [peer, test_pod]}
    ]
    # The `helm test` Pod is allowed in, and is not itself a daemon pod the policy selects.
    [hook] = [m for m in manifests if m["kind"] == "Pod"]
    assert test_pod["podSelector"]["matchLabels"].items() <= hook["metadata"]["labels"].items()
    assert not policy["podSelector"]["matchLabels"].items() <= hook["metadata"]["labels"].items()
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 443, 6443}


# ----------------------------------------------------------------------------- examples


def test_standalone_example(chart: helm.Chart) -> None:
    manifests = render(chart, example_values("values-standalone.yaml"))
    validate(manifests)
    assert {
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    } <= set(kinds(manifests))
    assert daemon_config(manifests)["leader_election"]["enabled"] is True
    apps_role = next(r for r in of_kind(manifests, "Role") if r["metadata"]["namespace"] == "apps")
    assert apps_role["rules"][0]["resourceNames"] == ["partner-tokens"]


def test_sidecar_values_render_no_workload(chart: helm.Chart) -> None:
    manifests = render(
        chart, example_values("values-sidecar.yaml"), name="tokens", namespace="apps"
    )
    validate(manifests)
    # The config, the sidecar spec (ConfigMap tokens-refresher-sidecar) and the admin token.
    assert kinds(manifests) == ["ConfigMap", "ConfigMap", "Secret"]
    config = daemon_config(manifests)
    assert "leader_election" not in config
    sinks = [s for job in config["jobs"] for s in job["sinks"]]
    assert {
        "kind": "file",
        "path": "/tokens/gooclaim.token",
        "format": "raw",
        "mode": "0640",
    } in sinks
    # Even with replicas > 1 the sidecar mode renders no workload and no Lease.
    values = example_values("values-sidecar.yaml") | {"replicaCount": 3}
    assert kinds(render(chart, values, name="tokens", namespace="apps")) == kinds(manifests)


def sidecar_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """ConfigMap <fullname>-sidecar, its data parsed."""
    [spec] = [
        m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-sidecar")
    ]
    return {key: yaml.safe_load(text) for key, text in spec["data"].items()}


def test_sidecar_example_is_what_the_chart_renders(chart: helm.Chart) -> None:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "sidecar.yaml").read_text()) if d]
    [deployment] = docs
    validate([deployment])
    template = deployment["spec"]["template"]
    spec = template["spec"]
    [sidecar] = spec["initContainers"]
    [app] = spec["containers"]

    # Copied from ConfigMap tokens-refresher-sidecar, as the example's comments say.
    values = example_values("values-sidecar.yaml")
    manifests = render(chart, values, name="tokens", namespace=deployment["metadata"]["namespace"])
    rendered = sidecar_spec(manifests)
    assert sidecar == rendered["container.yaml"]
    assert spec["volumes"] == rendered["volumes.yaml"]
    metadata = rendered["pod-metadata.yaml"]
    assert metadata["labels"].items() <= template["metadata"]["labels"].items()
    assert metadata["annotations"].items() <= template["metadata"]["annotations"].items()

    assert sidecar["image"] == f"ghcr.io/refresher-dev/refresher:{chart.metadata['appVersion']}"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["run", "--config", "/etc/refresher/config.yaml"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Pod-wide unique port name: the app may well have its own "metrics".
    assert [p["name"] for p in sidecar["ports"]] == ["refresher"]
    assert_pod_security_context(spec)
    assert_container_security_context(sidecar)

    # Both share the /tokens emptyDir; the consumer reads it read-only, no subPath anywhere.
    v = volumes(spec)
    side_tokens, app_tokens = mounts(sidecar)["/tokens"], mounts(app)["/tokens"]
    assert side_tokens["name"] == app_tokens["name"]
    assert "emptyDir" in v[side_tokens["name"]]
    assert app_tokens["readOnly"] is True
    for mount in [*sidecar["volumeMounts"], *app["volumeMounts"]]:
        if mount["mountPath"] != "/etc/refresher/config.yaml":
            assert "subPath" not in mount, mount
    assert {"name": "GOOCLAIM_TOKEN_FILE", "value": "/tokens/gooclaim.token"} in app["env"]
    # The consumer can read a 0640 file of group fsGroup.
    assert spec["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]

    # Everything the Pod refers to is rendered by the chart with the sidecar values (or is
    # the credentials Secret those values name).
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    for volume in v.values():
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in names
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            assert ("Secret", name) in names or name == values["credentials"]["existingSecret"]
    config = daemon_config(manifests)
    assert config["jobs"][0]["sinks"][0]["path"] == "/tokens/gooclaim.token"
    assert config["server"]["admin_token_file"].startswith(
        mounts(sidecar)["/etc/refresher/admin"]["mountPath"]
    )
    secret_file = config["jobs"][0]["provider"]["client_secret_file"]
    assert secret_file.startswith("/etc/refresher/credentials/")
    assert "/etc/refresher/credentials" in mounts(sidecar)
    assert spec["automountServiceAccountToken"] is False


def test_sidecar_checksum_rolls_consumers_on_a_config_change(chart: helm.Chart) -> None:
    values = example_values("values-sidecar.yaml")

    def checksum(v: dict[str, Any]) -> str:
        manifests = render(chart, v, name="tokens", namespace="apps")
        value: str = sidecar_spec(manifests)["pod-metadata.yaml"]["annotations"][
            "checksum/refresher-config"
        ]
        [config_map] = [m for m in of_kind(manifests, "ConfigMap") if "config.yaml" in m["data"]]
        # The same value as the config ConfigMap's annotation, and its data's sha256.
        assert config_map["metadata"]["annotations"]["checksum/config"] == value
        assert value == hashlib.sha256(config_map["data"]["config.yaml"].encode()).hexdigest()
        return value

    base = checksum(values)
    assert checksum(values) == base
    changed = json.loads(json.dumps(values))
    changed["config"]["refresh"]["min_remaining"] = "3m"
    assert checksum(changed) != base
    notes = render_raw(chart, values, name="tokens", namespace="apps")[
        "refresher/templates/NOTES.txt"
    ]
    assert f"checksum/refresher-config: {base}" in notes
    assert "tokens-refresher-sidecar" in notes


def test_sidecar_image_follows_app_version_and_tag(chart: helm.Chart) -> None:
    values = example_values("values-sidecar.yaml")
    manifests = render(chart, values, name="tokens", namespace="apps")
    image = sidecar_spec(manifests)["container.yaml"]["image"]
    assert image == f"ghcr.io/refresher-dev/refresher:{chart.metadata['appVersion']}"
    tagged = render(chart, values | {"image": {"tag": "9.9.9"}}, name="tokens", namespace="apps")
    assert sidecar_spec(tagged)["container.yaml"]["image"].endswith(":9.9.9")
    # Not in standalone mode: there the Deployment is the spec.
    assert not [m for m in render(chart) if m["metadata"]["name"].endswith("-sidecar")]


def test_sidecar_pod_monitor_and_rules(chart: helm.Chart) -> None:
    values = example_values("values-sidecar.yaml") | {
        "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True},
    }
    manifests = render(chart, values, name="tokens", namespace="apps")
    validate(manifests)
    monitor = only(manifests, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    # It selects the Pods that carry pod-metadata.yaml's labels, on the sidecar's port.
    labels = sidecar_spec(manifests)["pod-metadata.yaml"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["namespaceSelector"] == {"matchNames": ["apps"]}
    [endpoint] = spec["podMetricsEndpoints"]
    container_spec = sidecar_spec(manifests)["container.yaml"]
    assert endpoint["port"] == container_spec["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    # The alerts come along in sidecar mode too: the PodMonitor fixes the scrape job (the
    # operator's default would be <namespace>/<name>) and RefresherDown selects exactly it.
    assert "honorLabels" not in endpoint
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "tokens-refresher"}]
    rule = only(manifests, "PrometheusRule")
    [down] = [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "RefresherDown"
    ]
    assert down["expr"].count('up{job="tokens-refresher"}') == 2


def test_pod_monitor_in_standalone_mode(chart: helm.Chart) -> None:
    manifests = render(chart, {"podMonitor": {"enabled": True}})
    validate(manifests)
    monitor = only(manifests, "PodMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= pod_labels(only(manifests, "Deployment")).items()
    )
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    with pytest.raises(helm.HelmRenderError, match="scrape every pod twice"):
        render(chart, {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}})


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "field"),
    [
        pytest.param({"replicaCount": "three"}, "/replicaCount", id="replicas-string"),
        pytest.param({"replicaCount": 0}, "/replicaCount", id="replicas-zero"),
        pytest.param({"replicaCount": 1.5}, "/replicaCount", id="replicas-float"),
        pytest.param({"mode": "daemonset"}, "/mode", id="unknown-mode"),
        pytest.param({"replica": 3}, "replica", id="unknown-top-level-key"),
        pytest.param({"image": {"tag": 1.0}}, "/image/tag", id="numeric-tag"),
        pytest.param({"config": "server: {}"}, "/config", id="config-not-object"),
        pytest.param(
            {"config": {"server": {"listen": "9464"}}},
            "/config/server/listen",
            id="listen-without-host",
        ),
        pytest.param(
            {"config": {"refresh": {"min_remaining": "soon"}}},
            "/config/refresh/min_remaining",
            id="bad-duration",
        ),
        pytest.param(
            {
                "config": {
                    "jobs": [
                        {
                            "name": "x",
                            "provider": {"kind": "oauth2"},
                            "sinks": [{"kind": "kubernetes"}],
                        }
                    ]
                }
            },
            "secret",
            id="kubernetes-sink-without-secret",
        ),
        pytest.param(
            {
                "config": {
                    "jobs": [
                        {
                            "name": "x",
                            "provider": {"kind": "oauth2"},
                            "sinks": [{"kind": "kubernetes", "secret": "x-{tenant}"}],
                        }
                    ]
                }
            },
            "/config/jobs/0/sinks/0/secret",
            id="secret-name-with-placeholder",
        ),
        pytest.param(
            {"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled", id="bool-as-string"
        ),
        pytest.param(
            {"config": {"jobs": [http2_job("yes")]}},
            "/config/jobs/0/provider/http2",
            id="http2-as-string",
        ),
        # It is written into PromQL: a quote would end the selector and inject an expression.
        pytest.param({"scrapeJob": 'x"} or vector(1) #'}, "/scrapeJob", id="scrape-job-injection"),
        pytest.param(
            {"grafanaAlerts": {"datasourceUid": "$PROM_UID"}},
            "/grafanaAlerts/datasourceUid",
            id="datasource-uid-with-dollar",
        ),
        pytest.param(
            {"grafanaAlerts": {"enable": True}}, "grafanaAlerts", id="grafana-alerts-typo"
        ),
    ],
)
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as schema_error:
        chart.validate_schema(chart.merge_values(values))
    assert field in str(schema_error.value)
    # Rendering (install/upgrade/template) refuses them the same way.
    with pytest.raises(helm.HelmValuesError, match=re.escape(field)):
        render(chart, values)


def test_schema_accepts_documented_values(chart: helm.Chart) -> None:
    for values in (
        {},
        {"replicaCount": 3},
        example_values("values-sidecar.yaml"),
        example_values("values-standalone.yaml"),
        {**KUBE_SINK_VALUES, "rbac": {"allowSecretCreate": True}},
        {"config": {"jobs": [http2_job(True)]}},
    ):
        chart.validate_schema(chart.merge_values(values))


def test_every_default_value_is_documented() -> None:
    """values.yaml: every leaf key has a comment just above it or above an ancestor key."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while documented and documented[-1][0] >= indent:
            documented.pop()
        here = number > 0 and lines[number - 1].strip().startswith("#")
        inherited = any(flag for _, flag in documented)
        is_leaf = match.group(3).strip() != ""
        if is_leaf and not (here or inherited):
            undocumented.append(line.strip())
        documented.append((indent, here))
    assert undocumented == []


# ----------------------------------------------------------------------------- daemon contract


@pytest.mark.parametrize(
    ("values", "leader"),
    [
        pytest.param({}, False, id="defaults"),
        pytest.param({"replicaCount": 3}, True, id="replicas-3"),
        pytest.param({**KUBE_SINK_VALUES, "replicaCount": 2}, True, id="kubernetes-sinks"),
        pytest.param(example_values("values-standalone.yaml"), True, id="standalone-example"),
        pytest.param(example_values("values-sidecar.yaml"), False, id="sidecar-example"),
    ],
)
def test_rendered_config_loads_in_the_daemon(
    chart: helm.Chart, tmp_path: Path, values: dict[str, Any], leader: bool
) -> None:
    """The ConfigMap's config.yaml passes the daemon's own validation (refresher.config).

    The files the pod would mount under /etc/refresher/ are stood in under tmp_path.
    """
    from refresher.config import load_settings

    text = json.dumps(daemon_config(render(chart, values)))
    for path in sorted(set(re.findall(r'"(/etc/refresher/[^"]+)"', text))):
        stand_in = tmp_path / path.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("stand-in\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(json.loads(text.replace('"/etc/refresher/', f'"{tmp_path}/etc/refresher/')))
    )

    settings = load_settings(config_file)
    assert settings.server.listen == "0.0.0.0:9464"
    assert settings.server.admin_token_file == tmp_path / "etc/refresher/admin/token"
    assert settings.leader_election.enabled is leader
    if leader:
        assert settings.leader_election.lease_name == RELEASE
        assert settings.leader_election.namespace == NAMESPACE


# ----------------------------------------------------------------------------- image


def test_dockerfile_matches_chart(chart: helm.Chart) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install --no-cache-dir -c constraints\.txt \.$", dockerfile, re.M)
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, re.M)
    assert re.search(r"^EXPOSE 9464$", dockerfile, re.M)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    assert entrypoint == ["refresher"]
    assert cmd == ["run", "--config", "/etc/refresher/config.yaml"]
    c = container(render(chart))
    assert "command" not in c, "the image's ENTRYPOINT is used"
    assert c["args"] == cmd
    assert c["securityContext"]["runAsUser"] == 10001


# ----------------------------------------------------------------------------- chart conventions


def test_no_jobs_is_a_ready_install_with_a_warning(chart: helm.Chart) -> None:
    """`helm install --wait` with `jobs: []`: the daemon answers /readyz 200 without jobs
    (tests/test_operability.py), the probe asks /readyz, and NOTES.txt warns."""
    manifests = render(chart)
    assert daemon_config(manifests)["jobs"] == []
    assert container(manifests)["readinessProbe"]["httpGet"]["path"] == "/readyz"
    notes = render_raw(chart)["refresher/templates/NOTES.txt"]
    assert "WARNING: config.jobs is empty" in notes


def file_only_job(path: str) -> dict[str, Any]:
    return {
        "name": "files",
        "provider": OAUTH2_PROVIDER,
        "sinks": [{"kind": "file", "path": path, "mode": "0640"}],
    }


def test_standalone_refuses_file_sinks_nobody_can_read(chart: helm.Chart) -> None:
    creds = {"credentials": {"existingSecret": "c"}}
    with pytest.raises(
        helm.HelmRenderError, match=r"config.jobs\[0\] \(files\) writes only file sinks"
    ):
        render(chart, {"config": {"jobs": [file_only_job("/tokens/a.token")]}, **creds})
    with pytest.raises(helm.HelmRenderError, match="not on a shared volume"):
        render(chart, {"config": {"jobs": [file_only_job("/tmp/a.token")]}, **creds})

    # A shared volume at /tokens makes it fine, and replaces the emptyDir.
    claim = {"persistentVolumeClaim": {"claimName": "shared-tokens"}}
    manifests = render(
        chart,
        {
            "config": {"jobs": [file_only_job("/tokens/a.token")]},
            "tokens": {"volume": claim},
            **creds,
        },
    )
    validate(manifests)
    assert volumes(pod_spec(manifests))["tokens"] == {"name": "tokens", **claim}
    # So does a mount of one's own.
    render(
        chart,
        {
            "config": {"jobs": [file_only_job("/shared/out/a.token")]},
            "extraVolumes": [{"name": "out", **claim}],
            "extraVolumeMounts": [{"name": "out", "mountPath": "/shared/out/"}],
            **creds,
        },
    )
    # A job with a Secret sink as well is readable; the file is its own business.
    job = file_only_job("/tokens/a.token")
    job["sinks"].append({"kind": "kubernetes", "secret": "a"})
    render(chart, {"config": {"jobs": [job]}, **creds})
    # Sidecar mode shares the emptyDir with the app by design.
    render(
        chart,
        {"mode": "sidecar", "config": {"jobs": [file_only_job("/tokens/a.token")]}, **creds},
    )


def test_replicas_was_renamed_to_replica_count(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="renamed to `replicaCount`"):
        render(chart, {"replicas": 3})
    assert only(render(chart, {"replicaCount": 2}), "Deployment")["spec"]["replicas"] == 2


def test_probes_can_be_turned_off(chart: helm.Chart) -> None:
    off = {"enabled": False}
    manifests = render(
        chart, {"livenessProbe": off, "readinessProbe": off, "startupProbe": {"enabled": False}}
    )
    validate(manifests)
    c = container(manifests)
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(c)
    # On (the default), `enabled` itself never reaches the pod spec.
    c = container(render(chart, {"livenessProbe": {"periodSeconds": 7}}))
    assert c["livenessProbe"]["periodSeconds"] == 7 and "enabled" not in c["livenessProbe"]
    with pytest.raises(helm.HelmValuesError, match="/livenessProbe/enabled"):
        render(chart, {"livenessProbe": {"enabled": "no"}})


def test_network_policy_is_on_by_default(chart: helm.Chart) -> None:
    policy = only(render(chart), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    assert of_kind(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


# --------------------------------------------------------------------- schema from the models


def load_tool(path: Path, name: str) -> Any:
    """Import a generator by path (helm/ is not a package) without leaving bytecode."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


SCHEMA_GENERATOR = CHART / "schema" / "generate.py"
README_GENERATOR = CHART / "docs" / "generate.py"


def test_committed_schema_is_generated_from_the_config_models(tmp_path: Path) -> None:
    generator = load_tool(SCHEMA_GENERATOR, "refresher_schema_generate")
    committed = (CHART / "values.schema.json").read_text()
    assert generator.render(json.loads(committed)) == committed, (
        "helm/refresher/values.schema.json is stale: run python helm/refresher/schema/generate.py"
    )
    from refresher.config import JobConfig, Settings

    schema = json.loads(committed)
    config = schema["properties"]["config"]
    assert set(config["properties"]) == set(Settings.model_fields)
    assert config["additionalProperties"] is False
    job = schema["definitions"]["JobConfig"]
    assert set(job["properties"]) == set(JobConfig.model_fields)
    # --check notices a stale file.
    target = tmp_path / "values.schema.json"
    target.write_text(committed.replace('"minItems": 1', '"minItems": 0'))
    assert generator.main(["--check", "--output", str(target)]) == 1
    assert generator.main(["--output", str(target)]) == 0
    assert target.read_text() == committed
    assert generator.main(["--check", "--output", str(target)]) == 0


@pytest.mark.parametrize(
    ("config", "where"),
    [
        pytest.param({"refresh": {"refesh_at": 0.5}}, "/config/refresh", id="section-key"),
        pytest.param({"serevr": {}}, "/config", id="top-level-key"),
        pytest.param({"logging": {"level": "verbose"}}, "/config/logging/level", id="enum"),
        pytest.param(
            {
                "jobs": [
                    {
                        "name": "j",
                        "provider": {**OAUTH2_PROVIDER, "client_secert_file": "/x"},
                        "sinks": [{"kind": "kubernetes", "secret": "s"}],
                    }
                ]
            },
            "/config/jobs/0/provider",
            id="provider-key",
        ),
        pytest.param(
            {
                "jobs": [
                    {
                        "name": "j",
                        "provider": OAUTH2_PROVIDER,
                        "sinks": [{"kind": "kubernetes", "secret": "s", "keys": "x"}],
                    }
                ]
            },
            "/config/jobs/0/sinks/0",
            id="sink-key",
        ),
        pytest.param(
            {
                "jobs": [
                    {
                        "name": "j",
                        "provider": {**OAUTH2_PROVIDER, "kind": "oauth"},
                        "sinks": [{"kind": "kubernetes", "secret": "s"}],
                    }
                ]
            },
            "/config/jobs/0/provider/kind",
            id="provider-kind",
        ),
        pytest.param(
            {
                "jobs": [
                    {
                        "name": "j",
                        "provider": OAUTH2_PROVIDER,
                        "sinks": [{"kind": "kubernetes", "secret": "s"}],
                        "on_expire": "keep",
                    }
                ]
            },
            "/config/jobs/0",
            id="job-key",
        ),
        pytest.param(
            {
                "jobs": [
                    {
                        "name": "j",
                        "provider": {**OAUTH2_PROVIDER, "timeout": "10 seconds"},
                        "sinks": [{"kind": "kubernetes", "secret": "s"}],
                    }
                ]
            },
            "/config/jobs/0/provider/timeout",
            id="provider-duration",
        ),
    ],
)
def test_typos_inside_config_are_refused_by_helm(
    chart: helm.Chart, config: dict[str, Any], where: str
) -> None:
    values = {"config": config, "credentials": {"existingSecret": "c"}}
    with pytest.raises(helm.HelmValuesError) as refused:
        render(chart, values)
    assert f"at '{where}" in str(refused.value)
    # ... and the daemon agrees: the same config fails its own validation.
    from refresher.config import load_settings
    from refresher.errors import ConfigError

    with pytest.raises(ConfigError):
        load_settings(data=config, check_files=False)


def test_schema_accepts_every_documented_config_shape(chart: helm.Chart) -> None:
    """The configuration reference's full example passes the generated schema."""
    reference = (ROOT / "docs" / "configuration.md").read_text()
    full = yaml.safe_load(re.search(r"```yaml\n(server:.*?)```", reference, re.S).group(1))
    full["server"]["listen"] = "0.0.0.0:9464"
    chart.validate_schema(chart.merge_values({"config": full}))


# --------------------------------------------------------------------- helm test hook


def helm_test_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    [pod] = [m for m in manifests if m["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return pod


def test_helm_test_hook_renders(chart: helm.Chart) -> None:
    manifests = render(chart)
    pod = helm_test_pod(manifests)
    validate([pod])
    [check] = pod["spec"]["containers"]
    assert check["image"] == container(manifests)["image"]
    assert check["command"][:2] == ["python", "-c"]
    assert_container_security_context(check)
    env = {e["name"]: e["value"] for e in check["env"]}
    service = only(manifests, "Service")
    assert env["REFRESHER_URL"] == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:9464"
    # The Service must not select it.
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [m for m in render(chart, {"helmTest": {"enabled": False}}) if m["kind"] == "Pod"] == []
    sidecar = render(chart, example_values("values-sidecar.yaml"), name="tokens", namespace="apps")
    assert [m for m in sidecar if m["kind"] == "Pod"] == []


@pytest.mark.anyio
async def test_helm_test_hook_checks_a_real_daemon(
    chart: helm.Chart, start_daemon: Any, oauth2_emulator: Any, tmp_path: Path
) -> None:
    """Run the hook's exact command against a daemon: 0 when ready, 1 when not."""
    import subprocess
    import sys

    import anyio

    from tests.conftest import oauth2_job

    [check] = helm_test_pod(render(chart))["spec"]["containers"]
    argv = [sys.executable, *check["command"][1:]]

    async def run_check(port: int) -> subprocess.CompletedProcess[str]:
        env = {"REFRESHER_URL": f"http://127.0.0.1:{port}", "PATH": "/usr/bin:/bin"}
        return await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        )

    job = oauth2_job(oauth2_emulator, tmp_path)
    async with start_daemon({"jobs": [job]}) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        with anyio.fail_after(10):
            while runtime.token is None:
                await anyio.sleep(0.01)
        ok = await run_check(daemon.port)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "GET /readyz: 200" in ok.stdout and "GET /metrics: 200" in ok.stdout

    bad = oauth2_job(
        oauth2_emulator, tmp_path, name="bad", sinks=[{"kind": "file", "path": str(tmp_path / "b")}]
    )
    bad["provider"]["client_secret"] = "wrong-secret-value"
    async with start_daemon({"jobs": [bad]}) as daemon:
        runtime = daemon.scheduler.jobs[("bad", None)]
        with anyio.fail_after(10):
            while runtime.failures == 0:
                await anyio.sleep(0.01)
        failed = await run_check(daemon.port)
        assert failed.returncode == 1
        assert "GET /readyz: 503" in failed.stdout
        port = daemon.port
    # Nobody listening any more.
    gone = await run_check(port)
    assert gone.returncode == 1


# --------------------------------------------------------------------- conventions


def test_artifact_hub_annotations(chart: helm.Chart) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    annotations = chart.metadata["annotations"]
    assert annotations["artifacthub.io/license"] == project["license"]
    [image] = yaml.safe_load(annotations["artifacthub.io/images"])
    assert image["image"] == container(render(chart))["image"]
    changes = yaml.safe_load(annotations["artifacthub.io/changes"])
    assert changes and all(
        c["kind"] in {"added", "changed", "deprecated", "removed", "fixed", "security"}
        and c["description"]
        for c in changes
    )
    links = {
        link["name"]: link["url"] for link in yaml.safe_load(annotations["artifacthub.io/links"])
    }
    assert links["Changelog"].endswith("/CHANGELOG.md")
    # The chart version the changes describe is in CHANGELOG.md.
    assert f"chart {chart.metadata['version']}" in (ROOT / "CHANGELOG.md").read_text()


def test_chart_readme_values_table_is_current(tmp_path: Path) -> None:
    generator = load_tool(README_GENERATOR, "refresher_readme_generate")
    readme = CHART / "README.md"
    assert generator.render(readme.read_text(), (CHART / "values.yaml").read_text()) == (
        readme.read_text()
    ), "helm/refresher/README.md is stale: run python helm/refresher/docs/generate.py"
    keys = dict(generator.documented_keys((CHART / "values.yaml").read_text()))
    # Every top-level value and every documented leaf has a row.
    top = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in top:
        assert key in keys or any(k.startswith(key + ".") for k in keys), key
    assert "| `replicaCount` | `1` |" in readme.read_text()
    stale = tmp_path / "README.md"
    stale.write_text(readme.read_text().replace("| `replicaCount` | `1` |", "| `replicas` | `1` |"))
    assert generator.main(["--check", "--output", str(stale)]) == 1
    assert generator.main(["--output", str(stale)]) == 0
    assert stale.read_text() == readme.read_text()


@pytest.mark.parametrize(
    "text", ["90s", "1h30m", "250ms", "1.5h", "5", " 5m ", "5 m", "2d", "0", "0s", "10.5"]
)
def test_duration_schema_accepts_what_the_daemon_parses(text: str) -> None:
    from refresher.fields import DURATION_PATTERN, parse_duration

    assert parse_duration(text) >= 0
    assert re.fullmatch(DURATION_PATTERN, text)


@pytest.mark.parametrize("text", ["soon", "5x", "-5m", "", "m", "5mm", "1h-30m", "ten seconds"])
def test_duration_schema_refuses_what_the_daemon_refuses(text: str) -> None:
    from refresher.fields import DURATION_PATTERN, parse_duration

    with pytest.raises(ValueError):
        if parse_duration(text) < 0:
            raise ValueError("negative")
    assert not re.fullmatch(DURATION_PATTERN, text)


# --------------------------------------------------------------------- workload identity

WORKLOAD_IDENTITY_VALUES: dict[str, Any] = {
    "serviceAccountTokens": [
        {"name": "idp", "audience": "https://idp.example.com", "expirationSeconds": 7200},
        {"name": "sts", "audience": "sts.example.com"},
    ],
    "config": {
        "jobs": [
            {
                "name": "federated",
                "provider": {
                    "kind": "oauth2",
                    "issuer": "https://idp.example.com",
                    "client_auth": "none",
                    "grant": "jwt_bearer",
                    "assertion_file": "/var/run/secrets/tokens/idp/token",
                },
                "sinks": [{"kind": "kubernetes", "secret": "federated-token"}],
            },
            {
                "name": "exchanged",
                "provider": {
                    "kind": "oauth2",
                    "token_url": "https://sts.example.com/v1/token",
                    "client_auth": "none",
                    "grant": "token_exchange",
                    "subject_token_file": "/var/run/secrets/tokens/sts/token",
                    "audience": "https://partner.example.com",
                },
                "sinks": [{"kind": "kubernetes", "secret": "exchanged-token"}],
            },
        ]
    },
}


def test_service_account_tokens_are_projected_for_workload_identity(chart: helm.Chart, tmp_path: Path) -> None:
    """The recipe of docs/kubernetes.md: no static secret, the kubelet-rotated token
    of the pod's own ServiceAccount, audience-bound, read by the daemon at every use."""
    manifests = render(chart, WORKLOAD_IDENTITY_VALUES)
    validate(manifests)
    spec = pod_spec(manifests)
    idp = volumes(spec)["sa-token-idp"]["projected"]["sources"]
    assert idp == [{"serviceAccountToken": {"path": "token", "audience": "https://idp.example.com",
                                            "expirationSeconds": 7200}}]
    sts = volumes(spec)["sa-token-sts"]["projected"]["sources"][0]["serviceAccountToken"]
    assert sts["expirationSeconds"] == 3600  # the default
    mounted = mounts(container(manifests))
    assert mounted["/var/run/secrets/tokens/idp"] == {
        "name": "sa-token-idp", "mountPath": "/var/run/secrets/tokens/idp", "readOnly": True}
    # The config the pod gets loads in the daemon (files stood in, as the kubelet would).
    from refresher.config import load_settings

    config = daemon_config(manifests)
    del config["server"]["admin_token_file"]  # another test's subject
    text = json.dumps(config).replace('"/var/run/secrets/tokens/', f'"{tmp_path}/')
    for name in ("idp", "sts"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "token").write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(json.loads(text)))
    jobs = load_settings(tmp_path / "config.yaml").jobs
    assert [job.provider.grant for job in jobs] == ["jwt_bearer", "token_exchange"]  # type: ignore[union-attr]


def test_service_account_tokens_in_sidecar_mode(chart: helm.Chart) -> None:
    values = {**WORKLOAD_IDENTITY_VALUES, "mode": "sidecar"}
    spec = sidecar_spec(render(chart, values))
    by_name = {v["name"]: v for v in spec["volumes.yaml"]}
    assert by_name["refresher-sa-token-idp"]["projected"]["sources"][0]["serviceAccountToken"][
        "audience"] == "https://idp.example.com"
    assert {"name": "refresher-sa-token-sts", "mountPath": "/var/run/secrets/tokens/sts",
            "readOnly": True} in spec["container.yaml"]["volumeMounts"]


def test_a_projected_token_path_must_be_one_the_chart_mounts(chart: helm.Chart) -> None:
    values = json.loads(json.dumps(WORKLOAD_IDENTITY_VALUES))
    values["serviceAccountTokens"] = values["serviceAccountTokens"][:1]
    with pytest.raises(helm.HelmRenderError, match='serviceAccountTokens has no entry named "sts"'):
        render(chart, values)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"name": "idp", "audience": "x", "expirationSeconds": 60}, "expirationSeconds"),
        ({"name": "Bad_Name", "audience": "x"}, "name"),
        ({"name": "idp"}, "audience"),
        ({"name": "idp", "audience": "x", "path": "token"}, "path"),
    ],
)
def test_schema_refuses_bad_service_account_tokens(chart: helm.Chart, entry: dict[str, Any], field: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=field):
        chart.validate_schema(chart.merge_values({"serviceAccountTokens": [entry]}))


def test_an_oauth2_state_secret_gets_exact_secret_rbac(chart: helm.Chart) -> None:
    """Rotated refresh tokens kept in a Secret: get/patch/create on exactly its name,
    in its namespace, and the API token mounted (the daemon talks to the API)."""
    provider = {
        "kind": "oauth2",
        "issuer": "https://idp.example.com",
        "client_id": "app",
        "client_auth": "none",
        "grant": "refresh_token",
        "refresh_token_file": "/etc/refresher/credentials/refresh-token",
        "state_secret": {"name": "refresher-state", "namespace": "apps"},
    }
    jobs = [{"name": "user", "provider": provider,
             "sinks": [{"kind": "kubernetes", "secret": "user-token"}]}]
    manifests = render(chart, {"config": {"jobs": jobs}, "credentials": {"existingSecret": "rt"}})
    validate(manifests)
    roles = {r["metadata"]["namespace"]: r for r in of_kind(manifests, "Role")}
    assert set(roles) == {"apps", NAMESPACE}
    assert roles["apps"]["rules"][0] == {
        "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["refresher-state"],
        "verbs": ["get", "patch"]}
    assert roles[NAMESPACE]["rules"][0]["resourceNames"] == ["user-token"]
    assert pod_spec(manifests)["automountServiceAccountToken"] is True
